"""The method contract: what every pruning method declares, and when each hook is called.

A method is a config dataclass (typed fields, each with a one-line help from ``config_field``, validated in
``__post_init__``) that subclasses one of two bases and registers itself with one line in its own module::

    register_method("replaceme", ReplaceMeConfig)

Two kinds of method share the checks of ``MethodConfig``:

- ``OneShotMethod``: changes a loaded model once. The pipeline (``hf-prune prune``) calls, per stage:
  ``check_model`` and ``predict_config`` on the model's config before any weights load (the preflight),
  then ``apply`` on the loaded model, then ``finalize`` (an optional follow-up the method owns, e.g.
  training AD-TP's token retainer), all through ``registry.run_stage``.
- ``TrainingMethod``: prunes while a model trains (``methods/sparsity/``: GMP, GraNet, lottery tickets).
  ``integrations/training_callback.py``'s ``TrainingMethodCallback`` drives any of them inside
  ``transformers.Trainer``: ``begin`` → ``after_optimizer_step`` after every optimizer step →
  ``state_dict`` saved into each ``checkpoint-N`` folder and ``load_state_dict`` on resume → ``end``.

A method never saves the model or evaluates it; the pipeline does. Its report is the dict of details
``apply`` (or ``end``) returns: the registry adds the registered name and the timing (``StageReport``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..errors import UnsupportedModelError

if TYPE_CHECKING:
    from ..adapters import ModelAdapter
    from ..context import PruneContext
    from ..engine.activation_store import ActivationStore
    from ..engine.layers import LayerRunner
    from ..engine.plan import SequentialPlan


def config_field(default: Any = dataclasses.MISSING, *, help: str, **kwargs: Any) -> Any:  # noqa: A002
    """A dataclass field with a one-line help string (shown by ``hf-prune methods``)."""
    return field(default=default, metadata={"help": help}, **kwargs)


@dataclass
class MethodConfig:
    """Common base of every method config: parameters only, and the checks that need a model's config
    but not its weights. Subclass ``OneShotMethod`` or ``TrainingMethod``, not this class."""

    @classmethod
    def unsupported_reason(cls, adapter: ModelAdapter) -> str | None:
        """Why this method cannot apply to any model of ``adapter``'s architecture, or None if it can.

        Called without a config instance: by ``hf-prune inspect`` (its "methods:" list) and by
        ``check_model``. Reads ``adapter`` only (its spec, ``model_type``); field-dependent checks belong
        in ``check_model``."""
        return None

    @property
    def needs_calibration(self) -> bool:
        """Whether this stage reads calibration data; the recipe loader then requires a ``calibration:``
        section, and the pipeline checks ``min_calibration_tokens``. Override as a property."""
        return False

    def check_model(self, model_config: Any, adapter: ModelAdapter) -> None:
        """Raise ``UnsupportedModelError`` or ``ConfigFieldError`` if this config cannot apply to a model
        with ``model_config``.

        Called once per stage, by the pipeline's preflight, before any weights load: for a later stage, on
        the config as the stages before it will leave it (``predict_config``); ``apply`` does not check
        again. This base raises the ``unsupported_reason``; a subclass calls ``super().check_model(...)``
        first, then checks its fields against the model (layer indices, budgets). It may not change
        anything."""
        reason = self.unsupported_reason(adapter)
        if reason:
            raise UnsupportedModelError(reason)

    def predict_config(self, model_config: Any, adapter: ModelAdapter) -> Any:
        """The model's config as this stage will leave it, so the next stage's ``check_model`` sees what it
        will get (two stages that remove 3 and 2 of 5 layers fail before any weights load).

        Called after ``check_model`` passed. Return ``model_config`` itself when the stage changes nothing a
        later check reads (the default), else a changed ``copy.deepcopy`` of it: never modify
        ``model_config``, which may be the caller's in-memory model's config."""
        return model_config

    def min_calibration_tokens(self, model_config: Any) -> int:
        """Fewest real (non-pad) calibration tokens for this method to be well-posed on ``model_config``;
        0: no floor. Called only when ``needs_calibration``; the pipeline refuses calibration data below
        the largest floor of a recipe's stages."""
        return 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class OneShotMethod(MethodConfig):
    """Base of one-shot methods: ``apply`` changes the loaded model in place, once (ReplaceMe, expert
    pruning, token pruning). Run by ``registry.run_stage``: ``apply``, then ``finalize``."""

    def apply(self, model: Any, context: PruneContext) -> dict[str, Any]:
        """Prune ``model`` in place and return what the stage removed and measured (the stage report's
        details: JSON-serialisable, no ``method`` or ``seconds`` key, which ``run_stage`` adds).

        Called once per stage, on the model as the stages before left it, after the preflight's
        ``check_model`` passed. ``context`` gives the adapter, tokenizer, calibration batches and the
        progress setting. It may not save or evaluate the model."""
        raise NotImplementedError(f"{type(self).__name__} must implement apply(model, context)")

    #: Whether ``apply`` gives the same result when the calibration batches are split over
    #: ``torch.distributed`` processes (every statistic it gathers is all-reduced); others are refused
    #: under a multi-process launch.
    supports_data_parallel = False

    def supports_data_parallel_on(self, adapter: Any) -> bool:
        """``supports_data_parallel`` for the model ``adapter`` describes (a method may differ by model)."""
        return self.supports_data_parallel

    #: How data-parallel processes share the calibration data (``PruneContext.calibration_batches``):
    #: ``batches`` (every world-th batch) or ``sequences`` (every world-th sequence of every batch).
    data_parallel_split = "batches"

    def apply_sequential(
        self, runner: LayerRunner, store: ActivationStore, context: PruneContext
    ) -> SequentialPlan:
        """The layer-by-layer variant of ``apply`` (``engine: sequential``), for models larger than memory.

        ``runner`` applies one decoder layer at a time to the calibration batches, materialising only that
        layer; ``store`` keeps activations between layers (spilling to disk). Returns what to write: the
        report, the layers to leave out, and in-place edits of the layers to keep, which the engine's
        writer applies while it copies the checkpoint shard by shard. The model is never whole in memory.
        Not overridden: the method runs in memory only (``supports_sequential`` is False)."""
        raise NotImplementedError(f"{type(self).__name__} has no layer-by-layer variant")

    def supports_sequential(self, adapter: ModelAdapter) -> bool:
        """Whether ``apply_sequential`` can run this config on the model ``adapter`` describes (overridden
        where it depends on a field or on the model)."""
        return type(self).apply_sequential is not OneShotMethod.apply_sequential

    def finalize(self, model: Any, context: PruneContext) -> dict[str, Any] | None:
        """Optional follow-up work the method owns, run right after ``apply`` on the same model (e.g.
        training the token retainer ``apply`` attached, with ``transformers.Trainer``).

        Returns keys to merge into the stage report (a key ``apply`` already wrote is replaced in place),
        or None. Not counted in the stage's ``seconds``: report its own timing. Default: nothing."""
        return None


