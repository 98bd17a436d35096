"""Checkpoint I/O: loading models safely, atomic saves, hf_prune.json and the model card.

A save writes everything into a temporary folder beside the target and renames it into place at the
end, so an interrupted run leaves the previous output intact or none at all. The source model folder is
never written to.
"""

from __future__ import annotations

import os
import platform
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

from .adapters import auto_model_class, get_adapter
from .checkpoint_checks import (
    check_config_matches_weight_files,
    check_config_sizes,
    check_loading_info,
    quiet_load_report,
    read_safetensors_headers,
    safetensors_values,
)
from .errors import HfPruneError, ModelError, RecipeError
from .model_card import build_model_card
from .output_safety import (
    REPORT_FILE,
    check_finite_tensors,
    remove_stale_temporaries,
    save_lock,
    strict_json_dumps,
)
from .recipe import device_name_problem

#: How transformers' loader words its refusals of a checkpoint (RuntimeError): state-dict errors, failed
#: conversions of the weight layout.
_LOADER_REFUSALS = ("Error(s) in loading state_dict", "automatic conversion of the weights")
_TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def check_output_path(output: str | os.PathLike, source: str | os.PathLike | None) -> Path:
    """Refuse an output that is, contains or sits inside the source model folder."""
    out = Path(output).expanduser().resolve()
    if source and Path(source).expanduser().exists():  # "": a model built in memory has no folder
        src = Path(source).expanduser().resolve()
        if out == src or src in out.parents:
            raise RecipeError(
                f"output: {output} is inside the source model folder {source}; "
                "choose a folder outside it (the source is never modified)"
            )
        if out in src.parents:
            raise RecipeError(
                f"output: {output} contains the source model {source}; replacing it would delete the source"
            )
    if out.exists() and not out.is_dir():
        raise RecipeError(f"output: {output} exists and is not a folder")
    return out


def atomic_write_dir(target: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a fresh sibling folder, then swap it into ``target`` in one rename.

    First removes what a killed earlier save left beside ``target`` (see ``remove_stale_temporaries``).
    The folders in use are locked, so a concurrent save's clean-up leaves them alone."""
    target = Path(target).expanduser().resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(target)
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        with save_lock(tmp):
            write(tmp)
            if target.exists():
                old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
                with save_lock(target):
                    os.replace(target, old)
                    os.replace(tmp, target)
                    shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def check_device(device: str, *, key: str = "device") -> None:
    """Refuse a device name hf-prune does not know, or a device this machine lacks (``cuda`` without CUDA,
    ``cuda:N`` past the last GPU, ``mps`` off Apple silicon), before any weights load.

    Errors start with ``key`` (the recipe key or the command-line option)."""
    problem = device_name_problem(device)
    if problem:
        raise HfPruneError(f"{key}: {problem}")
    if device == "cuda" or device.startswith("cuda:"):
        if not torch.cuda.is_available():
            build = "a CPU-only build" if torch.version.cuda is None else "no CUDA device is visible"
            raise HfPruneError(
                f"{key}: {device!r} needs a CUDA GPU, and torch {torch.__version__} has none here "
                f"({build}); use auto or cpu"
            )
        index = int(device.partition(":")[2] or 0)
        count = torch.cuda.device_count()
        if index >= count:
            raise HfPruneError(
                f"{key}: {device!r} does not exist; this machine has {count} CUDA device"
                f"{'s' if count != 1 else ''} (cuda:0 to cuda:{count - 1})"
            )
    if device == "mps" and not torch.backends.mps.is_available():
        raise HfPruneError(
            f"{key}: 'mps' needs an Apple-silicon GPU, and torch cannot use one here; use auto or cpu"
        )


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def load_config(name: str, *, trust_remote_code: bool = False, key: str = "model") -> Any:
    """A model's config, with ``trust_remote_code`` always passed explicitly: transformers never prompts.

    ``hf_prune_*`` types resolve to the classes ``import hf_prune`` registers; any other ``auto_map`` is
    refused unless the user opted in. Errors name ``key`` (the recipe key or the command argument).
    config.json's sizes are checked on the raw file first (building a config or a model from 10⁹ layers
    would hang), and a local folder's config against the size of its weight files."""
    import transformers

    try:
        # The raw dict: some config classes build per-layer lists in __init__, so check before constructing.
        raw, _ = transformers.PretrainedConfig.get_config_dict(name)
        check_config_sizes(raw, source=f"{key}: {name}/config.json")
        config = transformers.AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code)
    except ValueError as exc:
        if isinstance(exc, HfPruneError):
            raise
        if "trust_remote_code" in str(exc):
            raise HfPruneError(
                f"{key}: {name} ships its own modeling code (auto_map in config.json); it is not run "
                "unless you opt in with --trust-remote-code (trust_remote_code: true in a recipe)"
            ) from None
        raise HfPruneError(f"{key}: cannot load a config from {name!r}: {exc}") from exc
    except OSError as exc:
        raise HfPruneError(f"{key}: cannot load a config from {name!r}: {exc}") from exc
    headers = read_safetensors_headers(name, key=name)
    check_config_matches_weight_files(raw, safetensors_values(headers), key=name)
    return config


