"""Glue to the rest of the Hugging Face stack: Trainer callbacks, peft healing, Hub publishing,
accelerate / torch.distributed helpers. Imports the core (``hf_prune``) but never the pipeline or CLI."""

from .cards import train_cards  # noqa: E402
from .pruning_callback import PruningCallback, run_lottery  # noqa: E402
from .training_callback import TrainingMethodCallback  # noqa: E402

__all__ = ["PruningCallback", "TrainingMethodCallback", "run_lottery", "train_cards"]
