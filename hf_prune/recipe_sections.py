"""The recipe's optional sections beyond the stages: ``train:`` (``hf-prune train``) and ``publish:`` (push
the saved output to the Hub), and the corruption fields of an ``evaluate:`` entry. Re-exported from
``hf_prune.recipe``; kept apart so that file stays short."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from .errors import ConfigFieldError, quoted
from .registry import config_field


def check_positive(name: str, value: int | None) -> None:
    if value is not None and value <= 0:
        raise ConfigFieldError(name, f"must be a positive integer, got {value}")


#: The corruptions of the ``corruption_robustness`` task (``hf_prune.evals.corruptions.CORRUPTIONS``
#: implements them; a test holds the two equal) and their severities.
EVAL_CORRUPTIONS = (
    "gaussian_noise",
    "shot_noise",
    "impulse_noise",
    "speckle_noise",
    "defocus_blur",
    "gaussian_blur",
    "contrast",
    "brightness",
    "jpeg_compression",
    "pixelate",
)
CORRUPTION_SEVERITIES = (1, 2, 3, 4, 5)


def check_corruption_fields(task: str, **fields: list | None) -> None:
    """An evaluation entry's ``corruptions`` / ``severities``: only for corruption_robustness, non-empty,
    known values, none twice; errors name the key (``corruptions[1]: unknown corruption 'fog' ...``)."""
    for name, values in fields.items():
        if values is None:
            continue
        if task != "corruption_robustness":
            raise ConfigFieldError(name, f"is a corruption_robustness setting; task {task!r} has none")
        if not values:
            raise ConfigFieldError(name, "must list at least one value (or be left out for all)")
        allowed = EVAL_CORRUPTIONS if name == "corruptions" else CORRUPTION_SEVERITIES
        for i, value in enumerate(values):
            if value not in allowed:
                what = "corruption" if name == "corruptions" else "severity"
                raise ConfigFieldError(
                    f"{name}[{i}]",
                    f"unknown {what} {quoted(value)} (allowed: {', '.join(map(str, allowed))})",
                )
            if value in values[:i]:
                raise ConfigFieldError(f"{name}[{i}]", f"{quoted(value)} is listed twice")


#: What ``hf-prune train`` fine-tunes for: next-token prediction, or a sequence classifier's labels.
TRAINING_TASKS = ("causal_lm", "classification", "image_classification")


@dataclass
class TrainingConfig:
    """The ``train:`` section of a recipe run by ``hf-prune train``: the data and the Trainer's settings."""

    data: str = config_field(
        help="training data: a local file (.txt, .jsonl, .json, .parquet) or a datasets hub id; "
        "image_classification: an IDX folder or a folder of class sub-folders"
    )
    task: str | None = config_field(
        None,
        help="causal_lm | classification | image_classification (default: from the model: encoder "
        "classifiers classification, image classifiers image_classification, else causal_lm)",
    )
    limit: int | None = config_field(None, help="image_classification: train on the first N images")
    text_field: str = config_field("text", help="column holding the text in jsonl/json/parquet/hub data")
    label_field: str = config_field("label", help="classification: column holding the integer label")
    max_length: int = config_field(128, help="tokens per example (causal_lm: packed windows of this length)")
    split: str = config_field("train", help="dataset split (hub datasets)")
    sample_by: Literal["line", "paragraph", "document"] = config_field(
        "paragraph", help="how a .txt file is cut into records"
    )
    arguments: dict = config_field(
        help="transformers.TrainingArguments fields (max_steps, learning_rate, per_device_train_batch_size, ...)",
        default_factory=dict,
    )

    def __post_init__(self) -> None:
        if self.task is not None and self.task not in TRAINING_TASKS:
            raise ConfigFieldError("task", f"must be {' | '.join(TRAINING_TASKS)}, got {self.task!r}")
        check_positive("max_length", self.max_length)
        check_positive("limit", self.limit)
        if self.max_length < 2:
            raise ConfigFieldError("max_length", f"must be at least 2, got {self.max_length}")
        if not self.data:
            raise ConfigFieldError("data", "must name a file or a dataset id")


