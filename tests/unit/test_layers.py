"""The layer rules of DESIGN.md §1, read from the source with ``ast`` (nothing is imported).

(1) ``model_patches`` imports only torch, transformers, the standard library and its own siblings (relative
imports), so each file can travel next to a checkpoint as remote code; (2) the core of ``hf_prune`` (all of
``hf_prune/`` but the pipeline, the CLI and ``demo.py``) never imports ``evals``,
``integrations`` or those top-layer modules; (3) ``evals`` and ``integrations`` never import the top layer;
lab code (``evals/testbeds/``, ``evals/benchmarks/``) is imported by nothing in the product, and only the
benchmarks may use the pipeline. Imports inside functions count too.
"""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
#: Source folder → the package it installs as (setup.py's SOURCE_ROOTS).
SOURCE_ROOTS = {
    "hf_prune": "hf_prune",
    "integrations": "hf_prune.integrations",
    "model_patches": "hf_prune.model_patches",
    "evals": "hf_prune.evals",
}

TOP_LAYER = (
    "hf_prune.pipeline",
    "hf_prune.train_pipeline",
    "hf_prune.cli",
    "hf_prune.cli_graphon",
    "hf_prune.cli_eval",
    "hf_prune.demo",
    "hf_prune.__main__",  # python -m hf_prune: the command line (torchrun -m hf_prune prune ...)
)
LAB = ("hf_prune.evals.testbeds", "hf_prune.evals.benchmarks")
MODEL_PATCHES_ALLOWED = {"torch", "transformers"} | set(sys.stdlib_module_names)

#: Imports that break a rule today on purpose, each with its reason: (importing module, imported name).
#: Lab code never goes here: a product module that needs a testbed or a benchmark is a bug.
ALLOWED = {
    # ``hf_prune.prune`` (the one-function API of the README) is a lazy module ``__getattr__`` that imports
    # the pipeline on first use, so that ``import hf_prune`` stays light; the core itself never calls it.
    ("hf_prune", "hf_prune.pipeline"),
    # ``hf_prune.PruningCallback`` (issue 15 asks for it at the top level) is the same kind of lazy
    # ``__getattr__``, to the Trainer glue in integrations.
    ("hf_prune", "hf_prune.integrations.pruning_callback"),
    ("hf_prune", "hf_prune.integrations.pruning_callback.PruningCallback"),
}


@dataclass(frozen=True)
class Import:
    module: str  # the importing module, e.g. hf_prune.evals.testbeds.moe_testbed
    path: str  # its file, relative to the repository
    line: int
    names: tuple[str, ...]  # absolute names it may bind: the module and, for ``from X import y``, also X.y


def module_name(path: Path) -> tuple[str, bool]:
    """(dotted module name, whether it is a package ``__init__``) of a source file."""
    rel = path.relative_to(REPO)
    parts = [SOURCE_ROOTS[rel.parts[0]], *rel.parts[1:-1]]
    is_package = path.name == "__init__.py"
    if not is_package:
        parts.append(path.stem)
    return ".".join(parts), is_package


def resolve(module: str, is_package: bool, level: int, target: str | None) -> str:
    """The absolute name of ``from <level dots><target> import ...`` written in ``module``."""
    if level == 0:
        return target or ""
    package = module.split(".") if is_package else module.split(".")[:-1]
    if level - 1 > len(package) - 1:
        raise ValueError(f"{module}: relative import beyond the top package")
    base = package[: len(package) - (level - 1)]
    return ".".join(base + ([target] if target else []))