def load_model(
    name: str,
    *,
    dtype: str = "auto",
    device: str = "auto",
    device_map: str | None = None,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    auto_class: Any = None,
    max_memory: dict[Any, int] | None = None,
    offload_folder: str | os.PathLike | None = None,
) -> Any:
    """Load a model with its head; safetensors only unless ``allow_pickle``.

    ``auto_class`` defaults to the one the adapter names (causal LM, or image-text-to-text for
    vision-language models). ``device_map`` (e.g. "auto") spreads a model over several devices with
    accelerate; otherwise the whole model goes to ``device`` ("auto": cuda when present). With
    ``device_map``, ``max_memory`` caps each device and what does not fit is offloaded to
    ``offload_folder`` (accelerate's big-model inference: weights read from disk during the forward).
    """
    if auto_class is None:  # load_config also checks the weight files' headers
        config = load_config(name, trust_remote_code=trust_remote_code)
        auto_class = auto_model_class(get_adapter(config))
    else:  # a corrupt or truncated file is named before loading
        read_safetensors_headers(name, key=name)
    placement = resolve_device(device)
    kwargs: dict[str, Any] = {
        "dtype": _TORCH_DTYPES.get(dtype, "auto"),
        "trust_remote_code": trust_remote_code,
    }
    if placement in ("balanced", "balanced_low_0", "sequential"):
        device_map = device_map or placement
    if device_map:
        kwargs["device_map"] = device_map
        if max_memory is not None:
            kwargs["max_memory"] = max_memory
        if offload_folder is not None:
            kwargs["offload_folder"] = str(offload_folder)
    if not allow_pickle:
        kwargs["use_safetensors"] = True
    # Wrong shapes are loaded (re-initialised) rather than raised with no key named: check_loading_info
    # then refuses them with every other mismatch, naming the keys.
    kwargs.update(output_loading_info=True, ignore_mismatched_sizes=True)
    try:
        with quiet_load_report():
            model, loading_info = auto_class.from_pretrained(name, **kwargs)
    except OSError as exc:
        if not allow_pickle and "safetensors" in str(exc).lower():
            raise HfPruneError(
                f"{name}: no safetensors weights found; pickle checkpoints can run arbitrary code "
                "and are refused unless the recipe sets allow_pickle: true"
            ) from exc
        raise ModelError(f"{name}: cannot load the weights: {exc}") from exc
    except SafetensorError as exc:
        raise ModelError(
            f"{name}: corrupt or truncated safetensors file ({exc}); download or save it again"
        ) from exc
    except RuntimeError as exc:
        if not any(marker in str(exc) for marker in _LOADER_REFUSALS):
            raise  # out of memory and the like are not bad input
        raise ModelError(f"{name}: the weights cannot be loaded into this config: {exc}") from exc
    check_loading_info(name, loading_info)
    if not device_map:
        model.to(placement)
    model.eval()
    return model


def load_preprocessor(name: str, *, vision_language: bool = False, trust_remote_code: bool = False) -> Any:
    """The processor (vision-language models) or tokenizer saved with a model, or None if it has none."""
    import transformers

    classes = [transformers.AutoProcessor] if vision_language else []
    for auto_cls in [*classes, transformers.AutoTokenizer]:
        try:
            return auto_cls.from_pretrained(name, trust_remote_code=trust_remote_code)
        except (OSError, ValueError, TypeError, KeyError):
            continue
    return None


