"""Sparsity while ``transformers.Trainer`` trains, configured like a recipe stage.

    from hf_prune import PruningCallback
    callback = PruningCallback({"method": "gmp", "final_sparsity": 0.8, "start_step": 0,
                                "end_step": 100, "frequency": 10})
    trainer = Trainer(model, args, train_dataset=..., callbacks=[callback])
    trainer.train()
    callback.report.to_dict()          # sparsity per weight, the schedule, the mask history

The config is a dict with the keys of a recipe stage (``method`` plus the method's fields; ``hf-prune
methods`` lists them), the path of a YAML / JSON file holding one, or a recipe whose ``stages`` hold
exactly one training-time method; or a ``TrainingMethod`` instance. Bad keys and values fail here, naming
the key. Lottery tickets re-run training, so they go through ``run_lottery`` instead.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import RecipeError, quoted
from ..methods.base import StageReport, TrainingMethod
from ..methods.robust.cards import CardsConfig
from ..methods.sparsity.lottery import LotteryConfig
from ..recipe import build_dataclass
from ..recipe_file import read_recipe_file
from ..registry import get_method, registered_methods
from .training_callback import TrainingMethodCallback, load_method_state


def training_method_from(config: dict[str, Any] | str | Path | TrainingMethod) -> tuple[str, TrainingMethod]:
    """(registered name, method config) from a stage dict, a file, or a ``TrainingMethod``."""
    if isinstance(config, TrainingMethod):
        name = next((n for n, s in registered_methods().items() if s.config_cls is type(config)), None)
        return name or type(config).__name__, config
    where = "config"
    if isinstance(config, (str, Path)):
        where = str(config)
        config = read_recipe_file(Path(config))
        if isinstance(config, dict) and "method" not in config and "stages" in config:
            config = _the_training_stage(config["stages"], where)
    if not isinstance(config, dict):
        raise RecipeError(f"{where}: expected a mapping with a 'method' key, got {type(config).__name__}")
    if "method" not in config:
        raise RecipeError(
            f"method: missing required key (training-time methods: {', '.join(training_methods())})"
        )
    name = config["method"]
    spec = get_method(name) if isinstance(name, str) else None
    if spec is None or spec.one_shot:
        raise RecipeError(
            f"method: {quoted(name)} is not a training-time method (those are: {', '.join(training_methods())}); "
            "one-shot methods run with hf-prune prune"
        )
    fields = {k: v for k, v in config.items() if k != "method"}
    return name, build_dataclass(spec.config_cls, fields, "config")


def training_methods() -> list[str]:
    return [name for name, spec in registered_methods().items() if not spec.one_shot]


def _the_training_stage(stages: Any, where: str) -> dict[str, Any]:
    training = set(training_methods())
    found = [s for s in stages or [] if isinstance(s, dict) and s.get("method") in training]
    if len(found) != 1:
        raise RecipeError(f"{where}: stages must hold exactly one training-time method, found {len(found)}")
    return found[0]


class PruningCallback(TrainingMethodCallback):
    """A ``TrainerCallback`` that prunes while Trainer trains (gmp, granet), from a recipe-stage dict or
    file. Its masks and schedule are saved into every ``checkpoint-N`` and restored on resume."""

    def __init__(self, config: dict[str, Any] | str | Path | TrainingMethod):
        name, method = training_method_from(config)
        if isinstance(method, LotteryConfig):
            raise RecipeError(
                "method: lottery re-runs training for each round, which one callback cannot do: use "
                "hf_prune.integrations.run_lottery(make_trainer, config)"
            )
        if isinstance(method, CardsConfig):
            raise RecipeError(
                "method: cards trains several lottery tickets, which one callback cannot do: use "
                "hf_prune.integrations.train_cards(model, images, config, arguments=...)"
            )
        super().__init__(method, name)


def run_lottery(
    make_trainer: Callable[[int], Any],
    config: dict[str, Any] | str | Path | LotteryConfig,
    *,
    resume_from_checkpoint: str | Path | None = None,
) -> tuple[LotteryConfig, list[StageReport]]:
    """Iterative magnitude pruning: ``rounds + 1`` training runs, pruning after each but the last.

    ``make_trainer(round)`` returns a fresh ``transformers.Trainer`` (new optimizer and learning-rate
    schedule; give each round its own ``output_dir``) on the *same* model object every round. With
    ``resume_from_checkpoint`` (a ``checkpoint-N`` folder saved by any round), the run goes on from there:
    that round's Trainer resumes from the folder, the rounds after it run as usual. Returns the method
    (masks, history) and the report of each run done here."""
    name, method = training_method_from(
        config if not isinstance(config, dict) else {"method": "lottery", **config}
    )
    if not isinstance(method, LotteryConfig):
        raise RecipeError(f"method: run_lottery runs lottery, got {quoted(name)}")
    resume = str(resume_from_checkpoint) if resume_from_checkpoint is not None else None
    if resume is not None:
        method.load_state_dict(load_method_state(resume))  # which round, its masks, the rewind point
    reports, model = [], None
    for round_index in range(method.round, method.rounds + 1):
        trainer = make_trainer(round_index)
        if model is not None and trainer.model is not model:
            raise RecipeError("run_lottery: make_trainer must return a Trainer on the same model every round")
        model = trainer.model
        callback = TrainingMethodCallback(method, name)
        trainer.add_callback(callback)
        if resume is not None:  # the callback reads the folder from the arguments (Trainer does not say)
            trainer.args.resume_from_checkpoint = resume
        trainer.train(resume_from_checkpoint=resume)
        resume = None
        reports.append(callback.report)
    return method, reports