def imports_of(path: Path) -> list[Import]:
    module, is_package = module_name(path)
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found = []
    for node in ast.walk(tree):  # every node: imports inside functions and ``if TYPE_CHECKING`` count too
        if isinstance(node, ast.Import):
            names = tuple(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = resolve(module, is_package, node.level, node.module)
            names = (base, *(f"{base}.{alias.name}" for alias in node.names if alias.name != "*"))
            if node.level:  # relative: mark it, model_patches may use only these for its siblings
                names = tuple(f"relative:{name}" for name in names)
        else:
            continue
        found.append(Import(module, str(path.relative_to(REPO)), node.lineno, names))
    return found


def all_imports() -> list[Import]:
    files = sorted(p for folder in SOURCE_ROOTS for p in (REPO / folder).rglob("*.py"))
    assert files, "no source files found"
    return [imp for path in files for imp in imports_of(path)]


def within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def is_core(module: str) -> bool:
    return within(module, "hf_prune") and not any(
        within(module, p)
        for p in (*TOP_LAYER, "hf_prune.evals", "hf_prune.integrations", "hf_prune.model_patches")
    )


def violations_of(imp: Import) -> list[str]:
    out = []
    for raw in imp.names:
        relative = raw.startswith("relative:")
        name = raw.removeprefix("relative:")
        if (imp.module, name) in ALLOWED:
            continue
        where = f"{imp.path}:{imp.line}: {imp.module} imports {name}"
        if within(imp.module, "hf_prune.model_patches"):
            if within(name, "hf_prune.model_patches") and relative:
                continue  # a sibling, copied along as remote code
            if name.split(".")[0] not in MODEL_PATCHES_ALLOWED or within(name, "hf_prune"):
                out.append(
                    f"{where} (model_patches: torch, transformers, the standard library and its siblings)"
                )
            continue
        if is_core(imp.module):
            for banned in ("hf_prune.evals", "hf_prune.integrations", *TOP_LAYER):
                if within(name, banned):
                    out.append(f"{where} (the core never imports {banned})")
        if within(imp.module, "hf_prune.evals") or within(imp.module, "hf_prune.integrations"):
            for banned in TOP_LAYER:
                if within(name, banned) and not (
                    within(imp.module, "hf_prune.evals.benchmarks") and banned == "hf_prune.pipeline"
                ):
                    out.append(f"{where} (evals and integrations never import {banned})")
        for lab in LAB:
            if within(name, lab) and not any(within(imp.module, home) for home in LAB):
                out.append(f"{where} (lab code: nothing in the product imports {lab})")
        if within(imp.module, "hf_prune.evals.testbeds") and within(name, "hf_prune.evals.benchmarks"):
            out.append(f"{where} (testbeds never import the benchmarks)")
    return out


def test_resolve_relative_imports():
    assert resolve("hf_prune.evals.benchmarks.bench_experts", False, 3, "pipeline") == "hf_prune.pipeline"
    assert (
        resolve("hf_prune.evals.benchmarks.bench_experts", False, 2, "testbeds.moe_testbed")
        == "hf_prune.evals.testbeds.moe_testbed"
    )
    assert resolve("hf_prune.evals", True, 1, "metrics") == "hf_prune.evals.metrics"
    assert resolve("hf_prune", True, 1, None) == "hf_prune"
    assert resolve("hf_prune.recipe", False, 0, "torch") == "torch"
    with pytest.raises(ValueError):
        resolve("hf_prune.recipe", False, 2, "x")


def test_rules_catch_a_planted_import():
    planted = [
        Import("hf_prune.recipe", "hf_prune/recipe.py", 1, ("hf_prune.evals.harness",)),
        Import("hf_prune.methods.depth.replaceme", "x.py", 1, ("relative:hf_prune.integrations",)),
        Import(
            "hf_prune.evals.harness", "evals/harness.py", 1, ("relative:hf_prune.evals.testbeds.moe_testbed",)
        ),
        Import("hf_prune.cli", "hf_prune/cli.py", 1, ("hf_prune.evals.benchmarks.bench_experts",)),
        Import("hf_prune.evals.report", "evals/report.py", 1, ("relative:hf_prune.pipeline",)),
        Import("hf_prune.evals.testbeds.vlm_testbed", "x.py", 1, ("hf_prune.cli",)),
        Import("hf_prune.integrations.training_callback", "x.py", 1, ("hf_prune.cli",)),
        Import("hf_prune.model_patches.nonuniform_moe", "x.py", 1, ("numpy",)),
        Import(
            "hf_prune.model_patches.nonuniform_moe", "x.py", 1, ("hf_prune.model_patches.token_selection",)
        ),
    ]
    assert [bool(violations_of(imp)) for imp in planted] == [True] * len(planted)
    fine = [
        Import("hf_prune.evals.benchmarks.bench_experts", "x.py", 1, ("relative:hf_prune.pipeline",)),
        Import("hf_prune.evals.benchmarks.bench_experts", "x.py", 1, ("relative:hf_prune.evals.testbeds.x",)),
        Import("hf_prune.evals.testbeds.vlm_testbed", "x.py", 1, ("relative:hf_prune.evals.training",)),
        Import("hf_prune.model_patches.nonuniform_moe", "x.py", 1, ("torch.nn", "__future__")),
        Import("hf_prune.model_patches.a", "x.py", 1, ("relative:hf_prune.model_patches.token_selection",)),
        Import("hf_prune.pipeline", "hf_prune/pipeline.py", 1, ("relative:hf_prune.evals.harness",)),
    ]
    assert [violations_of(imp) for imp in fine] == [[]] * len(fine)


def test_source_follows_the_layer_rules():
    imports = all_imports()
    assert any(within(imp.module, "hf_prune.evals.testbeds") for imp in imports)  # the walk saw the lab
    problems = [problem for imp in imports for problem in violations_of(imp)]
    assert not problems, "layer rules broken (DESIGN.md §1):\n" + "\n".join(problems)


def test_allow_list_is_still_needed():
    """An exception that no longer happens leaves the list, so the list never hides a new one."""
    seen = {(imp.module, name.removeprefix("relative:")) for imp in all_imports() for name in imp.names}
    assert ALLOWED <= seen, f"stale allow-list entries: {sorted(ALLOWED - seen)}"
