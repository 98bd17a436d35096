"""The evaluation harness table, task/model checks, reports and plots."""

import json

import pytest
from hf_prune.evals.harness import TASKS, TaskModelMismatch, check_task_fits, retained_fraction
from hf_prune.evals.report import write_report
from transformers import BertConfig, LlamaConfig

import hf_prune
from hf_prune import RecipeError
from hf_prune.recipe import EVAL_TASKS


def test_harness_and_recipe_name_the_same_tasks():
    assert tuple(TASKS) == EVAL_TASKS


def test_task_model_mismatches_are_named():
    llama = LlamaConfig(hidden_size=16, num_attention_heads=2, num_hidden_layers=1, intermediate_size=32)
    with pytest.raises(
        TaskModelMismatch, match="'vqa' needs a vision-language model; llama has no vision tower"
    ):
        check_task_fits("vqa", llama)
    with pytest.raises(
        TaskModelMismatch, match="needs a sequence-classification model; got LlamaForCausalLM"
    ):
        check_task_fits("classification", llama, "LlamaForCausalLM")
    bert = BertConfig(architectures=["BertForSequenceClassification"])
    with pytest.raises(TaskModelMismatch, match="'perplexity' needs a language-model head"):
        check_task_fits("perplexity", bert)
    check_task_fits("classification", bert)
    check_task_fits("perplexity", llama)


def test_retained_fraction_follows_the_metric_direction():
    assert retained_fraction("perplexity", {"perplexity": 10.0}, {"perplexity": 12.5}) == pytest.approx(0.8)
    assert retained_fraction("multiple_choice", {"accuracy": 0.5}, {"accuracy": 0.4}) == pytest.approx(0.8)
    # A zero baseline (an untrained model) has no share to keep: no figure, and no crash losing the run.
    assert retained_fraction("multiple_choice", {"accuracy": 0.0}, {"accuracy": 0.25}) is None


def test_recipe_with_vqa_on_a_text_model_fails_before_loading(tmp_path, monkeypatch):
    from conftest import shared_asset

    monkeypatch.setattr("hf_prune.pipeline.load_model", lambda *a, **k: pytest.fail("model was loaded"))
    data = tmp_path / "vqa.jsonl"
    data.write_text(json.dumps({"image": "x.png", "question": "q", "answers": ["a"]}) + "\n")
    recipe = {
        "model": str(shared_asset("models/stories260K")),
        "output": str(tmp_path / "out"),
        "stages": [{"method": "layer_drop", "layers": [2, 2]}],
        "evaluate": [{"task": "vqa", "data": str(data)}],
    }
    with pytest.raises(RecipeError, match=r"evaluate\[0\].task: task 'vqa' needs a vision-language model"):
        hf_prune.prune(recipe)
    assert not (tmp_path / "out").exists()


def test_report_writes_markdown_and_non_empty_plots(tmp_path):
    entry = {
        "task": "perplexity",
        "metric": "perplexity",
        "data": "/x/eval.txt",
        "original": {"perplexity": 4.0},
        "pruned": {"perplexity": 5.0},
        "retained": 0.8,
    }
    runs = [
        {"label": "replaceme", "params_before": 100, "params_after": 80, "evaluation": [entry]},
        {
            "label": "layer_drop",
            "params_before": 100,
            "params_after": 80,
            "evaluation": [{**entry, "pruned": {"perplexity": 6.0}, "retained": 4 / 6}],
        },
    ]
    report = write_report(
        tmp_path,
        title="t",
        runs=runs,
        latency_ms={"a": {64: 1.0, 128: 2.1}, "b": {64: 0.7, 128: 1.4}},
        expert_counts={"original": [8, 8, 8], "pruned": [6, 4, 5]},
        bench_table="table here",
    )
    text = report.read_text()
    assert "| replaceme | 80 | 80.0% | perplexity | perplexity | eval.txt | 4 | 5 | 80.0% |" in text
    assert "| layer_drop |" in text and "table here" in text
    for name in ("quality_vs_compression", "latency_vs_seq_len", "expert_counts"):
        assert f"({name}.png)" in text
        assert (tmp_path / f"{name}.png").stat().st_size > 5_000


def test_report_skips_plots_without_data(tmp_path):
    write_report(
        tmp_path,
        title="t",
        runs=[{"label": "x", "params_before": 10, "params_after": 5}],
        expert_counts={"original": [0, 0]},
    )
    assert not list(tmp_path.glob("*.png"))


def test_moe_prune_with_evaluation_writes_report_into_the_checkpoint(tmp_path):
    from tiny_models import save_tiny_model, write_calibration_file

    source = save_tiny_model("qwen2_moe", tmp_path / "src")
    calibration = write_calibration_file(tmp_path / "calib.txt")
    result = hf_prune.prune(
        {
            "model": str(source),
            "output": str(tmp_path / "out"),
            "calibration": {"data": str(calibration), "num_samples": 8, "seq_len": 32},
            "stages": [{"method": "replaceme", "num_layers": 1}],
            "evaluate": [{"task": "perplexity", "data": str(calibration), "seq_len": 32, "limit": 4}],
        },
        progress=False,
    )
    out = result.output
    assert "| replaceme |" in (out / "report.md").read_text()
    assert (out / "quality_vs_compression.png").stat().st_size > 5_000
    assert (out / "expert_counts.png").stat().st_size > 5_000
    card = (out / "README.md").read_text()
    assert "type: text-generation" in card and "type: perplexity" in card


def test_moe_report_has_latency_plot(tmp_path):
    from tiny_models import save_tiny_model, write_calibration_file

    source = save_tiny_model("mixtral", tmp_path / "src")
    calibration = write_calibration_file(tmp_path / "calib.txt")
    result = hf_prune.prune(
        {
            "model": str(source),
            "output": str(tmp_path / "out"),
            "calibration": {"data": str(calibration), "num_samples": 4, "seq_len": 32},
            "stages": [{"method": "layer_drop", "num_layers": 1}],
            "evaluate": [{"task": "perplexity", "data": str(calibration), "seq_len": 32, "limit": 2}],
        },
        progress=False,
    )
    assert (result.output / "latency_vs_seq_len.png").stat().st_size > 5_000
    assert "latency_vs_seq_len.png" in (result.output / "report.md").read_text()


def test_records_from_parquet_and_hub_ids(tmp_path):
    import datasets

    from hf_prune.data import read_records
    from hf_prune.errors import DataError

    path = tmp_path / "rows.parquet"
    datasets.Dataset.from_list(
        [{"question": "q1", "answer": 1}, {"question": "q2", "answer": None}]
    ).to_parquet(path)
    with pytest.raises(DataError, match=r"rows\.parquet:row 2: missing field 'answer'"):
        read_records(str(path), required=("question", "answer"))
    assert read_records(str(path), required=("question",))[0] == (
        f"{path}:row 1",
        {"question": "q1", "answer": 1},
    )
    with pytest.raises(FileNotFoundError, match="hub datasets need network access"):
        read_records("nobody/no-such-dataset")


def test_kept_token_heat_map(tmp_path):
    import numpy as np
    from hf_prune.evals.report import plot_kept_tokens

    image = np.random.default_rng(0).integers(0, 255, size=(32, 32, 3))
    kept = np.zeros((8, 8))
    kept[2:5, 3:6] = 1
    path = plot_kept_tokens(image, kept, tmp_path / "kept.png")
    assert path.stat().st_size > 5_000
    with pytest.raises(ValueError, match="rows, cols"):
        plot_kept_tokens(image, kept.ravel(), tmp_path / "bad.png")
