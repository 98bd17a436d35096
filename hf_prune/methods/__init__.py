"""Built-in pruning methods; importing a module registers its method."""

from .depth import layer_drop, replaceme  # noqa: F401
from .experts import expert_pruning  # noqa: F401
from .tokens import text_tokens, visual_tokens  # noqa: F401
