"""A save never destroys what is not an earlier hf-prune output, survives kill -9, and writes only finite
weights and strict JSON.

Every refusal test runs with model loading forbidden: a refusal must come before weights load, and a check
that failed to refuse could then never get as far as replacing a real folder.
"""

from __future__ import annotations

import json
import logging
import os
import select
import shutil
import signal
import sys
import time
import traceback
import types
from pathlib import Path

import pytest
import torch
import yaml
from tiny_models import tiny_llama_folder
from transformers import AutoModelForCausalLM

import hf_prune
from hf_prune import RecipeError
from hf_prune.checkpoint import atomic_write_dir, save_pruned_model
from hf_prune.cli import main
from hf_prune.errors import HfPruneError
from hf_prune.output_safety import (
    REPORT_FILE,
    check_output_folder,
    format_bytes,
    save_lock,
    strict_json_dumps,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

OVERWRITE_HINT = "--overwrite"
CHOOSE_ANOTHER = "choose another output folder"


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return tiny_llama_folder(tmp_path_factory.mktemp("source") / "tiny-llama")


@pytest.fixture
def no_model_loading(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the output folder was checked")

    monkeypatch.setattr("hf_prune.pipeline.load_model", refuse)


def layer_drop_recipe(source, output, **changes):
    return {
        "model": str(source),
        "output": str(output),
        "stages": [{"method": "layer_drop", "layers": [1, 1]}],
        **changes,
    }


def tree(folder: Path) -> dict[str, bytes | None]:
    """Every path under ``folder`` (hidden ones too) with its bytes (None for a folder)."""
    return {
        str(p.relative_to(folder)): None if p.is_dir() else p.read_bytes() for p in sorted(folder.rglob("*"))
    }


def leftovers(folder: Path, name: str = "out") -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith((f".{name}.tmp-", f".{name}.old-")))


def earlier_output(folder: Path, version: str = "old") -> Path:
    """A folder that looks like an earlier hf-prune output (it holds hf_prune.json)."""
    folder.mkdir(parents=True)
    (folder / REPORT_FILE).write_text(json.dumps({"version": version}))
    (folder / "model.safetensors").write_bytes(b"old weights")
    return folder


# ---- refusals before any work ---------------------------------------------------------------------------


def test_existing_user_folder_is_refused_without_overwrite(tmp_path, source, no_model_loading):
    documents = tmp_path / "out"
    documents.mkdir()
    (documents / "thesis.txt").write_text("four years of work")
    before = tree(tmp_path)
    with pytest.raises(RecipeError) as error:
        hf_prune.prune(layer_drop_recipe(source, documents))
    message = str(error.value)
    assert message.startswith(f"output: {documents} already exists and is not an earlier hf-prune output")
    assert OVERWRITE_HINT in message and "overwrite: true" in message and "\n" not in message
    assert tree(tmp_path) == before  # nothing deleted, nothing written beside it


def test_existing_user_folder_is_refused_for_a_model_in_memory(tmp_path, source):
    documents = tmp_path / "out"
    documents.mkdir()
    (documents / "thesis.txt").write_text("four years of work")
    model = AutoModelForCausalLM.from_pretrained(source)
    with pytest.raises(RecipeError, match=f"output: {documents} already exists"):
        hf_prune.prune(
            model, {"output": str(documents), "stages": [{"method": "layer_drop", "layers": [1, 1]}]}
        )
    assert (documents / "thesis.txt").read_text() == "four years of work"


def _never_replaced_case(case: str, tmp_path: Path, monkeypatch) -> tuple[dict, Path | None, Path, str]:
    """(recipe changes, the recipe file to write or None, the folder a save would replace, what the message
    says it is). The data and recipe folders look like earlier outputs: even those are never replaced."""
    data = earlier_output(tmp_path / "data")
    (data / "calib.txt").write_text("Once upon a time there was a cat.\n")
    work = tmp_path / "work" / "project"
    work.mkdir(parents=True)
    (work / "notes.md").write_text("my notes")
    monkeypatch.chdir(work)
    (tmp_path / "home" / "me" / ".ssh").mkdir(parents=True)
    (tmp_path / "home" / "me" / ".ssh" / "id_ed25519").write_text("secret key")
    monkeypatch.setenv("HOME", str(tmp_path / "home" / "me"))
    if case == "working folder":
        return {"output": "."}, None, work, "is the current working folder"
    if case == "ancestor of the working folder":
        return {"output": ".."}, None, work.parent, "contains the current working folder"
    if case == "home folder":
        return {"output": "~"}, None, tmp_path / "home" / "me", "is your home folder"
    if case == "ancestor of the home folder":
        return {"output": str(tmp_path / "home")}, None, tmp_path / "home", "contains your home folder"
    if case == "recipe folder":
        recipes = earlier_output(tmp_path / "recipes")
        return {"output": str(recipes)}, recipes / "recipe.yaml", recipes, "contains the recipe file"
    if case == "calibration data folder":
        return (
            {"output": str(data), "calibration": {"data": str(data / "calib.txt")}},
            None,
            data,
            "contains calibration.data",
        )
    if case == "evaluation data folder":
        return (
            {"output": str(data), "evaluate": [{"task": "perplexity", "data": str(data / "calib.txt")}]},
            None,
            data,
            "contains evaluate[0].data",
        )
    if case == "stage training data folder":
        stage = {
            "method": "text_token_pruning",
            "algorithm": "fixed",
            "keep_ratio": 0.5,
            "train_data": str(data / "calib.txt"),
            "train_steps": 1,
        }
        return {"output": str(data), "stages": [stage]}, None, data, "contains stages[0].train_data"
    raise AssertionError(case)


NEVER_REPLACED = [
    "working folder",
    "ancestor of the working folder",
    "home folder",
    "ancestor of the home folder",
    "recipe folder",
    "calibration data folder",
    "evaluation data folder",
    "stage training data folder",
]


@pytest.mark.parametrize("overwrite", [False, True], ids=["plain", "overwrite"])
@pytest.mark.parametrize("case", NEVER_REPLACED)
def test_folders_that_are_never_replaced(case, overwrite, tmp_path, source, monkeypatch, no_model_loading):
    changes, recipe_file, replaced, relation = _never_replaced_case(case, tmp_path, monkeypatch)
    recipe = {**layer_drop_recipe(source, "unused"), **changes}
    if recipe_file is not None:
        recipe_file.write_text(yaml.safe_dump(recipe))
    before = tree(tmp_path)
    with pytest.raises(RecipeError) as error:
        hf_prune.prune(recipe_file or recipe, overwrite=overwrite)
    message = str(error.value)
    assert message.startswith(f"output: {changes['output']}") and str(replaced.resolve()) in message
    assert relation in message
    assert CHOOSE_ANOTHER in message and "--overwrite never replaces it" in message and "\n" not in message
    assert tree(tmp_path) == before


def test_filesystem_root_is_never_replaced():
    with pytest.raises(RecipeError, match=f"^output: / is the filesystem root; {CHOOSE_ANOTHER}"):
        check_output_folder("/", overwrite=True)


def test_output_that_is_a_file_is_refused(tmp_path, source, no_model_loading):
    (tmp_path / "out").write_text("a file")
    with pytest.raises(RecipeError, match="output: .*out exists and is not a folder"):
        hf_prune.prune(layer_drop_recipe(source, tmp_path / "out"), overwrite=True)
    assert (tmp_path / "out").read_text() == "a file"


def test_cli_refuses_an_existing_folder_in_one_line(tmp_path, source, capsys, monkeypatch):
    documents = tmp_path / "out"
    documents.mkdir()
    (documents / "thesis.txt").write_text("four years of work")
    recipe_file = tmp_path / "recipes" / "recipe.yaml"
    recipe_file.parent.mkdir()
    recipe_file.write_text(yaml.safe_dump(layer_drop_recipe(source, documents)))
    with monkeypatch.context() as patch:
        patch.setattr("hf_prune.pipeline.load_model", lambda *a, **k: pytest.fail("loaded the model"))
        assert main(["prune", str(recipe_file), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: output: {documents} already exists") and err.count("\n") == 1
    assert "--overwrite" in err
    assert (documents / "thesis.txt").read_text() == "four years of work"
    # The way out works: --overwrite replaces the folder with the pruned model.
    assert main(["prune", str(recipe_file), "--quiet", "--overwrite"]) == 0
    assert (documents / REPORT_FILE).is_file() and not (documents / "thesis.txt").exists()
    assert leftovers(tmp_path) == []


# ---- what may be replaced ------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["argument", "recipe key"])
def test_overwrite_replaces_a_plain_folder_and_a_rerun_needs_no_overwrite(how, tmp_path, source):
    documents = tmp_path / "out"
    documents.mkdir()
    (documents / "scratch.txt").write_text("disposable")
    if how == "argument":
        hf_prune.prune(layer_drop_recipe(source, documents), overwrite=True, progress=False)
    else:
        hf_prune.prune(layer_drop_recipe(source, documents, overwrite=True), progress=False)
    assert not (documents / "scratch.txt").exists() and (documents / REPORT_FILE).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # replaced by a rename: no temporaries left
    first = json.loads((documents / REPORT_FILE).read_text())["created"]
    time.sleep(1.01)  # "created" has one-second resolution
    result = hf_prune.prune(
        layer_drop_recipe(source, documents), progress=False
    )  # an earlier output: no flag
    assert json.loads((documents / REPORT_FILE).read_text())["created"] != first
    assert AutoModelForCausalLM.from_pretrained(result.output).config.num_hidden_layers == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_an_empty_existing_folder_needs_no_overwrite(tmp_path, source):
    (tmp_path / "out").mkdir()
    hf_prune.prune(layer_drop_recipe(source, tmp_path / "out"), progress=False)
    assert (tmp_path / "out" / REPORT_FILE).is_file()


# ---- room to write -------------------------------------------------------------------------------------


def test_unwritable_output_folder_is_refused_before_loading(tmp_path, source, no_model_loading):
    if os.geteuid() == 0:
        # Root writes through permission bits, so use a kernel folder nobody may create folders in.
        parent = Path("/sys")
        if not parent.is_dir() or sys.platform != "linux":
            pytest.skip("running as root without /sys: no folder root cannot write to")
    else:
        parent = tmp_path / "read-only"
        parent.mkdir()
        parent.chmod(0o555)
    output = parent / "hf-prune-test-output" / "pruned"
    try:
        with pytest.raises(
            RecipeError, match=f"output: {output} cannot be written: {parent} is not writable"
        ):
            hf_prune.prune(layer_drop_recipe(source, output))
    finally:
        if parent.is_relative_to(tmp_path):
            parent.chmod(0o755)
    assert not output.parent.exists()


def test_too_little_free_disk_space_is_refused_naming_both_sizes(
    tmp_path, source, monkeypatch, no_model_loading
):
    weights = (source / "model.safetensors").stat().st_size
    free = weights // 2
    seen = []

    def disk_usage(path):
        seen.append(Path(path))
        return shutil._ntuple_diskusage(10 * weights, 10 * weights - free, free)

    monkeypatch.setattr("hf_prune.output_safety.shutil.disk_usage", disk_usage)
    output = tmp_path / "not" / "yet" / "there"
    with pytest.raises(RecipeError) as error:
        hf_prune.prune(layer_drop_recipe(source, output))
    message = str(error.value)
    assert message.startswith("output: not enough free disk space")
    assert (
        f"{format_bytes(free)} free in {tmp_path}" in message
        and f"needs about {format_bytes(weights)}" in message
    )
    assert seen == [tmp_path]  # the nearest folder that exists: the output's parents are made by the save
    assert list(tmp_path.iterdir()) == []


# ---- leftovers of a killed save ------------------------------------------------------------------------


def test_stale_temporary_folders_are_removed_by_the_next_save(tmp_path, caplog):
    target = tmp_path / "out"
    atomic_write_dir(target, lambda folder: (folder / "weights").write_text("v1"))
    stale = [tmp_path / ".out.tmp-deadbeef", tmp_path / ".out.old-cafebabe"]
    for folder in stale:
        folder.mkdir()
        (folder / "junk.safetensors").write_bytes(b"\0" * 1000)
    # Not ours: other targets, other names, a file, and a folder a running save holds locked.
    kept = [
        tmp_path / ".out2.tmp-deadbeef",
        tmp_path / ".out.tmp-deadbeef0",
        tmp_path / ".out.tmp-notes",
        tmp_path / "out.tmp-deadbeef",
        tmp_path / ".out.tmp-0badc0de",
    ]
    for folder in kept:
        folder.mkdir()
    (tmp_path / ".out.old-12345678").write_text("a file, not a folder")
    kept.append(tmp_path / ".out.old-12345678")
    with caplog.at_level(logging.WARNING, logger="hf_prune"), save_lock(tmp_path / ".out.tmp-0badc0de"):
        atomic_write_dir(target, lambda folder: (folder / "weights").write_text("v2"))
    assert (target / "weights").read_text() == "v2"
    assert not any(folder.exists() for folder in stale)
    assert all(path.exists() for path in kept)
    for folder in stale:
        assert f"removed stale temporary folder {folder}" in caplog.text
    assert ".out.tmp-0badc0de" not in caplog.text


def test_previous_output_kept_only_beside_the_target_is_restored(tmp_path, caplog):
    # A save killed between its two renames leaves the previous output as .out.old-* and no out.
    old = tmp_path / ".out.old-cafebabe"
    old.mkdir()
    (old / "weights").write_text("v1")

    def crash(folder):
        raise OSError("disk full")

    with caplog.at_level(logging.WARNING, logger="hf_prune"), pytest.raises(OSError, match="disk full"):
        atomic_write_dir(tmp_path / "out", crash)
    assert (tmp_path / "out" / "weights").read_text() == "v1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert f"restored {tmp_path / 'out'} from .out.old-cafebabe" in caplog.text


#: Where the saving child is killed, and which output that leaves: before the save, just as the weights start
#: to be written (the child does not pause there: the kill races the real write, so either output may remain),
#: with the weights written but not the rest, between the two renames of the swap (no output: the old one
#: waits beside it), while the old output is being deleted, after the save.
KILL_POINTS = {
    "start": "old",
    "writing": "old or new",
    "weights written": "old",
    "between renames": None,
    "removing old": "new",
    "done": "new",
}
RACING = "writing"


def _report(version: str, target: Path, params: int) -> dict:
    return {
        "recipe": {"model": None, "output": str(target)},
        "stages": [],
        "params_before": params,
        "params_after": params,
        "evaluation": [],
        "version": version,
    }


def _save_and_stop_at(model, target: Path, stop_at: str, pipe: int) -> None:
    """Child: save version "new" over ``target``, announcing each step on ``pipe`` and sleeping at ``stop_at``."""
    import hf_prune.checkpoint as checkpoint

    def reached(point: str) -> None:
        os.write(pipe, f"{point}\n".encode())
        if point == stop_at and point != RACING:
            time.sleep(60)  # the parent kills us here

    def save_pretrained(folder, **kwargs):
        reached("writing")
        real_save_pretrained(folder, **kwargs)
        reached("weights written")

    def replace(src, dst):
        os.replace(src, dst)
        if Path(src) == target:
            reached("between renames")

    def rmtree(path, **kwargs):
        reached("removing old")
        shutil.rmtree(path, **kwargs)

    real_save_pretrained = model.save_pretrained
    model.save_pretrained = save_pretrained
    # Only the save's own renames and deletions are instrumented, not the clean-up of leftovers.
    checkpoint.os = types.SimpleNamespace(**{**vars(os), "replace": replace})
    checkpoint.shutil = types.SimpleNamespace(**{**vars(shutil), "rmtree": rmtree})
    reached("start")
    save_pruned_model(model, None, target, _report("new", target, 1))
    reached("done")


def _read_until(pipe: int, point: str, timeout: float = 60) -> None:
    seen = b""
    deadline = time.monotonic() + timeout
    while f"{point}\n".encode() not in seen:
        ready, _, _ = select.select([pipe], [], [], max(0.0, deadline - time.monotonic()))
        chunk = os.read(pipe, 4096) if ready else b""
        if not chunk:
            raise AssertionError(f"the saving child never reached {point!r} (saw {seen.decode()!r})")
        seen += chunk


def _version(target: Path) -> str | None:
    return json.loads((target / REPORT_FILE).read_text())["version"] if target.exists() else None


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork to kill a saving process")
def test_kill_9_during_a_save_leaves_the_old_or_new_output(tmp_path, source):
    target = tmp_path / "out"
    model = AutoModelForCausalLM.from_pretrained(source)
    params = sum(p.numel() for p in model.parameters())
    for stop_at, expected in KILL_POINTS.items():
        save_pruned_model(
            model, None, target, _report("old", target, params)
        )  # also clears the last kill's mess
        assert _version(target) == "old" and leftovers(tmp_path) == []
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child never returns into pytest
            code = 1
            try:
                os.close(read_end)
                _save_and_stop_at(model, target, stop_at, write_end)
                code = 0
            except BaseException:  # shown in the parent's failure message
                os.write(write_end, traceback.format_exc().encode())
            finally:
                os._exit(code)
        os.close(write_end)
        try:
            _read_until(read_end, stop_at)
        finally:
            os.kill(pid, signal.SIGKILL)
            _, status = os.waitpid(pid, 0)
            os.close(read_end)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        version = _version(target)
        if stop_at == RACING:  # either is fine (or none, the old one beside it), but never a broken folder
            assert version in ("old", "new", None), stop_at
        else:
            assert version == expected, stop_at
        if version is not None:
            assert AutoModelForCausalLM.from_pretrained(target).config.num_hidden_layers == 3
        else:  # killed between the renames: the old output waits beside the target
            assert any(name.startswith(".out.old-") for name in leftovers(tmp_path))
        if stop_at in ("weights written", "between renames", "removing old"):
            assert leftovers(tmp_path), f"{stop_at}: expected the kill to leave temporaries behind"
    save_pruned_model(model, None, target, _report("final", target, params))
    assert _version(target) == "final" and leftovers(tmp_path) == []
    assert AutoModelForCausalLM.from_pretrained(target).config.num_hidden_layers == 3


# ---- what is written -----------------------------------------------------------------------------------


def test_nan_weights_are_refused_and_the_previous_output_kept(tmp_path, source):
    target = tmp_path / "out"
    model = AutoModelForCausalLM.from_pretrained(source)
    save_pruned_model(model, None, target, _report("old", target, 1))
    before = tree(tmp_path)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, :3] = float("nan")
        model.model.layers[2].self_attn.q_proj.weight[1, 1] = float("inf")
    with pytest.raises(
        HfPruneError,
        match=r"^model\.layers\.1\.mlp\.down_proj\.weight holds 3 NaN/inf values "
        r"\(and 1 more tensors\); nothing was saved",
    ):
        save_pruned_model(model, None, target, _report("new", target, 1))
    assert tree(tmp_path) == before


def test_a_stage_producing_nan_saves_nothing(tmp_path):
    from tiny_models import save_tiny_model, write_calibration_file

    source = save_tiny_model("llama", tmp_path / "src")
    calibration = write_calibration_file(tmp_path / "calib.txt", 4000)
    output = earlier_output(tmp_path / "out")
    before = tree(output)
    # Adam steps of ~lr each: a few of them overflow float32 in the folded down projection.
    stage = {"method": "replaceme", "num_layers": 1, "estimator": "cosine", "lr": 3e37, "epochs": 5}
    recipe = {
        "model": str(source),
        "output": str(output),
        "stages": [stage],
        "calibration": {"data": str(calibration), "num_samples": 4, "seq_len": 32},
    }
    with pytest.raises(
        HfPruneError,
        match=r"model\.layers\.\d+\.mlp\.down_proj\.weight holds \d+ NaN/inf values.*"
        r"nothing was saved",
    ):
        hf_prune.prune(recipe, progress=False)
    assert tree(output) == before and leftovers(tmp_path) == []


def _strict(text: str):
    def refuse(constant):
        raise ValueError(f"not strict JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


def test_hf_prune_json_is_strict_json(tmp_path, source):
    model = AutoModelForCausalLM.from_pretrained(source)
    report = _report("new", tmp_path / "out", 1)
    report["stages"] = [
        {
            "method": "replaceme",
            "relative_error": float("nan"),
            "distances": [0.5, float("inf")],
            "tensor": torch.tensor([1.0, float("-inf")]),
        }
    ]
    save_pruned_model(model, None, tmp_path / "out", report)
    saved = _strict((tmp_path / "out" / REPORT_FILE).read_text())
    assert saved["stages"][0]["relative_error"] is None
    assert saved["stages"][0]["distances"] == [0.5, None] and saved["stages"][0]["tensor"] == [1.0, None]
    assert _strict(strict_json_dumps({"x": (float("nan"), 1.5)})) == {"x": [None, 1.5]}


def test_a_model_built_in_memory_saves_below_the_working_folder(tmp_path, monkeypatch):
    """A model built from a config has no folder (``name_or_path == ""``): nothing to protect, so an output
    under the working folder is fine (an empty name once counted as the working folder itself)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=64,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=3,
            num_attention_heads=2,
            num_key_value_heads=1,
        )
    )
    assert model.name_or_path == ""
    monkeypatch.chdir(tmp_path)
    result = hf_prune.prune(
        model, {"output": "pruned", "stages": [{"method": "layer_drop", "layers": [1, 1]}]}, progress=False
    )
    assert result.output == tmp_path / "pruned"
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "pruned").config.num_hidden_layers == 2


def test_a_stage_choice_named_like_the_output_folder_is_no_path(
    tmp_path, source, monkeypatch, no_model_loading
):
    """`algorithm: adtp` with an earlier output folder `adtp` in the working folder: the word is a choice,
    not the folder, so replacing the earlier output is allowed (it used to be refused as "is
    stages[0].algorithm")."""
    monkeypatch.chdir(tmp_path)
    earlier_output(tmp_path / "random")
    stage = {"method": "text_token_pruning", "algorithm": "random", "keep_ratio": 0.5, "layer": 1}
    recipe = {**layer_drop_recipe(source, "random"), "stages": [stage]}
    with pytest.raises(AssertionError, match="the model was loaded"):  # past every output check
        hf_prune.prune(recipe)
