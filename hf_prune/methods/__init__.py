"""Built-in pruning methods; importing a module registers its method."""

from .depth import layer_drop, replaceme  # noqa: F401
