"""Evaluation: ``evaluate`` metric modules shipped in ``metrics/``, the tasks and harness, bench and FLOPs,
reports, the demo model builder. May import the core (``hf_prune``), never the pipeline or CLI.

Lab code lives apart in ``testbeds/`` (testbed builders) and ``benchmarks/`` (benchmark scripts); nothing in
the product imports them."""
