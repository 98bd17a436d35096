"""The command line: help with examples, methods, inspect, and errors as messages (exit 2)."""

import pytest
from conftest import shared_asset
from transformers import Gemma2Config

from hf_prune.cli import main


@pytest.mark.parametrize("command", ["prune", "eval", "bench", "inspect", "methods", "push", "demo"])
def test_every_command_has_help_with_an_example(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert (
        ("example:" in text or "examples:" in text) and f"hf-prune {command} " in text and "--quiet" in text
    )


def test_methods_lists_fields_and_help(capsys):
    assert main(["methods"]) == 0
    text = capsys.readouterr().out
    assert (
        "replaceme:" in text and "layer_drop:" in text and "estimator" in text and "how T is fitted" in text
    )
    assert main(["methods", "nonexistent"]) == 2
    assert "unknown method 'nonexistent'" in capsys.readouterr().err


def test_inspect_real_model(capsys):
    assert main(["inspect", str(shared_asset("models/stories260K"))]) == 0
    text = capsys.readouterr().out
    assert "decoder_layers       5" in text and "hidden_size          64" in text
    assert "260,032" in text and "replaceme    applies" in text


def test_inspect_says_why_replaceme_does_not_apply(tmp_path, capsys):
    Gemma2Config(
        num_hidden_layers=2,
        hidden_size=16,
        intermediate_size=32,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        vocab_size=64,
    ).save_pretrained(tmp_path)
    assert main(["inspect", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert (
        "replaceme    not applicable: ReplaceMe cannot fold its map into gemma2: a post-feed-forward norm"
        in text
    )
    assert "layer_drop   applies" in text


def test_prune_reports_recipe_errors_without_traceback(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: x\noutput: y\nstages:\n  - method: replaceme\n    num_layers: two\n")
    assert main(["prune", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: stages[0].num_layers: expected int or null, got str 'two'")


def test_inspect_shows_experts_and_vision_tower(tmp_path, capsys):
    from tiny_models import save_tiny_model

    assert main(["inspect", str(save_tiny_model("qwen2_moe", tmp_path / "moe"))]) == 0
    text = capsys.readouterr().out
    assert "experts                4" in text and "shared_expert          True" in text
    assert main(["inspect", str(save_tiny_model("llava", tmp_path / "llava"))]) == 0
    text = capsys.readouterr().out
    assert "vision_tower" in text and "clip_vision_model" in text and "language_model_type  llama" in text
