"""lm-evaluation-harness: the ``hf-prune`` model (``integrations/lm_eval_model.py``), its registration through
the installed ``.pth`` hook, and ``hf-prune eval --harness lm-eval``.

Offline: two local task YAMLs (``dataset_path: json``), a multiple-choice task over cloze rows and a
loglikelihood_rolling task over lines of text, on a tiny random Llama saved stock, prompt-pruned (keep 0.4)
and prompt-pruned at keep_ratio 1.0. References: ``continuation_logprobs`` on the requests lm-eval logged,
tokenized here the way lm-eval splits a (context, continuation) pair; the stock model through ``--model hf``.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hf_prune.evals.pruned_prompt_scoring import continuation_logprobs
from tiny_models import build_tiny_model, build_tokenizer

import hf_prune
from hf_prune.cli import main

pytest.importorskip("lm_eval")
pytestmark = pytest.mark.usefixtures("one_torch_thread")

CLOZE = [
    (
        "The for statement iterates over the items of any sequence, in the order that they",
        ["appear", "vanish"],
    ),
    (
        "Modules can import other modules, and it is customary to place all import statements at the",
        ["beginning", "end", "middle"],
    ),
    (
        "A function definition associates the function name with the function object in the current",
        ["symbol table", "river"],
    ),
    ("Strings can be concatenated with the plus operator and repeated with the", ["star", "minus"]),
]
TEXT = [
    "The for statement iterates over the items of any sequence.",
    "A function definition associates a name with code.",
    "Modules can import other modules.",
]


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm_eval")
    tokenizer = build_tokenizer()
    stock = build_tiny_model("llama", tokenizer)
    stock.save_pretrained(root / "stock")
    tokenizer.save_pretrained(root / "stock")
    for name, ratio in (("pruned", 0.4), ("keep1", 1.0)):
        stage = {"method": "text_token_pruning", "algorithm": "attention", "keep_ratio": ratio, "layer": 1}
        recipe = {"output": str(root / name), "stages": [stage]}
        hf_prune.prune(stock, recipe, tokenizer=tokenizer, progress=False)
    rows = [{"context": c, "choices": choices, "label": 0} for c, choices in CLOZE]
    (root / "cloze.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "text.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXT))
    tasks = root / "tasks"
    tasks.mkdir()
    data = "dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {}\ntest_split: test\n"
    (tasks / "cloze.yaml").write_text(
        "task: tiny_cloze\n"
        + data.format(root / "cloze.jsonl")
        + 'output_type: multiple_choice\ndoc_to_text: "{{context}}"\ndoc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{label}}"\nmetric_list:\n  - metric: acc\n    higher_is_better: true\n'
    )
    (tasks / "text.yaml").write_text(
        "task: tiny_text\n"
        + data.format(root / "text.jsonl")
        + 'output_type: loglikelihood_rolling\ndoc_to_text: ""\ndoc_to_target: "{{text}}"\nmetric_list:\n'
        "  - metric: word_perplexity\n  - metric: byte_perplexity\n  - metric: bits_per_byte\n"
    )
    return root


_RUNS: dict = {}


def evaluate(ws, model_name: str, folder: str, tasks=("tiny_cloze", "tiny_text")):
    """lm-eval's simple_evaluate in this process: (results with samples, the lm-eval model); each run once."""
    key = (str(ws), model_name, str(folder), tuple(tasks))
    if key not in _RUNS:
        import lm_eval.models  # noqa: F401
        from hf_prune.integrations.lm_eval_hook import register
        from lm_eval import simple_evaluate
        from lm_eval.api.registry import get_model, model_registry
        from lm_eval.tasks import TaskManager

        register(model_registry)
        if "manager" not in _RUNS:
            _RUNS["manager"] = TaskManager(include_path=str(ws / "tasks"), include_defaults=False)
        lm = get_model(model_name)(pretrained=str(folder), device="cpu", batch_size=1)
        results = simple_evaluate(
            model=lm, tasks=list(tasks), task_manager=_RUNS["manager"], log_samples=True
        )
        _RUNS[key] = results, lm
    return _RUNS[key]


