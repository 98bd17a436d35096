"""Architecture knowledge sits in the adapter table, not in the methods (DESIGN.md §2).

Read with ``ast`` (nothing is imported): the methods (``hf_prune/methods/**``) and the evaluation product
modules (``evals/**`` but the lab code in ``evals/testbeds/`` and ``evals/benchmarks/``) never name an
architecture attribute themselves, neither as ``x.name`` nor as ``getattr(x, "name")`` (``hasattr``,
``setattr``, ``delattr`` too). They call the adapter: ``adapter.layers(model)``, ``adapter.router(layer)``,
``adapter.vision_tower(model)``, ``adapter.moe_layer_flags(config)``... A call on the adapter is the one
way such a name may appear (``adapter.x``, ``context.adapter.x``, ``self.adapter.x``, ``get_adapter(c).x``).
"""

from __future__ import annotations

import ast
from dataclasses import fields
from pathlib import Path

from hf_prune.adapters import TEXT_ARCHITECTURES, VISION_LANGUAGE_ARCHITECTURES

REPO = Path(__file__).resolve().parents[2]
LAB = ("evals/testbeds", "evals/benchmarks")


def _table_names() -> set[str]:
    """Every attribute / config key the table holds: module paths, expert-count keys, image token key."""
    names: set[str] = set()
    for spec in [*TEXT_ARCHITECTURES.values(), *VISION_LANGUAGE_ARCHITECTURES.values()]:
        for field in fields(spec):
            value = getattr(spec, field.name)
            if field.name == "qk_norm":  # a kind ("per_head" / "full"), not a place
                continue
            if isinstance(value, str):  # a dotted path, a key, or a reason (a sentence: no identifiers)
                names.update(part for part in value.split(".") if part.isidentifier())
    return names


#: Names the adapter's code reads beside the table's paths: the fused expert tensors and counts, the
#: per-layer config keys (Qwen-MoE's sparse-layer rule, non-uniform expert counts), the vision sub-config
#: and image token keys, and the v4 names that no longer exist (a method using them would be a bug anyway).
ADAPTER_NAMES = {
    "gate_up_proj",
    "num_experts",
    "num_local_experts",
    "experts_per_layer",
    "decoder_sparse_step",
    "mlp_only_layers",
    "vision_config",
    "image_token_id",
    "image_token_index",
    "block_sparse_moe",
}
ARCHITECTURE_NAMES = _table_names() | ADAPTER_NAMES

#: (file, expression) pairs that stay, each with its reason.
ALLOWED = {
    # the depth-cut config's own ``layers`` field ([first, last] removed block), not a model attribute
    ("hf_prune/methods/depth/cuts.py", "self.layers"),
    ("hf_prune/methods/depth/cuts.py", "config.layers"),
    ("hf_prune/methods/depth/sequential.py", "config.layers"),
    ("hf_prune/methods/depth/replaceme.py", "self.layers"),
}


def product_files() -> list[Path]:
    files = sorted((REPO / "hf_prune" / "methods").rglob("*.py"))
    files += [
        path
        for path in sorted((REPO / "evals").rglob("*.py"))
        if not path.relative_to(REPO).as_posix().startswith(LAB)
    ]
    return files


def _is_adapter(node: ast.expr) -> bool:
    """``adapter``, ``<anything>.adapter`` or ``get_adapter(...)``."""
    if isinstance(node, ast.Name):
        return node.id == "adapter"
    if isinstance(node, ast.Attribute):
        return node.attr == "adapter"
    if isinstance(node, ast.Call):
        func = node.func
        return (isinstance(func, ast.Name) and func.id == "get_adapter") or (
            isinstance(func, ast.Attribute) and func.attr == "get_adapter"
        )
    return False


def architecture_accesses(source: str, names: set[str] = ARCHITECTURE_NAMES) -> list[tuple[int, str]]:
    """(line, expression) of every access by name to an architecture attribute outside the adapter."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute) and node.attr in names and not _is_adapter(node.value):
            found.append((node.lineno, ast.unparse(node)))
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in ("getattr", "hasattr", "setattr", "delattr")
            and len(node.args) >= 2
            and isinstance(node.args[1], ast.Constant)
            and node.args[1].value in names
        ):
            found.append((node.lineno, ast.unparse(node)))
    return found


def test_the_name_list_comes_from_the_table():
    assert {"layers", "mlp", "down_proj", "experts", "gate", "shared_expert", "shared_expert_gate"} <= (
        ARCHITECTURE_NAMES
    )
    assert {"vision_tower", "multi_modal_projector", "language_model", "visual", "merger"} <= (
        ARCHITECTURE_NAMES
    )


def test_the_check_sees_direct_access():
    source = (
        "a = model.model.vision_tower\n"
        "b = getattr(config, 'image_token_id', None)\n"
        "c = layer.mlp.experts\n"
        "d = adapter.layers(model)\n"
        "e = context.adapter.router(layer)\n"
        "f = get_adapter(config).moe_layer_flags(config)\n"
    )
    assert [line for line, _ in architecture_accesses(source)] == [1, 2, 3, 3]


def test_methods_and_evals_ask_the_adapter():
    files = product_files()
    assert any(path.name == "visual_tokens.py" for path in files)
    assert any(path.name == "flops.py" for path in files)
    offences = []
    for path in files:
        rel = path.relative_to(REPO).as_posix()
        for line, expression in architecture_accesses(path.read_text()):
            if (rel, expression) not in ALLOWED:
                offences.append(f"{rel}:{line}: {expression}")
    assert not offences, "ask the adapter (hf_prune/adapters/) instead:\n" + "\n".join(offences)


def test_the_sparse_layer_rule_is_written_once():
    """Qwen-MoE's "which layers are MoE" lives in the adapter (and in model_patches, which the remote code
    loads with); nothing else in the product names its config keys, not even in a comment."""
    roots = [REPO / "hf_prune", REPO / "evals", REPO / "integrations"]
    named = sorted(
        path.relative_to(REPO).as_posix()
        for root in roots
        for path in root.rglob("*.py")
        if any(key in path.read_text() for key in ("decoder_sparse_step", "mlp_only_layers"))
    )
    assert named == ["hf_prune/adapters/model_adapter.py"]
