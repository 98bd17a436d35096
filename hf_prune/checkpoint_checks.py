"""Checks that keep a broken or mismatched checkpoint from loading quietly.

transformers fills weights a checkpoint lacks with random values (only a log line says so), builds whatever
size config.json asks for before reading a single weight, and lets corrupt safetensors files fail deep inside
its loader. These checks run around ``load_config`` / ``load_model`` and turn each case into a one-line
``ModelError`` that names the file, key or bound:

- ``check_config_sizes``: absurd sizes in config.json (10⁹ layers, a negative hidden size), before any
  config object or model is built;
- ``read_safetensors_headers``: every ``*.safetensors`` file of a local folder parsed (header only) and its
  byte ranges checked against the file size, so a truncated or corrupt file is named before loading;
- ``check_config_matches_weight_files``: the parameters config.json implies against the values the weight
  files hold (cheap: headers only), so a config far larger than its weights is refused before allocation;
- ``check_loading_info``: the missing / unexpected / wrong-shape keys ``from_pretrained`` reports.
"""

from __future__ import annotations

import json
import logging
import math
import re
import struct
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .errors import ModelError

#: Upper bounds on config.json sizes: far above any published model (the largest have ~130 layers, hidden
#: ~25k, vocabularies ~260k, a few hundred experts), low enough that a typo or a hostile file (10⁹ layers)
#: is refused before transformers builds anything. The lower bound is 1, except expert counts (0: dense).
CONFIG_SIZE_LIMITS: dict[str, int] = {
    "num_hidden_layers": 4096,
    "depth": 4096,  # Qwen2-VL's vision tower names its layer count so
    "hidden_size": 2**17,
    "embed_dim": 2**17,  # Qwen2-VL's vision tower width
    "intermediate_size": 2**20,
    "moe_intermediate_size": 2**20,
    "vocab_size": 2**24,
    "num_attention_heads": 2**12,
    "num_key_value_heads": 2**12,
    "max_position_embeddings": 2**26,
    "num_experts": 2**16,
    "num_local_experts": 2**16,
    "n_routed_experts": 2**16,
}
_EXPERT_COUNT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts")

#: A config implying more than this many times the values its weight files hold is refused. Generous, so that
#: quantized checkpoints (4-bit values packed eight to an int32) and the rough estimate never trip it.
CONFIG_TO_WEIGHTS_LIMIT = 16

#: Key groups shown in a mismatch message before "… and N more".
_MAX_KEY_GROUPS = 6

_SAFETENSORS_DTYPE_BYTES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E5M2": 1,
    "F8_E4M3": 1,
    "F8_E8M0": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
    "C64": 8,
}


# ---- config.json ---------------------------------------------------------------------------------------


def check_config_sizes(config: Mapping[str, Any] | Any, *, source: str = "config.json") -> None:
    """Refuse sizes outside ``CONFIG_SIZE_LIMITS`` in a config (a config object or config.json's dict),
    nested ``text_config`` / ``vision_config`` / any ``*_config`` included. Errors start with ``source``
    and name the key path and the bound."""
    values = config if isinstance(config, Mapping) else config.to_dict()
    for path, name, value in _size_entries(values, ""):
        low = 0 if name in _EXPERT_COUNT_KEYS else 1
        high = CONFIG_SIZE_LIMITS[name]
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, bool) or not isinstance(item, int):
                continue  # a wrong type is transformers' to report; only sizes that would be allocated here
            if not low <= item <= high:
                raise ModelError(
                    f"{source}: {path}{name} = {item:,} is outside the sane range {low}..{high:,} "
                    "(hf_prune.checkpoint_checks.CONFIG_SIZE_LIMITS); the config is corrupt"
                )


def _size_entries(values: Mapping[str, Any], prefix: str) -> Iterator[tuple[str, str, Any]]:
    for name, value in values.items():
        if name in CONFIG_SIZE_LIMITS:
            yield prefix, name, value
        elif name.endswith("_config") and isinstance(value, Mapping):
            yield from _size_entries(value, f"{prefix}{name}.")


def estimated_parameters(config: Mapping[str, Any]) -> int:
    """A rough lower bound on the parameters a config.json dict describes: per decoder layer the query and
    output projections (2·H²) and an up and down projection (2·H·I), plus the embeddings; nested
    ``*_config`` dicts (a VLM's text and vision towers) added. Expert counts are left out (lower bound)."""
    total = sum(
        estimated_parameters(value)
        for name, value in config.items()
        if name.endswith("_config") and isinstance(value, Mapping)
    )
    layers = _int(config, "num_hidden_layers", "depth")
    hidden = _int(config, "hidden_size", "embed_dim")
    intermediate = _int(config, "intermediate_size")
    vocab = _int(config, "vocab_size")
    return total + layers * (2 * hidden * hidden + 2 * hidden * intermediate) + vocab * hidden


def _int(config: Mapping[str, Any], *names: str) -> int:
    for name in names:
        value = config.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return 0


def check_config_matches_weight_files(
    config: Mapping[str, Any], weight_values: int, *, key: str = "model"
) -> None:
    """Refuse a config implying far more parameters than ``weight_values`` (the values in the weight files)."""
    implied = estimated_parameters(config)
    if weight_values and implied > CONFIG_TO_WEIGHTS_LIMIT * weight_values:
        raise ModelError(
            f"{key}: config.json describes at least ~{implied:.3g} parameters, but the weight files "
            f"hold {weight_values:,} values; the config does not belong to these weights"
        )


# ---- safetensors files ---------------------------------------------------------------------------------


