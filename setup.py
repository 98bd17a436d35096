"""Packages are found, not listed: every folder with an ``__init__.py`` under the four source roots ships.

``hf_prune/``, ``integrations/``, ``model_patches/`` and ``evals/`` all install inside the ``hf_prune``
namespace (DESIGN.md §1); nothing installs as a top-level ``integrations`` or ``evals``.

One file more goes to the root of site-packages: ``hf_prune_lm_eval.pth``, built from
``integrations/lm_eval_hook.py``, which registers the ``hf-prune`` model with lm-evaluation-harness when (and
only when) a process imports ``lm_eval.models`` (see that module). It ships in the regular wheel
(``build_py``) and in the editable wheel of ``pip install -e`` (``editable_wheel``, PEP 660).
"""

import ast
import base64
import hashlib
import os
import zipfile
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py
from setuptools.command.editable_wheel import editable_wheel

SOURCE_ROOTS = {
    "hf_prune": "hf_prune",
    "hf_prune.integrations": "integrations",
    "hf_prune.model_patches": "model_patches",
    "hf_prune.evals": "evals",
}
PTH_NAME = "hf_prune_lm_eval.pth"
HOOK_SOURCE = Path(__file__).resolve().parent / "integrations" / "lm_eval_hook.py"

packages = []
for package, folder in SOURCE_ROOTS.items():
    packages += [
        package,
        *(f"{package}.{sub}" for sub in find_packages(folder) if not sub.startswith("hf_prune")),
    ]


def pth_line() -> str:
    """The hook's code (docstrings and comments dropped) run by ``site`` at start-up: one ``import`` line."""
    tree = ast.parse(HOOK_SOURCE.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr):
            if isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
                body[0] = ast.Pass()  # a docstring
    code = ast.unparse(tree) + "\ninstall()\n"
    return f"import sys; exec({code!r}, {{'__name__': 'hf_prune_lm_eval_pth'}})\n"


class BuildPyWithPth(build_py):
    def run(self):
        super().run()
        if not getattr(self, "editable_mode", False):
            target = os.path.join(self.build_lib, PTH_NAME)
            Path(target).write_text(pth_line(), encoding="utf-8")


class EditableWheelWithPth(editable_wheel):
    def run(self):
        super().run()
        for wheel in Path(self.dist_dir).glob("*.whl"):
            add_to_wheel(wheel, PTH_NAME, pth_line().encode())


def add_to_wheel(wheel: Path, name: str, data: bytes) -> None:
    """Rewrite ``wheel`` with one more root file, listed in its RECORD (so pip uninstalls it too)."""
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    with zipfile.ZipFile(wheel) as source:
        if name in source.namelist():
            return
    rewritten = wheel.with_suffix(".tmp")
    with zipfile.ZipFile(wheel) as source, zipfile.ZipFile(rewritten, "w", zipfile.ZIP_DEFLATED) as target:
        for item in source.infolist():
            payload = source.read(item.filename)
            if item.filename.endswith(".dist-info/RECORD"):
                payload = payload.rstrip(b"\n") + f"\n{name},sha256={digest},{len(data)}\n".encode()
            target.writestr(item, payload)
        target.writestr(name, data)
    os.replace(rewritten, wheel)


setup(
    package_dir=SOURCE_ROOTS,
    packages=packages,
    cmdclass={"build_py": BuildPyWithPth, "editable_wheel": EditableWheelWithPth},
)
