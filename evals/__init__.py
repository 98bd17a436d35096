"""Evaluation: ``evaluate`` metric modules shipped in ``metrics/``, the perplexity task, the demo model
builder and benchmarks. May import the core (``hf_prune``), never the pipeline or CLI."""
