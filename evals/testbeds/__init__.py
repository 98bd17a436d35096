"""Lab code: testbed builders (the trained MoE, MiniLM, LLaVA and CLIP testbeds, their data and routing diagnostics).

They build the small trained models the benchmarks and the slow tests measure methods on. Nothing in the product
(``hf_prune``, ``hf_prune.integrations``, ``hf_prune.model_patches``, ``hf_prune.evals`` outside this folder and
``benchmarks/``) imports them; ``tests/unit/test_layers.py`` checks it.
"""
