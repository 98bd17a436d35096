"""Built-in pruning methods, one module per method under a family package (``depth/``, ``experts/``,
``tokens/``), next to the helpers they share. ``base.py`` declares the contract every method follows.

Nothing is listed by hand: ``import_method_modules`` (called by the registry on first use) imports every
module below this package, and each method module registers itself with one ``register_method`` line.
"""

from __future__ import annotations

import importlib
import pkgutil


def import_method_modules() -> None:
    """Import every module below ``hf_prune.methods`` (packages first, then their modules)."""
    for module in pkgutil.walk_packages(__path__, prefix=f"{__name__}."):
        importlib.import_module(module.name)