def read_safetensors_headers(folder: str | Path, *, key: str = "model") -> dict[Path, dict[str, Any]]:
    """The parsed header of every ``*.safetensors`` file in a local model folder (none for a hub id).

    Refuses, naming ``key/<file>``, a file whose header cannot be read or whose tensors' byte ranges do not
    fit in the file (a truncated download passes a header parse but is short)."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        return {}
    return {
        path: _checked_header(path, f"{key.rstrip('/')}/{path.name}")
        for path in sorted(folder.glob("*.safetensors"))
    }


def safetensors_values(headers: dict[Path, dict[str, Any]]) -> int:
    """Number of values (tensor elements) in the files whose headers these are."""
    return sum(
        math.prod(entry["shape"])
        for header in headers.values()
        for name, entry in header.items()
        if name != "__metadata__"
    )


def _checked_header(path: Path, shown: str) -> dict[str, Any]:
    from safetensors import safe_open

    size = path.stat().st_size

    def corrupt(reason: str) -> ModelError:
        return ModelError(
            f"{shown}: corrupt or truncated safetensors file ({reason}); download or save it again"
        )

    with path.open("rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise corrupt(f"{size} bytes, too short for a header")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > size - 8:
            raise corrupt(f"its header claims {header_len:,} bytes, the file has {size:,}")
        try:
            header = json.loads(handle.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise corrupt(f"the header is not JSON: {exc}") from None
    if not isinstance(header, dict):
        raise corrupt("the header is not a JSON object")
    data_end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, end = entry["data_offsets"]
            dtype, shape = entry["dtype"], list(entry["shape"])
            expected = math.prod(shape) * _SAFETENSORS_DTYPE_BYTES.get(dtype, 0)
        except (KeyError, TypeError, ValueError):
            raise corrupt(f"tensor {name!r} has no valid dtype, shape and data_offsets") from None
        if not 0 <= begin <= end or (dtype in _SAFETENSORS_DTYPE_BYTES and end - begin != expected):
            raise corrupt(
                f"tensor {name!r} spans bytes {begin}..{end}, which does not fit its {dtype} {shape}"
            )
        data_end = max(data_end, end)
    if 8 + header_len + data_end > size:
        raise corrupt(f"{size:,} bytes, its tensors need {8 + header_len + data_end:,}")
    try:  # the library's own validation (offsets contiguous, file fully covered)
        with safe_open(path, "pt"):
            pass
    except Exception as exc:  # SafetensorError and whatever the Rust side raises: all mean a bad file
        raise corrupt(str(exc)) from None
    return header


# ---- from_pretrained's loading report ------------------------------------------------------------------


def check_loading_info(name: str, loading_info: Mapping[str, Any]) -> None:
    """Refuse a load whose ``output_loading_info`` lists missing, unexpected or wrong-shape keys.

    transformers leaves tied weights (lm_head tied to the embeddings) and the buffers a class declares
    ignorable (``_keys_to_ignore_on_load_*``) out of these lists, so what is left is a real mismatch: a
    missing key would be random, an unexpected one silently dropped."""
    parts = []
    if loading_info.get("missing_keys"):
        parts.append(f"missing {group_keys(loading_info['missing_keys'])}")
    if loading_info.get("unexpected_keys"):
        parts.append(f"unexpected {group_keys(loading_info['unexpected_keys'])}")
    mismatched = sorted(loading_info.get("mismatched_keys") or [], key=lambda entry: _natural(entry[0]))
    if mismatched:
        shown = [
            f"{k} (checkpoint {list(ckpt)}, config {list(model)})"
            for k, ckpt, model in mismatched[:_MAX_KEY_GROUPS]
        ]
        more = (
            f", … and {len(mismatched) - _MAX_KEY_GROUPS} more" if len(mismatched) > _MAX_KEY_GROUPS else ""
        )
        parts.append(f"wrong shape {', '.join(shown)}{more}")
    if parts:
        raise ModelError(f"{name}: weights do not match config.json: {'; '.join(parts)}")


def group_keys(keys: Any) -> str:
    """``model.layers.5.*, model.layers.6.* (18 keys)``: keys grouped by their first numbered prefix
    (a decoder layer, an expert), a lone key shown whole, at most ``_MAX_KEY_GROUPS`` groups."""
    groups: dict[str, list[str]] = {}
    for key in sorted(keys, key=_natural):
        match = re.match(r"(.*?\.\d+)\.", key)
        groups.setdefault(match.group(1) if match else key, []).append(key)
    shown = [f"{prefix}.*" if len(members) > 1 else members[0] for prefix, members in groups.items()]
    more = f", … and {len(shown) - _MAX_KEY_GROUPS} more" if len(shown) > _MAX_KEY_GROUPS else ""
    count = sum(len(members) for members in groups.values())
    return f"{', '.join(shown[:_MAX_KEY_GROUPS])}{more} ({count} key{'s' if count != 1 else ''})"


def _natural(key: str) -> list[Any]:
    """Sort key that puts layers.10 after layers.9."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", key)]


class _DropLoadReport(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "LOAD REPORT" not in str(record.msg)


@contextmanager
def quiet_load_report() -> Iterator[None]:
    """Hide transformers' multi-line load-report table while ``check_loading_info`` turns its content into
    one error line (the table would print above it)."""
    logger = logging.getLogger("transformers.modeling_utils")
    report_filter = _DropLoadReport()
    logger.addFilter(report_filter)
    try:
        yield
    finally:
        logger.removeFilter(report_filter)
