"""The wheel ships every module of the four source roots, inside the ``hf_prune`` namespace only."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile

import pytest
from conftest import REPO_ROOT

SOURCE_ROOTS = {
    "hf_prune": "hf_prune",
    "integrations": "hf_prune/integrations",
    "model_patches": "hf_prune/model_patches",
    "evals": "hf_prune/evals",
}


@pytest.mark.slow
def test_wheel_holds_every_module_and_metric_file(tmp_path):
    # Built from a copy: setuptools builds in the source tree, and a stale build/ there would leak old files.
    source = tmp_path / "source"
    for root in SOURCE_ROOTS:
        shutil.copytree(REPO_ROOT / root, source / root, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("setup.py", "setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy(REPO_ROOT / name, source / name)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--wheel-dir",
            str(tmp_path),
            str(source),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = tmp_path.glob("hf_prune-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    # The one file outside the namespace: the hook that registers lm-eval's hf-prune model (setup.py).
    assert "hf_prune_lm_eval.pth" in names
    shipped = {name for name in names if name.endswith(".py")}
    expected = {
        f"{installed}/{path.relative_to(REPO_ROOT / folder).as_posix()}"
        for folder, installed in SOURCE_ROOTS.items()
        for path in (REPO_ROOT / folder).rglob("*.py")
        if "__pycache__" not in path.parts
    }
    assert any(
        name.startswith("hf_prune/evals/metrics/perplexity/") for name in expected
    )  # the walk saw them
    assert sorted(expected - shipped) == [], "modules left out of the wheel"
    assert sorted(shipped - expected) == [], "the wheel ships files that are not in the source roots"
