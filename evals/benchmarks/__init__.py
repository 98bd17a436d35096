"""Lab code: benchmark scripts (``python -m hf_prune.evals.benchmarks.<name>``) that print figures.

They may use the testbeds (``hf_prune.evals.testbeds``) and the pipeline. Nothing in the product (``hf_prune``,
``hf_prune.integrations``, ``hf_prune.model_patches``, ``hf_prune.evals`` outside this folder and ``testbeds/``)
imports them; ``tests/unit/test_layers.py`` checks it.
"""
