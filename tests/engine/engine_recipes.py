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


#: A short ``adtp`` prompt-retainer training on a tiny causal LM (add ``train_data``): 3 steps of 4 windows.
PROMPT_RETAINER = {
    "method": "text_token_pruning",
    "algorithm": "adtp",
    "layer": 1,
    "train_steps": 3,
    "batch_size": 4,
    "max_length": 24,
    "continuation_length": 8,
    "ig_steps": 2,
    "target_ratio": 0.5,
    "learning_rate": 1e-2,
}
