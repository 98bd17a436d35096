"""The recipe of a one-stage prune, shared by the engine tests (a helper module: a conftest.py here would
shadow tests/conftest.py for the tests that import from it)."""

from __future__ import annotations


def one_stage_recipe(model, output, calibration, stage, engine, **extra) -> dict:
    """Prune ``model`` into ``output`` with ``stage`` on ``engine``: 8 packed sequences of 32 tokens in
    batches of 4."""
    return {
        "model": str(model),
        "output": str(output),
        "engine": engine,
        "calibration": {
            "data": str(calibration),
            "num_samples": 8,
            "seq_len": 32,
            "batch_size": 4,
            "packing": True,
        },
        "stages": [stage],
        **extra,
    }