def load_image_processor(name: str, *, trust_remote_code: bool = False) -> Any:
    """The image processor saved with an image classifier, or None if it has none (its pixel values are
    then the images scaled to [0, 1]: ``hf_prune.image_data.pixel_values``)."""
    import transformers

    try:
        return transformers.AutoImageProcessor.from_pretrained(name, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError, KeyError):
        return None


def text_tokenizer(preprocessor: Any) -> Any:
    """The tokenizer inside a processor, or the tokenizer itself."""
    return getattr(preprocessor, "tokenizer", preprocessor)


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    versions = {"python": platform.python_version()}
    for package in (
        "hf-prune",
        "torch",
        "transformers",
        "peft",
        "evaluate",
        "datasets",
        "huggingface-hub",
        "accelerate",
        "safetensors",
    ):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            continue
    return versions


def save_pruned_model(
    model: Any,
    tokenizer: Any,
    output: str | os.PathLike,
    report: dict[str, Any],
    write_extra: Callable[[Path], None] | None = None,
) -> Path:
    """Weights (safetensors), config, tokenizer/processor, hf_prune.json, README.md and whatever
    ``write_extra(folder)`` adds (the evaluation report), all in one atomic save.

    Refuses NaN/inf weights before writing anything; ``hf_prune.json`` is strict JSON (NaN/inf become null)."""
    check_finite_tensors(model.state_dict())
    return save_pruned_checkpoint(model.save_pretrained, model.config, tokenizer, output, report, write_extra)


def save_pruned_checkpoint(
    write_weights: Callable[[Path], None],
    config: Any,
    tokenizer: Any,
    output: str | os.PathLike,
    report: dict[str, Any],
    write_extra: Callable[[Path], None] | None = None,
) -> Path:
    """``save_pruned_model`` for weights written by ``write_weights(folder)`` (a model's ``save_pretrained``,
    or the sequential engine's shard writer, which also writes ``config``'s files)."""

    def write(folder: Path) -> None:
        if write_extra is not None:
            write_extra(folder)
        write_weights(folder)
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)
        (folder / REPORT_FILE).write_text(strict_json_dumps(report, indent=2, default=_json_default) + "\n")
        (folder / "README.md").write_text(
            build_model_card(report, **_card_settings(config, has_preprocessor=tokenizer is not None))
        )

    return atomic_write_dir(output, write)


#: Files ``save_pretrained`` of a tokenizer or processor writes (any one means one was saved).
_PREPROCESSOR_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "processor_config.json",
    "preprocessor_config.json",
)


def hub_model_card(folder: str | os.PathLike, report: dict[str, Any], repo_id: str, **card: Any) -> str:
    """The card of a saved output as the Hub gets it: loading from ``repo_id``, no local path (the local
    README.md is left as it is). ``card``: more ``build_model_card`` arguments (``base_model``)."""
    import transformers

    folder = Path(folder)
    config = transformers.AutoConfig.from_pretrained(folder, trust_remote_code=False)
    saved = any((folder / name).is_file() for name in _PREPROCESSOR_FILES)
    return build_model_card(
        report, load_from=repo_id, **_card_settings(config, has_preprocessor=saved), **card
    )


def _card_settings(config: Any, *, has_preprocessor: bool) -> dict[str, Any]:
    """The card's loading classes and notes, read from the saved model's config."""
    adapter = get_adapter(config)
    return {
        "model_type": config.model_type,
        "auto_class": auto_model_class(adapter).__name__,
        "preprocessor_class": preprocessor_class(
            object() if has_preprocessor else None,
            vision_language=adapter.is_vision_language,
            image=adapter.is_image_classifier,
        ),
        "token_pruning": getattr(config, "token_pruning", None) is not None,
    }


def preprocessor_class(preprocessor: Any, *, vision_language: bool, image: bool = False) -> str | None:
    """The Auto class that loads the saved tokenizer / processor: ``AutoProcessor`` for vision-language
    models (it returns the tokenizer when only that was saved), ``AutoImageProcessor`` for image
    classifiers, ``AutoTokenizer`` otherwise; None if nothing was saved."""
    if preprocessor is None:
        return None
    return "AutoProcessor" if vision_language else "AutoImageProcessor" if image else "AutoTokenizer"


def _json_default(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