def split_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's split of a (context, continuation) pair: trailing spaces move to the continuation, the
    continuation's tokens are those of the whole text after the context's."""
    stripped = context.rstrip()
    continuation = context[len(stripped) :] + continuation
    whole, head = tokenizer.encode(stripped + continuation), tokenizer.encode(stripped)
    return head, whole[len(head) :]


def logged_scores(samples) -> list[tuple]:
    """(request arguments, log-likelihood, greedy) of each logged request (greedy None for a rolling one)."""
    return [
        (tuple(args), float(resp[0][0]), bool(resp[0][1]))
        if isinstance(resp[0], (list, tuple))
        else (tuple(args), float(resp[0]), None)
        for sample in samples
        for args, resp in zip(sample["arguments"], sample["resps"], strict=True)
    ]


def test_pruned_model_scores_equal_continuation_logprobs(ws):
    results, lm = evaluate(ws, "hf-prune", ws / "pruned")
    assert lm.prunes_prompts and type(lm.model).__name__ == "HfPruneLlamaForCausalLM"
    scored = logged_scores(results["samples"]["tiny_cloze"])
    assert len(scored) == sum(len(choices) for _, choices in CLOZE)
    correct = []
    for sample in results["samples"]["tiny_cloze"]:
        context = sample["arguments"][0][0]
        sums = []
        for _, continuation in sample["arguments"]:
            head, tail = split_pair(lm.tokenizer, context, continuation)
            ((logprobs, _),) = continuation_logprobs(lm.model, head, [tail])
            sums.append(float(logprobs.sum()))
        got = [float(resp[0][0]) for resp in sample["resps"]]
        assert got == pytest.approx(sums, rel=1e-6, abs=1e-6)
        correct.append(int(max(range(len(sums)), key=sums.__getitem__) == sample["target"]))
    assert results["results"]["tiny_cloze"]["acc,none"] == pytest.approx(sum(correct) / len(correct))
    # Pruning matters here: the stock model's whole-sequence scores differ.
    stock, _ = evaluate(ws, "hf", ws / "stock")
    stock_scores = [s[1] for s in logged_scores(stock["samples"]["tiny_cloze"])]  # same requests, same order
    assert max(abs(a - b) for a, b in zip(stock_scores, [s[1] for s in scored], strict=True)) > 1e-3
    # loglikelihood_rolling: one-token contexts, nothing pruned: the stock model's perplexity.
    for metric in ("word_perplexity", "byte_perplexity", "bits_per_byte"):
        got, want = results["results"]["tiny_text"], stock["results"]["tiny_text"]
        assert got[f"{metric},none"] == pytest.approx(want[f"{metric},none"], rel=1e-5)


def test_keep_ratio_one_scores_as_the_stock_model(ws):
    kept, lm = evaluate(ws, "hf-prune", ws / "keep1")
    stock, _ = evaluate(ws, "hf", ws / "stock")
    assert lm.prunes_prompts
    for task in ("tiny_cloze", "tiny_text"):
        got, expected = logged_scores(kept["samples"][task]), logged_scores(stock["samples"][task])
        assert [g[0] for g in got] == [e[0] for e in expected]
        assert [g[1] for g in got] == pytest.approx([e[1] for e in expected], rel=1e-5, abs=1e-4)


def test_stock_checkpoint_hf_and_hf_prune_give_identical_numbers(ws):
    from conftest import shared_asset

    stories = shared_asset("models/stories260K")
    for folder in (ws / "stock", stories):
        ours, lm = evaluate(ws, "hf-prune", folder)
        theirs, _ = evaluate(ws, "hf", folder)
        assert not lm.prunes_prompts
        assert ours["results"] == theirs["results"]
        for task in ("tiny_cloze", "tiny_text"):
            assert logged_scores(ours["samples"][task]) == logged_scores(theirs["samples"][task])


def test_hf_prune_eval_harness_lm_eval_compare(ws, tmp_path, capsys):
    output, report = tmp_path / "results.json", tmp_path / "report"
    argv = ["eval", str(ws / "pruned"), "--harness", "lm-eval", "--tasks", "tiny_cloze,tiny_text"]
    argv += ["--include-path", str(ws / "tasks"), "--compare", str(ws / "stock"), "--device", "cpu"]
    assert main([*argv, "--report-dir", str(report), "--output", str(output), "--quiet"]) == 0
    results = json.loads(output.read_text())
    expected, _ = evaluate(ws, "hf-prune", ws / "pruned")
    stock, _ = evaluate(ws, "hf", ws / "stock")
    entries = {entry["task"]: entry for entry in results["evaluation"]}
    assert list(entries) == ["tiny_cloze", "tiny_text"]
    for task, metric in (("tiny_cloze", "acc"), ("tiny_text", "word_perplexity")):
        entry = entries[task]
        assert entry["metric"] == metric and entry["data"] == f"lm-eval:{task}"
        assert entry["pruned"][metric] == expected["results"][task][f"{metric},none"]
        assert entry["original"][metric] == stock["results"][task][f"{metric},none"]
        assert entry["pruned"]["parameters"] == entry["original"]["parameters"] > 0
    assert entries["tiny_cloze"]["task_type"] == "multiple-choice"
    original, pruned = (
        entries["tiny_text"]["original"]["word_perplexity"],
        entries["tiny_text"]["pruned"]["word_perplexity"],
    )
    assert entries["tiny_text"]["retained"] == pytest.approx(original / pruned)
    text = (report / "report.md").read_text()
    assert "| tiny_cloze | acc | lm-eval:tiny_cloze |" in text and "tiny_text" in text
    assert (report / "quality_vs_compression.png").is_file() and (report / "latency_vs_seq_len.png").is_file()
    # One model, no --compare: the figures per task.
    capsys.readouterr()
    assert main(["eval", str(ws / "stock"), "--harness", "lm-eval", "--tasks", "tiny_cloze"]
                + ["--include-path", str(ws / "tasks"), "--device", "cpu", "--quiet"]) == 0  # fmt: skip
    single = json.loads(capsys.readouterr().out)
    assert single["results"][0]["acc"] == stock["results"]["tiny_cloze"]["acc,none"]


BAD_INPUT = {
    "unknown-task": (
        ["--harness", "lm-eval", "--tasks", "tiny_cloze,no_such_task"],
        r"unknown lm-eval task.*'no_such_task'",
    ),
    "missing-include-path": (
        ["--harness", "lm-eval", "--tasks", "tiny_cloze", "--include-path", "nope"],
        r"--include-path nope",
    ),
    "no-tasks": (["--harness", "lm-eval"], r"needs --tasks"),
    "task-with-lm-eval": (["--harness", "lm-eval", "--task", "perplexity", "--tasks", "x"], r"not --task"),
    "tasks-without-harness": (["--tasks", "tiny_cloze"], r"--tasks is for --harness lm-eval"),
    "no-task": ([], r"--task is required"),
    "lm-eval-missing": (
        ["--harness", "lm-eval", "--tasks", "tiny_cloze"],
        r"pip install 'hf-prune\[lm-eval\]'",
    ),
}


@pytest.mark.parametrize(
    "name",
    # An unknown task is looked for among lm-eval's own ~15,000 task files too (seconds to index).
    [pytest.param(n, marks=pytest.mark.slow) if n == "unknown-task" else n for n in BAD_INPUT],
)
def test_bad_input_exits_2_with_one_line(ws, name, capsys, monkeypatch):
    extra, pattern = BAD_INPUT[name]
    if name == "lm-eval-missing":
        monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` raises ImportError
    if "--include-path" not in extra and "--harness" in extra:
        extra = [*extra, "--include-path", str(ws / "tasks")]
    monkeypatch.chdir(ws)
    code = main(["eval", str(ws / "stock"), *extra, "--quiet"])
    err = capsys.readouterr().err
    error_lines = [line for line in err.splitlines() if "error:" in line]
    assert code == 2 and len(error_lines) == 1 and "Traceback" not in err, err
    assert re.search(pattern, error_lines[0]), error_lines[0]


# ---- the lm_eval console script of this venv, in fresh processes (the installed .pth registers hf-prune)


def lm_eval_cli(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    script = Path(sys.executable).parent / "lm_eval"
    if not script.exists():
        pytest.fail(f"{script} is missing: install hf-prune with the lm-eval extra (pip install -e '.[dev]')")
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_EVALUATE_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "HF_MODULES_CACHE": str(tmp_path / "modules"),  # remote code copied by trust_remote_code
    }
    return subprocess.run(
        [str(script), *args, "--device", "cpu"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )


@pytest.mark.slow
def test_installed_hook_is_lazy_and_registers_hf_prune(tmp_path):
    site = Path(torch.__file__).resolve().parents[1]
    if not (site / "hf_prune_lm_eval.pth").is_file():
        pytest.fail(f"hf_prune_lm_eval.pth is not in {site}: reinstall hf-prune (pip install -e '.[dev]')")
    code = (
        "import sys, json\n"
        "before = sorted(m for m in ('torch', 'transformers', 'hf_prune', 'lm_eval') if m in sys.modules)\n"
        "import lm_eval.models\nfrom lm_eval.api.registry import model_registry\n"
        "print(json.dumps([before, 'hf-prune' in model_registry, 'hf_prune' in sys.modules,\n"
        "    [type(f).__name__ for f in sys.meta_path if type(f).__name__ == 'LmEvalModelsFinder']]))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert json.loads(out.stdout.splitlines()[-1]) == [[], True, False, []]


@pytest.mark.slow
def test_lm_eval_cli_hf_prune_model_scores_the_pruned_checkpoint(ws, tmp_path):
    args = ["--model", "hf-prune", "--model_args", f"pretrained={ws / 'pruned'}", "--tasks", "tiny_cloze"]
    done = lm_eval_cli(
        [*args, "--include_path", str(ws / "tasks"), "--output_path", "out", "--log_samples"], tmp_path
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (samples,) = (tmp_path / "out").rglob("samples_tiny_cloze_*.jsonl")
    logged = []  # the file holds arguments as {"gen_args_0": {"arg_0": ...}} and numbers as strings
    for line in samples.read_text().splitlines():
        sample = json.loads(line)
        arguments = [tuple(a.values()) for a in sample["arguments"].values()]
        resps = [[(float(r[0][0]), r[0][1] == "True")] for r in sample["resps"]]
        logged.append({"arguments": arguments, "resps": resps})
    expected, _ = evaluate(ws, "hf-prune", ws / "pruned")
    got, want = sorted(logged_scores(logged)), sorted(logged_scores(expected["samples"]["tiny_cloze"]))
    assert [g[0] for g in got] == [w[0] for w in want] and [g[2] for g in got] == [w[2] for w in want]
    assert [g[1] for g in got] == pytest.approx([w[1] for w in want], rel=1e-6)
    assert re.search(r"tiny_cloze\s*\|.*acc", done.stdout)


@pytest.mark.slow
def test_lm_eval_cli_hf_model_refuses_a_prompt_pruned_checkpoint(ws, tmp_path):
    args = ["--model", "hf", "--model_args", f"pretrained={ws / 'pruned'},trust_remote_code=True"]
    done = lm_eval_cli([*args, "--tasks", "tiny_cloze", "--include_path", str(ws / "tasks")], tmp_path)
    assert done.returncode != 0
    assert (
        "whole-sequence forward without a cache" in done.stderr and "lm_eval --model hf-prune" in done.stderr
    )
