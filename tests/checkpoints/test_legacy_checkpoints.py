"""Checkpoints saved before the restructure of ``model_patches/`` (project issue 12) load with the current code
and compute what they computed when they were saved.

``tests/checkpoints/fixtures/legacy_checkpoints/<name>/`` holds one tiny checkpoint per remote-code family, saved by
``hf_prune.prune`` at an older commit (see the README there; never regenerate them), with fixed inputs and
the outputs of one forward pass (``expected.safetensors``) and what the save named (``expected.json``).
Every test works on a copy in tmp_path:

- after ``import hf_prune`` (this process): ``Auto*.from_pretrained(copy)`` gives hf_prune's own class for the
  stored ``model_type``, loads every weight in the file and misses none, and gives the stored outputs;
- in a fresh process that never imports hf_prune, with ``trust_remote_code=True``, twice: with the ``.py``
  files saved next to the weights (``saved_code``: what a machine without hf_prune runs), and with those files
  replaced by the current ``model_patches/`` ones (``current_code``: the new code as remote code, so the old
  ``auto_map`` must still name its modules and classes, and the old config keys and weight names must fit).
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import hf_prune.model_patches
import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import load_file

from hf_prune.checkpoint import load_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FIXTURES = Path(__file__).parent / "fixtures" / "legacy_checkpoints"
#: Today's remote code. (Importing it imported hf_prune, which registered the hf_prune_* classes.)
MODEL_PATCHES = Path(hf_prune.model_patches.__file__).parent
#: Every fixture, by name: a missing one fails (test_fixtures_all_there_and_small) rather than going untested.
NAMES = [
    "nonuniform_moe_mixtral",
    "nonuniform_moe_qwen2_moe",
    "prompt_llama_adtp",
    "prompt_llama_attention",
    "text_bert_adtp",
    "text_bert_attention",
    "text_distilbert_attention",
    "visual_llava_cdpruner",
    "visual_qwen2_vl_cdpruner",
]
ATOL = 1e-5
#: The issue's budget for all of them together (files' own sizes).
MAX_BYTES = 1024 * 1024
CODE_VARIANTS = ("saved_code", "current_code")


def forward_options(name: str) -> dict:
    """Keyword arguments of the forward besides the stored inputs. A prompt-pruned causal LM refuses a
    whole-sequence forward without a cache (issue 13), so its fixtures run as a prefill (``use_cache=True``):
    with the code they were saved with that is the same prefill, so the stored outputs still apply."""
    return {"use_cache": True} if name.startswith("prompt_") else {}


def expected(folder: Path) -> tuple[dict, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(expected.json, the forward's keyword arguments, the outputs it gave when saved)."""
    meta = json.loads((folder / "expected.json").read_text())
    tensors = load_file(folder / "expected.safetensors")
    split = {
        prefix: {k[len(prefix) + 1 :]: v for k, v in tensors.items() if k.startswith(prefix + ".")}
        for prefix in ("inputs", "outputs")
    }
    assert sorted(split["inputs"]) == meta["inputs"] and sorted(split["outputs"]) == meta["outputs"]
    return meta, split["inputs"], split["outputs"]


def assert_same_outputs(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], name: str) -> None:
    assert sorted(got) == sorted(want), f"{name}: outputs {sorted(got)}, saved with {sorted(want)}"
    for key, value in want.items():
        if value.is_floating_point():
            torch.testing.assert_close(
                got[key], value, atol=ATOL, rtol=0, msg=lambda m, k=key: f"{name}.{k}: {m}"
            )
        else:  # kept-token masks: exactly the same tokens
            assert torch.equal(got[key], value), f"{name}.{key}: {got[key].tolist()} != {value.tolist()}"


def weight_name_problems(model, folder: Path) -> dict[str, list[str]]:
    """Saved keys the model has no place for, and model keys the file lacks (transformers would fill those
    randomly, with only a log line). By hand: ``output_loading_info=True`` breaks the visual classes'
    ``from_pretrained`` (it returns a tuple to their override)."""
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        saved = set(f.keys())
    wanted = set(model.state_dict())
    return {k: sorted(v) for k, v in (("unexpected", saved - wanted), ("missing", wanted - saved)) if v}


@pytest.fixture(scope="module")
def copies(tmp_path_factory) -> Path:
    """A copy of every fixture (never load, and so never write, inside tests/fixtures)."""
    root = tmp_path_factory.mktemp("legacy") / "saved_code"
    shutil.copytree(FIXTURES, root)
    return root


def test_fixtures_all_there_and_small():
    assert sorted(p.name for p in FIXTURES.iterdir() if p.is_dir()) == NAMES
    total = sum(p.stat().st_size for p in FIXTURES.rglob("*") if p.is_file())
    assert total < MAX_BYTES, f"legacy checkpoints take {total} bytes, over the {MAX_BYTES} budget"


@pytest.mark.parametrize("name", NAMES)
def test_loads_after_import_hf_prune(copies, name):
    folder = copies / name
    meta, inputs, want = expected(folder)
    auto = getattr(transformers, meta["auto_class"])
    # What a user's plain from_pretrained(folder) does once `import hf_prune` has registered the model_type
    # (transformers then takes the registered class without asking); False fails cleanly where it has not.
    model = auto.from_pretrained(folder, trust_remote_code=False).eval()
    assert model.config.model_type == meta["model_type"]
    assert type(model).__module__.startswith("hf_prune."), (
        f"{name}: loaded {type(model)}, not hf_prune's class"
    )
    assert not (problems := weight_name_problems(model, folder)), (
        f"{name}: weights not loaded cleanly: {problems}"
    )
    with torch.no_grad():
        out = model(**inputs, **forward_options(name))
    assert_same_outputs({key: getattr(out, key) for key in want}, want, name)
    # hf-prune's own loader (eval, bench) asks transformers for the loading info and refuses any mismatch.
    model = load_model(str(folder), auto_class=auto, dtype="float32", device="cpu")
    with torch.no_grad():
        out = model(**inputs, **forward_options(name))
    assert_same_outputs({key: getattr(out, key) for key in want}, want, name)