#: The Hub's rule for a repo name (huggingface_hub's ``validate_repo_id``): letters, digits, ``-_.``, at most
#: 96 characters, no ``--`` or ``..``, not starting or ending with ``-`` or ``.``; hf-prune asks for the
#: namespace too, so the target never depends on whose token is found.
_REPO_PART = r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?"
_REPO_ID = re.compile(rf"{_REPO_PART}/{_REPO_PART}")


def repo_id_problem(repo_id: object) -> str | None:
    """Why ``repo_id`` is not a Hub model id of the form ORG/NAME, or None when it is one."""
    if not isinstance(repo_id, str) or not _REPO_ID.fullmatch(repo_id) or "--" in repo_id or ".." in repo_id:
        return (
            f"must be a Hub repo id ORG/NAME (letters, digits, '-', '_', '.'; no '--' or '..'; at most 96 "
            f"characters each side), got {repo_id!r}"
        )
    if repo_id.endswith(".git"):
        return f"must not end with .git, got {repo_id!r}"
    return None


@dataclass
class PublishConfig:
    """The ``publish:`` section: push the saved output to the Hub once the save succeeded."""

    repo_id: str = config_field(help="the Hub repo to push to, ORG/NAME (created when missing)")
    private: bool = config_field(
        False, help="create the repo private (an existing repo keeps its visibility)"
    )
    revision: str | None = config_field(None, help="branch to commit to (created when missing; default main)")
    commit_message: str | None = config_field(None, help="the commit's message (default: names the methods)")
    base_model: str | None = config_field(
        None,
        help="Hub id of the model this was pruned from, for the card's base_model (default: model, if a Hub id)",
    )
    endpoint: str | None = config_field(None, help="Hub address (default: HF_ENDPOINT, else huggingface.co)")

    def __post_init__(self) -> None:
        problem = repo_id_problem(self.repo_id)
        if problem:
            raise ConfigFieldError("repo_id", problem)
        if self.base_model is not None and repo_id_problem(self.base_model):
            raise ConfigFieldError("base_model", f"must be a Hub model id ORG/NAME, got {self.base_model!r}")
        if self.revision is not None and not self.revision.strip():
            raise ConfigFieldError("revision", "must name a branch, got an empty string")
        if self.endpoint is not None and not re.fullmatch(r"https?://\S+", self.endpoint):
            raise ConfigFieldError("endpoint", f"must be an http(s) URL, got {self.endpoint!r}")


#: ``engine:`` values: in_memory loads the whole model; sequential runs one decoder layer at a time from the
#: checkpoint's files; auto picks sequential when the weights do not fit in memory.
ENGINES = ("auto", "in_memory", "sequential")
ENGINE_HELP = {
    "engine": f"{' | '.join(ENGINES)}: how calibration runs (auto: sequential when the weights do not fit "
    "in memory, else in_memory)",
    "activation_cache": "sequential engine: folder for calibration activations that do not fit in memory "
    "(default: .OUTPUT.activations beside the output; removed after a successful run, reused after a crash)",
    "activation_memory_gb": "sequential engine: memory for calibration activations before they spill to "
    "activation_cache (default: half the available memory)",
}


def engine_settings(data: dict) -> dict:
    """The recipe's engine keys, checked; errors name the key."""
    engine = data.get("engine", "auto")
    if engine not in ENGINES:
        raise ConfigFieldError("engine", f"must be one of {', '.join(ENGINES)}, got {quoted(engine)}")
    cache = data.get("activation_cache")
    if cache is not None and (not isinstance(cache, str) or not cache.strip()):
        raise ConfigFieldError("activation_cache", f"must be a folder path, got {quoted(cache)}")
    memory = data.get("activation_memory_gb")
    if memory is not None and (
        isinstance(memory, bool) or not isinstance(memory, (int, float)) or memory < 0
    ):
        raise ConfigFieldError("activation_memory_gb", f"must be a number >= 0, got {quoted(memory)}")
    return {"engine": engine, "activation_cache": cache, "activation_memory_gb": memory}