@dataclass
class TrainingMethod(MethodConfig):
    """Base of training-time methods, which prune while the model trains (GMP, GraNet, lottery tickets).

    Any subclass runs inside ``transformers.Trainer`` through
    ``hf_prune.integrations.training_callback.TrainingMethodCallback``, which calls, in this order:
    ``check_training_model`` when the Trainer is built, ``load_state_dict`` (only when resuming from a
    checkpoint), ``begin``, ``after_optimizer_step`` after each optimizer step, ``state_dict`` at each
    checkpoint save, ``end``. Hooks run on every process of a distributed run; only the main process
    writes the state."""

    def check_training_model(self, model: Any) -> None:
        """Raise ``RecipeError`` / ``UnsupportedModelError`` if this method cannot run on ``model`` (a
        targets pattern matching nothing, a width N:M does not divide). Called when the Trainer is built
        (``on_init_end``; again at ``on_train_begin`` when the callback was added later), so a bad config
        fails before any training. May resolve and cache what ``begin`` needs; must not change ``model``."""

    def begin(self, model: Any, *, step: int, total_steps: int, optimizer: Any = None) -> None:
        """Called once when training starts (Trainer's ``on_train_begin``), before the first batch.

        ``step`` is the number of optimizer steps already done: 0 for a fresh run, N when resuming from
        ``checkpoint-N`` (the state saved there was given to ``load_state_dict`` just before).
        ``total_steps`` is the run's planned number of optimizer steps (for schedules). May prune the model
        (e.g. a mask at step 0) and set up masks; must not replace ``model`` or the optimizer."""

    def after_optimizer_step(self, model: Any, step: int, optimizer: Any) -> None:
        """Called after every optimizer step (Trainer's ``on_optimizer_step``), while the gradients of
        that step are still on the parameters (they are zeroed right after).

        ``step`` counts optimizer steps from 1: the step just taken (``checkpoint-N`` is saved after step
        N). The optimizer regrows pruned weights, so re-apply masks here; prune or regrow on schedule
        steps; may edit the optimizer's state (e.g. mask momentum)."""

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: a flat dict of ``str`` → ``torch.Tensor`` or JSON-serialisable
        value (masks, schedule position, counters). Called at every checkpoint save (Trainer's
        ``on_save``), after the step's ``after_optimizer_step``; written into the ``checkpoint-N`` folder
        (safetensors, atomically). Default: no state."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` returned (tensors come back on the CPU). Called when a Trainer
        resumes from a checkpoint, before ``begin``. Default: nothing to restore."""

    def end(self, model: Any) -> dict[str, Any]:
        """Called once when training ends (Trainer's ``on_train_end``). Makes the pruning permanent (e.g.
        zeros left in the weights, hooks removed) and returns the stage report's details, as
        ``OneShotMethod.apply`` does."""
        return {}


@dataclass
class StageReport:
    """What one stage did: removed structure, measurements and timings (goes into hf_prune.json)."""

    method: str
    details: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, **self.details, "seconds": round(self.seconds, 3)}
