"""`hf-prune eval` (with --compare) and `hf-prune bench` end to end on the real stories260K."""

import json

import pytest
import torch
from conftest import shared_asset
from hf_prune.evals.cloze import build_cloze_items, write_jsonl

import hf_prune
from hf_prune.cli import main

STORIES = "models/stories260K"


@pytest.fixture(scope="module")
def pruned_and_cloze(tmp_path_factory):
    folder = tmp_path_factory.mktemp("eval-cli")
    out = folder / "stories-drop2"
    hf_prune.prune(
        {
            "model": str(shared_asset(STORIES)),
            "output": str(out),
            "stages": [{"method": "layer_drop", "layers": [2, 2]}],
        },
        progress=False,
    )
    text = shared_asset("text/tinystories/sample.txt").read_text()
    cloze = folder / "cloze.jsonl"
    write_jsonl(build_cloze_items(text, num_items=60, seed=0), cloze)
    return out, cloze


def test_eval_compare_writes_report_and_retained(pruned_and_cloze, tmp_path, capsys):
    out, cloze = pruned_and_cloze
    report_dir, results_file = tmp_path / "report", tmp_path / "results.json"
    code = main(
        [
            "eval",
            str(out),
            "--task",
            "multiple_choice",
            "--data",
            str(cloze),
            "--compare",
            str(shared_asset(STORIES)),
            "--report-dir",
            str(report_dir),
            "--output",
            str(results_file),
            "--device",
            "cpu",
            "--quiet",
        ]
    )
    assert code == 0
    results = json.loads(results_file.read_text())
    original, pruned = results["original"]["accuracy"], results["pruned"]["accuracy"]
    assert results["retained"] == pytest.approx(pruned / original)
    assert results["pruned"]["parameters"] < results["original"]["parameters"]
    assert original > 0.5  # in-domain cloze on the real model, 4 choices
    text = (report_dir / "report.md").read_text()
    assert "| stories-drop2 |" in text and "multiple_choice" in text and "## Benchmark" in text
    for plot in ("quality_vs_compression.png", "latency_vs_seq_len.png"):
        assert (report_dir / plot).stat().st_size > 5_000


def test_bench_vs_original_prints_ratios(pruned_and_cloze, tmp_path, capsys):
    out, _ = pruned_and_cloze
    output = tmp_path / "bench.json"
    code = main(
        [
            "bench",
            str(out),
            "--vs",
            str(shared_asset(STORIES)),
            "--seq-lens",
            "16",
            "32",
            "--decode-tokens",
            "4",
            "--repeats",
            "2",
            "--device",
            "cpu",
            "--output",
            str(output),
            "--quiet",
        ]
    )
    assert code == 0
    table = capsys.readouterr().out
    assert "pruned/original" in table and "prefill ms @16" in table and "decode tokens/s" in table
    results = json.loads(output.read_text())
    assert set(results["models"]) == {"pruned", "original"}
    ratio = results["models"]["pruned"]["ratios"]["parameters"]
    assert ratio == pytest.approx(214_592 / 260_032)


def test_eval_refuses_a_task_that_does_not_fit(pruned_and_cloze, tmp_path, capsys):
    out, cloze = pruned_and_cloze
    assert main(["eval", str(out), "--task", "vqa", "--data", str(cloze), "--quiet"]) == 2
    assert "needs a vision-language model; llama has no vision tower" in capsys.readouterr().err


def test_eval_cpu_dtype_and_limit(pruned_and_cloze, tmp_path, capsys):
    out, _ = pruned_and_cloze
    results_file = tmp_path / "r.json"
    assert (
        main(
            [
                "eval",
                str(out),
                "--task",
                "perplexity",
                "--data",
                str(shared_asset("text/tinystories/sample.txt")),
                "--seq-len",
                "64",
                "--limit",
                "3",
                "--device",
                "cpu",
                "--dtype",
                "float32",
                "--output",
                str(results_file),
                "--quiet",
            ]
        )
        == 0
    )
    results = json.loads(results_file.read_text())
    assert results["device"] == "cpu" and results["dtype"] == "torch.float32"
    assert results["num_windows"] == 3 and results["num_tokens"] == 3 * 63


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (run where a GPU is present)")
def test_gpu_evaluation_defaults_to_bfloat16_and_matches_cpu(pruned_and_cloze):
    from hf_prune.evals.run_checkpoints import evaluate_checkpoint

    from hf_prune.recipe import EvaluationTask

    out, cloze = pruned_and_cloze
    task = EvaluationTask(task="multiple_choice", data=str(cloze))
    gpu = evaluate_checkpoint(str(out), task, device="auto", progress=False)
    cpu = evaluate_checkpoint(str(out), task, device="cpu", progress=False)
    assert gpu["device"].startswith("cuda") and gpu["dtype"] == "torch.bfloat16"
    assert abs(gpu["accuracy"] - cpu["accuracy"]) <= 0.05


def test_device_map_auto_gives_the_same_figure(pruned_and_cloze, tmp_path, monkeypatch):
    """--device-map reaches the loader and changes no figure.

    On a CPU-only machine accelerate leaves every module on the CPU (transformers sets no
    ``hf_device_map`` then), so the split across devices is checked by the GPU test below.
    """
    import hf_prune.evals.run_checkpoints as run_checkpoints

    device_maps, real_load_model = [], run_checkpoints.load_model

    def load_and_record(*args, **kwargs):
        device_maps.append(kwargs.get("device_map"))
        return real_load_model(*args, **kwargs)

    monkeypatch.setattr(run_checkpoints, "load_model", load_and_record)
    out, _ = pruned_and_cloze
    runs = ([], ["--device-map", "auto"])
    figures = [_perplexity_figure(out, tmp_path / f"r{i}.json", extra) for i, extra in enumerate(runs)]
    assert device_maps == [None, "auto"]
    assert figures[0] == pytest.approx(figures[1], rel=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (run where a GPU is present)")
def test_a_model_split_over_gpu_and_cpu_gives_the_same_figure(pruned_and_cloze, tmp_path):
    from hf_prune.checkpoint import load_model

    out, _ = pruned_and_cloze
    # half the decoder layers on the GPU, the rest (and the head) on the CPU: accelerate moves activations
    split = {"model.embed_tokens": 0, "model.rotary_emb": 0, "model.norm": "cpu", "lm_head": "cpu"}
    model = load_model(str(out), dtype="float32", device="cpu")
    layers = model.config.num_hidden_layers
    split.update({f"model.layers.{i}": 0 if i < layers // 2 else "cpu" for i in range(layers)})
    split_model = load_model(str(out), dtype="float32", device_map=split)
    ids = torch.randint(0, model.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        whole = model(ids).logits
        parted = split_model(ids.to(0)).logits.cpu()
    assert torch.allclose(whole, parted, atol=1e-4)


def _perplexity_figure(out, results_file, extra):
    sample = str(shared_asset("text/tinystories/sample.txt"))
    command = ["eval", str(out), "--task", "perplexity", "--data", sample, "--seq-len", "64", "--limit", "2"]
    assert main([*command, "--output", str(results_file), "--quiet", *extra]) == 0
    return json.loads(results_file.read_text())["perplexity"]