# ---- fresh processes without hf_prune ------------------------------------------------------------

RELOAD = r"""
import json, sys, traceback
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers.dynamic_module_utils import get_class_from_dynamic_module

torch.set_num_threads(1)
spec = json.load(open(sys.argv[1]))
results = {}
for name, case in spec.items():
    try:
        folder = case["folder"]
        # Every class the saved auto_map names, from this folder's own modules. (from_pretrained alone would not
        # show it for a second fixture of one model_type: transformers then takes the class the first one's
        # module registered. All folders in one process carry the same code, so that loses nothing else.)
        auto_map = json.load(open(folder + "/config.json"))["auto_map"]
        named = {key: get_class_from_dynamic_module(ref, folder).__name__ for key, ref in sorted(auto_map.items())}
        model = getattr(transformers, case["auto_class"]).from_pretrained(folder, trust_remote_code=True).eval()
        tensors = load_file(folder + "/expected.safetensors")
        inputs = {k[len("inputs."):]: v for k, v in tensors.items() if k.startswith("inputs.")}
        with torch.no_grad():
            out = model(**inputs, **case["forward_options"])
        save_file({k: getattr(out, k).contiguous() for k in case["outputs"]}, case["result"])
        with safe_open(folder + "/model.safetensors", "pt") as f:
            saved = set(f.keys())
        wanted = set(model.state_dict())
        results[name] = {"auto_map": named, "class": type(model).__name__, "module": type(model).__module__,
                         "model_type": model.config.model_type,
                         "unexpected": sorted(saved - wanted), "missing": sorted(wanted - saved)}
    except Exception:
        results[name] = {"error": traceback.format_exc()}
results["_hf_prune_modules"] = sorted(m for m in sys.modules if m.split(".")[0] == "hf_prune")
json.dump(results, open(sys.argv[2], "w"))
"""


def with_current_code(source: Path, target: Path) -> Path:
    """A copy of ``source`` whose remote code is today's ``model_patches/``: every module file replaced (and any
    new sibling module added), config.json and its ``auto_map`` as saved."""
    shutil.copytree(source, target)
    current = {p.name: p for p in MODEL_PATCHES.glob("*.py") if p.name != "__init__.py"}
    meta = json.loads((source / "expected.json").read_text())
    named = {ref.split(".")[0] + ".py" for ref in meta["auto_map"].values()}
    gone = sorted(named - set(current))
    assert not gone, (
        f"{source.name}: its auto_map names {gone}, no longer in model_patches/: old checkpoints "
        "refreshed with the new remote code could not find their classes"
    )
    for path in current.values():
        shutil.copyfile(path, target / path.name)
    return target


@pytest.fixture(scope="module")
def reloaded(copies, tmp_path_factory) -> dict[str, tuple[dict, Path]]:
    """{variant: (results by fixture name, folder of the outputs)}: one fresh process per variant, side by side,
    each loading every fixture with trust_remote_code=True."""
    work = tmp_path_factory.mktemp("legacy-reload")
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_EVALUATE_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "1",
    }
    runs = {}
    for variant in CODE_VARIANTS:
        spec = {}
        (work / variant / "out").mkdir(parents=True)
        for name in NAMES:
            folder = (
                copies / name
                if variant == "saved_code"
                else with_current_code(copies / name, work / variant / name)
            )
            meta = json.loads((folder / "expected.json").read_text())
            spec[name] = {
                "folder": str(folder),
                "auto_class": meta["auto_class"],
                "outputs": meta["outputs"],
                "forward_options": forward_options(name),
                "result": str(work / variant / "out" / f"{name}.safetensors"),
            }
        (work / variant / "spec.json").write_text(json.dumps(spec))
        runs[variant] = subprocess.Popen(
            [
                sys.executable,
                "-c",
                RELOAD,
                str(work / variant / "spec.json"),
                str(work / variant / "results.json"),
            ],
            cwd=work,
            text=True,
            env={**env, "HF_MODULES_CACHE": str(work / variant / "modules")},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
    results = {}
    for variant, run in runs.items():
        stdout, stderr = run.communicate(timeout=300)
        assert run.returncode == 0, f"{variant} process failed:\n{stdout[-2000:]}\n{stderr[-4000:]}"
        results[variant] = (json.loads((work / variant / "results.json").read_text()), work / variant / "out")
    return results


@pytest.mark.slow
@pytest.mark.parametrize("variant", CODE_VARIANTS)
@pytest.mark.parametrize("name", NAMES)
def test_loads_as_remote_code_without_hf_prune(copies, reloaded, name, variant):
    results, out = reloaded[variant]
    assert results["_hf_prune_modules"] == [], "the fresh process imported hf_prune"
    got = results[name]
    assert "error" not in got, f"{name} ({variant}):\n{got.get('error')}"
    meta, _, want = expected(copies / name)
    assert got["module"].startswith("transformers_modules."), f"{name}: not the remote code: {got['module']}"
    assert sorted(got["auto_map"]) == sorted(meta["auto_map"]), f"{name}: {got['auto_map']}"
    assert got["model_type"] == meta["model_type"], f"{name}: loaded as {got}"
    assert not got["unexpected"] and not got["missing"], f"{name}: weights not loaded cleanly: {got}"
    assert_same_outputs(load_file(out / f"{name}.safetensors"), want, f"{name} ({variant})")
