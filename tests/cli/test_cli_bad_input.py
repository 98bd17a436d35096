"""Bad input through the command line, as a user meets it: every case exits 2 with one line naming the
problem, writes nothing, deletes nothing, never prompts and never runs a model folder's own code.

Each case is ``(command line, pattern the error line must match)``; the command line is built from a
workspace of real and broken model folders, data files and recipes (``Workspace``). The whole workspace,
the source models included, is compared file by file before and after each run.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from conftest import shared_asset
from transformers import BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel

from hf_prune.cli import main

pytestmark = pytest.mark.usefixtures("one_torch_thread")

STORIES = "models/stories260K"
FOREIGN_CODE = """import os
import pathlib
pathlib.Path(os.environ["FOREIGN_CODE_SENTINEL"]).write_text("yes")
from transformers import LlamaConfig


class ForeignConfig(LlamaConfig):
    model_type = "foreign_llama"
"""


@dataclass
class Workspace:
    root: Path  # everything below is snapshotted
    stories: Path  # a copy of the real stories260K model
    home: Path
    work: Path  # the working folder (cwd)

    def model(self, name: str) -> str:
        return str(self.root / "models" / name)

    def data(self, name: str) -> str:
        return str(self.root / "data" / name)

    def recipe(self, name: str = "recipe.yaml", raw: str | None = None, **changes) -> str:
        """A valid ReplaceMe recipe on stories260K with ``changes`` applied (a value of ``...`` deletes the
        key), or ``raw`` text; written under ``work/``."""
        recipe = {
            "model": str(self.stories),
            "output": str(self.work / "out"),
            "calibration": {"data": self.data("calib.txt"), "num_samples": 8, "seq_len": 64},
            "stages": [{"method": "replaceme", "num_layers": 1}],
        }
        for key, value in changes.items():
            if value is ...:
                recipe.pop(key)
            else:
                recipe[key] = value
        path = self.work / name
        path.write_text(raw if raw is not None else yaml.safe_dump(recipe, sort_keys=False))
        return str(path)

    def calib(self, data: str, **changes) -> str:
        return self.recipe(calibration={"data": data, "num_samples": 8, "seq_len": 64, **changes})

    def stage(self, **fields) -> str:
        return self.recipe(stages=[fields])


def _build_models(models: Path) -> Path:
    stories = models / "stories"
    shutil.copytree(shared_asset(STORIES), stories)
    for path in stories.iterdir():
        path.chmod(0o644)

    def variant(name: str, edit: Callable[[Path], None]) -> None:
        folder = models / name
        shutil.copytree(stories, folder)
        edit(folder)

    def edit_config(**changes):
        def edit(folder: Path) -> None:
            config = json.loads((folder / "config.json").read_text())
            config.update(changes)
            (folder / "config.json").write_text(json.dumps(config))

        return edit

    def truncate(folder: Path) -> None:
        weights = folder / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])

    def foreign_code(folder: Path) -> None:
        (folder / "configuration_foreign.py").write_text(FOREIGN_CODE)
        edit_config(
            model_type="foreign_llama", auto_map={"AutoConfig": "configuration_foreign.ForeignConfig"}
        )(folder)

    def pickle_only(folder: Path) -> None:
        from safetensors.torch import load_file

        torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
        (folder / "model.safetensors").unlink()

    variant("more-layers", edit_config(num_hidden_layers=7))
    variant("truncated", truncate)
    variant("garbage", lambda f: (f / "model.safetensors").write_bytes(os.urandom(4096)))
    variant("huge", edit_config(num_hidden_layers=10**9))
    variant("foreign", foreign_code)
    variant("pickled", pickle_only)
    variant("bad-config", lambda f: (f / "config.json").write_text("{not json"))
    (models / "no-config").mkdir()
    (models / "no-config" / "notes.txt").write_text("not a model")
    BertForSequenceClassification(
        BertConfig(
            vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2
        )
    ).save_pretrained(models / "bert")
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=64)).save_pretrained(
        models / "gpt2"
    )
    return models


def _write_data(data: Path) -> None:
    data.mkdir()
    story = (shared_asset("text/tinystories/sample.txt").read_text(encoding="utf-8"))[:20000]
    (data / "calib.txt").write_text(story, encoding="utf-8")
    (data / "eval.txt").write_text(story[:4000], encoding="utf-8")
    (data / "empty.txt").write_text("")
    (data / "blank.txt").write_text("\n\n   \n")
    (data / "binary.txt").write_bytes(bytes(range(256)) * 8)
    (data / "utf16.txt").write_text(story[:2000], encoding="utf-16")
    (data / "tiny.txt").write_text("A cat.\n")
    rows = [
        json.dumps({"text": "Once upon a time."}),
        json.dumps({"text": "The dog ran."}),
        "{broken json",
        json.dumps({"text": "The end."}),
    ]
    (data / "bad.jsonl").write_text("\n".join(rows) + "\n")
    (data / "other-field.jsonl").write_text(json.dumps({"body": "a story"}) + "\n")
    (data / "numbers.jsonl").write_text(json.dumps({"text": 5}) + "\n")
    mc = [json.dumps({"question": "Q?", "choices": ["a", "b"], "answer": 0}), "[1, 2]"]
    (data / "mc-bad.jsonl").write_text("\n".join(mc) + "\n")
    (data / "table.csv").write_text("text\nhello\n")
    (data / "vqa.jsonl").write_text(json.dumps({"image": "x.png", "question": "q", "answers": ["a"]}) + "\n")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("cli-bad-input")
    _build_models(base / "models")
    _write_data(base / "data")
    return base


@pytest.fixture
def ws(prepared, tmp_path, monkeypatch) -> Workspace:
    root = tmp_path / "ws"
    shutil.copytree(prepared, root)
    home, work = root / "home", root / "work"
    for folder in (home / ".ssh", work / "documents"):
        folder.mkdir(parents=True)
    (home / ".ssh" / "id_ed25519").write_text("secret key")
    (home / ".bashrc").write_text("export PATH=$PATH\n")
    (work / "documents" / "thesis.txt").write_text("years of work")
    monkeypatch.setenv("HOME", str(home))
    # The foreign model's code marks that it ran here (transformers runs a copy from its module cache).
    monkeypatch.setenv("FOREIGN_CODE_SENTINEL", str(root / "FOREIGN_CODE_RAN"))
    monkeypatch.chdir(work)
    return Workspace(root, root / "models" / "stories", home, work)


class _NoPrompt:
    """Standard input that fails the test if anything asks the user a question."""

    def read(self, *args):
        raise AssertionError("a command prompted on standard input")

    readline = read

    def isatty(self) -> bool:
        return True

    def fileno(self) -> int:
        raise OSError("no terminal")


def _snapshot(root: Path) -> dict[str, tuple[int, int] | None]:
    return {
        str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) if p.is_file() else None
        for p in sorted(root.rglob("*"))
    }


P = "prune"
#: Otherwise valid: last-wins parsing would silently remove layers 1-2 instead of layer 1.
DUPLICATE_KEY = "output: out\nstages:\n  - method: layer_drop\n    layers: [1, 1]\n    layers: [1, 2]\n"
#: "Billion laughs" inside ``model:``: 8 levels of 9 aliases, 9⁸ (43 million) strings once expanded.
YAML_BOMB = "output: out\nstages: [{method: layer_drop, layers: [1, 1]}]\nmodel:\n" + "".join(
    f"  - &l{level} [{', '.join([f'*l{level - 1}' if level else 'x'] * 9)}]\n" for level in range(8)
)
CASES: dict[str, tuple[Callable[[Workspace], list[str]], str]] = {
    # ---- prune: the recipe file
    "recipe-missing": (lambda w: [P, "nope.yaml"], r"recipe: file not found: nope\.yaml"),
    "recipe-not-yaml": (lambda w: [P, w.recipe(raw="model: [unclosed\n")], r"not valid YAML"),
    "recipe-not-utf8": (
        lambda w: [P, w.recipe(raw="model: x\n".encode("utf-16").decode("latin-1"))],
        r"recipe: .*(UTF-8|not valid)",
    ),
    "recipe-list": (lambda w: [P, w.recipe(raw="- model: x\n")], r"top level must be a mapping"),
    "recipe-empty": (lambda w: [P, w.recipe(raw="")], r"recipe: the file is empty"),
    "recipe-json-nan": (lambda w: [P, w.recipe("r.json", raw='{"model": "x", "output": NaN}')], r"NaN"),
    "unknown-top-key": (lambda w: [P, w.recipe(outptu="x")], r"outptu: unknown key .*did you mean 'output'"),
    "missing-model": (lambda w: [P, w.recipe(model=...)], r"model: missing required key"),
    "missing-output": (lambda w: [P, w.recipe(output=...)], r"output: missing required key"),
    "output-null": (lambda w: [P, w.recipe(output=None)], r"output: .*non-empty"),
    "output-empty": (lambda w: [P, w.recipe(output="")], r"output: .*non-empty"),
    "duplicate-key": (
        lambda w: [P, w.recipe(raw=f"model: {w.stories}\n" + DUPLICATE_KEY)],
        r"duplicate key 'layers'",
    ),
    "yaml-bomb": (lambda w: [P, w.recipe(raw=YAML_BOMB)], r"(alias|nodes)"),
    "python-tag": (
        lambda w: [P, w.recipe(raw="model: !!python/object/apply:os.system ['touch PWNED']\n")],
        r"not valid YAML",
    ),
    "unknown-method": (
        lambda w: [P, w.stage(method="replace_me")],
        r"stages\[0\]\.method: unknown method 'replace_me'",
    ),
    "stage-not-mapping": (lambda w: [P, w.recipe(stages=["replaceme"])], r"stages\[0\]: expected a mapping"),
    "stages-empty": (lambda w: [P, w.recipe(stages=[])], r"stages: must be a non-empty list"),
    "unknown-stage-key": (
        lambda w: [P, w.stage(method="replaceme", num_layer=1)],
        r"stages\[0\]\.num_layer: unknown key",
    ),
    "wrong-type": (
        lambda w: [P, w.stage(method="replaceme", num_layers="two")],
        r"stages\[0\]\.num_layers: expected int",
    ),
    "bool-for-int": (
        lambda w: [P, w.stage(method="replaceme", num_layers=True)],
        r"stages\[0\]\.num_layers: expected int",
    ),
    "too-many-layers": (
        lambda w: [P, w.stage(method="replaceme", num_layers=5)],
        r"stages\[0\]\.num_layers: must be less than the model's 5 decoder layers",
    ),
    "stages-together-too-many": (
        lambda w: [
            P,
            w.recipe(
                stages=[{"method": "replaceme", "num_layers": 3}, {"method": "layer_drop", "num_layers": 2}]
            ),
        ],
        r"stages\[1\]\.num_layers",
    ),
    "bad-estimator": (
        lambda w: [P, w.stage(method="replaceme", num_layers=1, estimator="svd")],
        r"stages\[0\]\.estimator: must be one of 'lstsq' \| 'cosine', got 'svd'",
    ),
    "lr-inf": (
        lambda w: [P, w.stage(method="replaceme", num_layers=1, estimator="cosine", lr=float("inf"))],
        r"stages\[0\]\.lr: must be a finite number",
    ),
    "lr-nan": (
        lambda w: [P, w.stage(method="replaceme", num_layers=1, estimator="cosine", lr=float("nan"))],
        r"stages\[0\]\.lr: must be a finite number",
    ),
    "negative-ridge": (
        lambda w: [P, w.stage(method="replaceme", num_layers=1, ridge=-1.0)],
        r"stages\[0\]\.ridge: must be >= 0",
    ),
    "bad-dtype": (lambda w: [P, w.recipe(dtype="float8")], r"dtype: must be one of"),
    "device-tpu": (lambda w: [P, w.recipe(device="tpu")], r"device: .*'tpu'"),
    "device-no-cuda": (lambda w: [P, w.recipe(device="cuda:7")], r"cuda:7"),
    "calibration-missing": (
        lambda w: [P, w.recipe(calibration=...)],
        r"calibration: missing, but stages\[0\] \(replaceme\)",
    ),
    "calibration-file-missing": (
        lambda w: [P, w.calib("nope.txt")],
        r"calibration\.data: file not found: nope\.txt",
    ),
    "calibration-num-samples-0": (
        lambda w: [P, w.calib(w.data("calib.txt"), num_samples=0)],
        r"calibration\.num_samples: must be a positive integer, got 0",
    ),
    "calibration-seq-len-1": (
        lambda w: [P, w.calib(w.data("calib.txt"), seq_len=1)],
        r"calibration\.seq_len: must be at least 2",
    ),
    "calibration-empty": (lambda w: [P, w.calib(w.data("empty.txt"))], r"empty\.txt.*(empty|no text)"),
    "calibration-blank": (lambda w: [P, w.calib(w.data("blank.txt"))], r"blank\.txt.*(empty|no text)"),
    "calibration-binary": (lambda w: [P, w.calib(w.data("binary.txt"))], r"binary\.txt.*(UTF-8|binary)"),
    "calibration-utf16": (lambda w: [P, w.calib(w.data("utf16.txt"))], r"utf16\.txt.*UTF-8"),
    "calibration-bad-jsonl": (lambda w: [P, w.calib(w.data("bad.jsonl"))], r"bad\.jsonl:3: not valid JSON"),
    "calibration-no-field": (
        lambda w: [P, w.calib(w.data("other-field.jsonl"))],
        r"no text field 'text'.*body",
    ),
    "calibration-not-text": (lambda w: [P, w.calib(w.data("numbers.jsonl"))], r"numbers\.jsonl.*not text"),
    "calibration-csv": (lambda w: [P, w.calib(w.data("table.csv"))], r"table\.csv.*(unsupported|file type)"),
    "calibration-too-few-tokens": (
        lambda w: [P, w.calib(w.data("tiny.txt"))],
        r"tiny\.txt|calibration.*token",
    ),
    "eval-task-unknown": (
        lambda w: [P, w.recipe(evaluate=[{"task": "bleu", "data": w.data("eval.txt")}])],
        r"evaluate\[0\]\.task: unknown task 'bleu'",
    ),
    "eval-data-missing": (
        lambda w: [P, w.recipe(evaluate=[{"task": "perplexity", "data": "gone/eval.txt"}])],
        r"evaluate\[0\]\.data: file not found",
    ),
    "eval-task-mismatch": (
        lambda w: [P, w.recipe(evaluate=[{"task": "classification", "data": w.data("eval.txt")}])],
        r"evaluate\[0\]\.task: .*sequence-classification",
    ),
    # ---- prune: the model
    "model-missing": (lambda w: [P, w.recipe(model=str(w.root / "no-model"))], r"model: .*no-model"),
    "model-unsupported": (lambda w: [P, w.recipe(model=w.model("gpt2"))], r"'gpt2' is not supported"),
    "model-foreign-code": (lambda w: [P, w.recipe(model=w.model("foreign"))], r"trust-remote-code"),
    "model-pickle": (lambda w: [P, w.recipe(model=w.model("pickled"))], r"allow_pickle"),
    "model-more-layers": (lambda w: [P, w.recipe(model=w.model("more-layers"))], r"model\.layers\.[56]"),
    "model-truncated": (
        lambda w: [P, w.recipe(model=w.model("truncated"))],
        r"model\.safetensors.*(corrupt|truncated)",
    ),
    "model-garbage": (
        lambda w: [P, w.recipe(model=w.model("garbage"))],
        r"model\.safetensors.*(corrupt|truncated)",
    ),
    "model-huge-config": (lambda w: [P, w.recipe(model=w.model("huge"))], r"num_hidden_layers"),
    "model-bad-config": (lambda w: [P, w.recipe(model=w.model("bad-config"))], r"model: .*bad-config"),
    "visual-on-text-model": (lambda w: [P, w.stage(method="visual_token_pruning", budget=8)], r"vision"),
    "experts-on-dense-model": (lambda w: [P, w.stage(method="expert_pruning", keep_ratio=0.5)], r"expert"),
    # ---- prune: the output
    "output-is-source": (lambda w: [P, w.recipe(output=str(w.stories))], r"output: .*source model"),
    "output-inside-source": (
        lambda w: [P, w.recipe(output=str(w.stories / "pruned"))],
        r"output: .*source model",
    ),
    "output-is-a-file": (
        lambda w: [P, w.recipe(output=str(w.work / "documents" / "thesis.txt"))],
        r"not a folder",
    ),
    "output-existing-folder": (
        lambda w: [P, w.recipe(output=str(w.work / "documents"))],
        r"output: .*documents.*overwrite",
    ),
    "output-cwd": (lambda w: [P, w.recipe(output=".")], r"output: .*overwrite"),
    "output-cwd-overwrite": (lambda w: [P, w.recipe(output="."), "--overwrite"], r"output: .*working folder"),
    "output-home-overwrite": (lambda w: [P, w.recipe(output="~", overwrite=True)], r"output: .*home"),
    "output-ancestor-overwrite": (lambda w: [P, w.recipe(output="..", overwrite=True)], r"output: "),
    "output-root-overwrite": (lambda w: [P, w.recipe(output="/", overwrite=True)], r"output: "),
    "output-data-folder-overwrite": (
        lambda w: [P, w.recipe(output=str(w.root / "data"), overwrite=True)],
        r"output: .*data",
    ),
    # ---- eval
    "eval-model-missing": (
        lambda w: ["eval", "no-model", "--task", "perplexity", "--data", w.data("eval.txt")],
        r"no-model",
    ),
    "eval-data-missing-file": (
        lambda w: ["eval", str(w.stories), "--task", "perplexity", "--data", "nope.txt"],
        r"nope\.txt",
    ),
    "eval-unknown-task": (
        lambda w: ["eval", str(w.stories), "--task", "bleu", "--data", w.data("eval.txt")],
        r"invalid choice: 'bleu'",
    ),
    "eval-classification-on-lm": (
        lambda w: ["eval", str(w.stories), "--task", "classification", "--data", w.data("eval.txt")],
        r"sequence-classification",
    ),
    "eval-perplexity-on-bert": (
        lambda w: ["eval", w.model("bert"), "--task", "perplexity", "--data", w.data("eval.txt")],
        r"language-model head",
    ),
    "eval-vqa-on-lm": (
        lambda w: ["eval", str(w.stories), "--task", "vqa", "--data", w.data("vqa.jsonl")],
        r"vqa",
    ),
    "eval-batch-size-0": (
        lambda w: [
            "eval",
            str(w.stories),
            "--task",
            "perplexity",
            "--data",
            w.data("eval.txt"),
            "--batch-size",
            "0",
        ],
        r"--batch-size: must be a positive integer",
    ),
    "eval-seq-len-0": (
        lambda w: [
            "eval",
            str(w.stories),
            "--task",
            "perplexity",
            "--data",
            w.data("eval.txt"),
            "--seq-len",
            "0",
        ],
        r"--seq-len: must be a positive integer",
    ),
    "eval-limit-text": (
        lambda w: [
            "eval",
            str(w.stories),
            "--task",
            "perplexity",
            "--data",
            w.data("eval.txt"),
            "--limit",
            "many",
        ],
        r"--limit: invalid",
    ),
    "eval-device-tpu": (
        lambda w: [
            "eval",
            str(w.stories),
            "--task",
            "perplexity",
            "--data",
            w.data("eval.txt"),
            "--device",
            "tpu",
        ],
        r"tpu",
    ),
    "eval-device-no-cuda": (
        lambda w: [
            "eval",
            str(w.stories),
            "--task",
            "perplexity",
            "--data",
            w.data("eval.txt"),
            "--device",
            "cuda:7",
        ],
        r"cuda:7",
    ),
    "eval-foreign-code": (
        lambda w: ["eval", w.model("foreign"), "--task", "perplexity", "--data", w.data("eval.txt")],
        r"trust-remote-code",
    ),
    "eval-pickle": (
        lambda w: ["eval", w.model("pickled"), "--task", "perplexity", "--data", w.data("eval.txt")],
        r"allow.pickle",
    ),
    "eval-more-layers": (
        lambda w: ["eval", w.model("more-layers"), "--task", "perplexity", "--data", w.data("eval.txt")],
        r"model\.layers\.[56]",
    ),
    "eval-truncated": (
        lambda w: ["eval", w.model("truncated"), "--task", "perplexity", "--data", w.data("eval.txt")],
        r"(corrupt|truncated)",
    ),
    "eval-compare-missing": (
        lambda w: [
            "eval",
            str(w.stories),
            "--task",
            "perplexity",
            "--data",
            w.data("eval.txt"),
            "--compare",
            "no-original",
        ],
        r"no-original",
    ),
    "eval-data-empty": (
        lambda w: ["eval", str(w.stories), "--task", "perplexity", "--data", w.data("empty.txt")],
        r"empty\.txt",
    ),
    "eval-data-binary": (
        lambda w: ["eval", str(w.stories), "--task", "perplexity", "--data", w.data("binary.txt")],
        r"binary\.txt.*(UTF-8|binary)",
    ),
    "eval-data-utf16": (
        lambda w: ["eval", str(w.stories), "--task", "perplexity", "--data", w.data("utf16.txt")],
        r"utf16\.txt.*UTF-8",
    ),
    "eval-mc-bad-row": (
        lambda w: ["eval", str(w.stories), "--task", "multiple_choice", "--data", w.data("mc-bad.jsonl")],
        r"mc-bad\.jsonl:2",
    ),
    "eval-csv": (
        lambda w: ["eval", str(w.stories), "--task", "multiple_choice", "--data", w.data("table.csv")],
        r"table\.csv.*(unsupported|file type)",
    ),
    # ---- bench
    "bench-model-missing": (lambda w: ["bench", "no-model"], r"no-model"),
    "bench-vs-missing": (lambda w: ["bench", str(w.stories), "--vs", "no-original"], r"no-original"),
    "bench-seq-lens-0": (
        lambda w: ["bench", str(w.stories), "--seq-lens", "0"],
        r"--seq-lens: must be a positive",
    ),
    "bench-repeats-0": (
        lambda w: ["bench", str(w.stories), "--repeats", "0"],
        r"--repeats: must be a positive",
    ),
    "bench-decode-negative": (
        lambda w: ["bench", str(w.stories), "--decode-tokens", "-1"],
        r"--decode-tokens",
    ),
    "bench-warmup-negative": (lambda w: ["bench", str(w.stories), "--warmup", "-1"], r"--warmup"),
    "bench-encoder": (lambda w: ["bench", w.model("bert")], r"encoder classifier"),
    "bench-device-tpu": (lambda w: ["bench", str(w.stories), "--device", "tpu"], r"tpu"),
    "bench-foreign-code": (lambda w: ["bench", w.model("foreign")], r"trust-remote-code"),
    "bench-huge-config": (lambda w: ["bench", w.model("huge")], r"num_hidden_layers"),
    # ---- inspect
    "inspect-missing": (lambda w: ["inspect", "no-model"], r"no-model"),
    "inspect-no-config": (lambda w: ["inspect", w.model("no-config")], r"no-config"),
    "inspect-bad-config": (lambda w: ["inspect", w.model("bad-config")], r"bad-config"),
    "inspect-foreign-code": (lambda w: ["inspect", w.model("foreign")], r"trust-remote-code"),
    "inspect-huge-config": (lambda w: ["inspect", w.model("huge")], r"num_hidden_layers"),
    "inspect-unsupported": (lambda w: ["inspect", w.model("gpt2")], r"'gpt2' is not supported"),
    # ---- methods
    "methods-unknown": (lambda w: ["methods", "replace_me"], r"unknown method 'replace_me'"),
    # ---- push (each refused before any request)
    "push-not-an-output": (
        lambda w: ["push", str(w.stories), "--repo-id", "me/x"],
        r"not an hf-prune output \(no hf_prune\.json\)",
    ),
    "push-missing": (lambda w: ["push", "no-output", "--repo-id", "me/x"], r"no-output: no such folder"),
    "push-bad-repo-id": (
        lambda w: ["push", str(w.stories), "--repo-id", "me/a..b"],
        r"--repo-id: must be a Hub repo id ORG/NAME",
    ),
    "push-no-repo-id": (lambda w: ["push", str(w.stories)], r"--repo-id"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_exits_2_with_one_line_and_touches_nothing(name, ws, capsys, monkeypatch):
    build_argv, pattern = CASES[name]
    argv = [*build_argv(ws), "--quiet"]
    before = _snapshot(ws.root)
    monkeypatch.setattr("sys.stdin", _NoPrompt())
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse's usage errors
        code = exit_.code
    err = capsys.readouterr().err
    error_lines = [line for line in err.splitlines() if "error:" in line]
    assert code == 2, f"exit {code}, stderr:\n{err}"
    assert len(error_lines) == 1 and "Traceback" not in err, err
    assert error_lines[0].startswith(("error: ", "hf-prune ")), err
    assert re.search(pattern, error_lines[0]), f"{pattern!r} not in {error_lines[0]!r}"
    after = _snapshot(ws.root)
    assert after == before, f"files changed: {sorted(set(after.items()) ^ set(before.items()))[:5]}"
    assert not (ws.root / "FOREIGN_CODE_RAN").exists(), "a model folder's own code ran"


def test_the_suite_covers_every_command():
    commands = {
        build(Workspace(Path("/r"), Path("/r/s"), Path("/h"), Path("/w")))[0]
        for build, _ in CASES.values()
        if "recipe" not in build.__code__.co_names
        and "stage" not in build.__code__.co_names
        and "calib" not in build.__code__.co_names
    }
    assert {"eval", "bench", "inspect", "methods", "push"} <= commands and len(CASES) >= 60


def test_internal_errors_exit_1_and_traceback_only_with_debug(ws, capsys, monkeypatch):
    def broken(*args, **kwargs):
        raise ZeroDivisionError("planted")

    monkeypatch.setattr("hf_prune.cli._inspect", broken)
    assert main(["inspect", str(ws.stories)]) == 1
    err = capsys.readouterr().err
    assert err.strip() == (
        "internal error: ZeroDivisionError: planted (rerun with --debug for the traceback)"
    )
    assert main(["inspect", str(ws.stories), "--debug"]) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "ZeroDivisionError: planted" in err


def test_trust_remote_code_runs_the_code_only_when_asked(ws, capsys):
    assert main(["inspect", ws.model("foreign")]) == 2
    assert not (ws.root / "FOREIGN_CODE_RAN").exists()
    main(["inspect", ws.model("foreign"), "--trust-remote-code"])
    assert (ws.root / "FOREIGN_CODE_RAN").exists()
