"""Reading text through ``datasets``: local .txt / .jsonl / .json / .parquet files, or a hub dataset id.

Shared by calibration and evaluation, so both accept the same sources and fail the same way: an empty,
binary or non-UTF-8 file is refused before parsing, a bad JSONL row is named ``file:line``, and every
failure is a ``DataError`` (``DataFileNotFoundError`` for a missing file or an unreachable hub id).
"""

from __future__ import annotations

import codecs
from pathlib import Path
from typing import Any

from .errors import DataError, DataFileNotFoundError

#: File suffix -> ``datasets`` builder.
LOCAL_DATA_BUILDERS = {
    ".txt": "text",
    ".text": "text",
    ".jsonl": "json",
    ".json": "json",
    ".parquet": "parquet",
}


def looks_like_local_path(data: str) -> bool:
    """A reference meant as a file (a known suffix or an explicit path), not a datasets hub id."""
    return Path(data).suffix.lower() in LOCAL_DATA_BUILDERS or data.startswith(("./", "../", "/", "~", "."))


def load_text_records(
    data: str, *, text_field: str = "text", split: str = "train", sample_by: str = "paragraph"
) -> list[str]:
    """The non-blank text records of ``data``; a .txt file is cut by ``sample_by`` (line/paragraph/document).

    A .jsonl file is read line by line, so a bad row is named ``file:line``; an empty, binary or non-UTF-8
    file is refused before parsing."""
    path = Path(data).expanduser()
    if path.is_file():
        suffix = path.suffix.lower()
        builder = LOCAL_DATA_BUILDERS.get(suffix)
        if builder is None:
            raise DataError(
                f"{data}: unsupported file type {path.suffix!r} "
                f"(allowed: {', '.join(sorted(LOCAL_DATA_BUILDERS))})"
            )
        if builder != "parquet":
            check_text_file(path, data)
        if suffix == ".jsonl":
            rows = _jsonl_lines(path, data)
        else:
            dataset = _load_local_dataset(path, data, builder, sample_by=sample_by)
            rows = [(f"{data}:row {n}", row) for n, row in enumerate(dataset.to_list(), start=1)]
    elif looks_like_local_path(data):
        raise DataFileNotFoundError(f"data file not found: {data}")
    else:
        rows = [
            (f"{data}:row {n}", row)
            for n, row in enumerate(_load_hub_dataset(data, split).to_list(), start=1)
        ]
    if not rows:
        raise DataError(f"{data}: the file holds no records")
    fields = list(dict.fromkeys(name for _, row in rows for name in row))
    if text_field not in fields:
        raise DataError(f"{data}: no text field {text_field!r} (fields: {', '.join(fields) or 'none'})")
    records = []
    for where, row in rows:
        value = row.get(text_field)
        if value is not None and not isinstance(value, str):
            raise DataError(f"{where}: field {text_field!r} holds {type(value).__name__} values, not text")
        if value and value.strip():
            records.append(value)
    if not records:
        raise DataError(f"{data}: no text to use (the file is empty or every {text_field!r} record is blank)")
    return records


def packed_token_windows(texts: list[str], tokenizer: Any, length: int) -> list[list[int]]:
    """Every text tokenized (with its special tokens) and concatenated, cut into whole windows of
    ``length`` tokens; the tail shorter than a window is dropped."""
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=True)["input_ids"])
    return [ids[i : i + length] for i in range(0, len(ids) - length + 1, length)]


def _load_local_dataset(path: Path, data: str, builder: str, *, sample_by: str = "paragraph") -> Any:
    """A local file through ``datasets``; any failure is a DataError naming the file."""
    import datasets

    kwargs = {"sample_by": sample_by} if builder == "text" else {}
    try:
        return datasets.load_dataset(builder, data_files=str(path), split="train", **kwargs)
    except StopIteration:  # the json builder's answer to a file with no records
        raise DataError(f"{data}: the file holds no records") from None
    except Exception as exc:  # Arrow / JSON / parquet errors: the file is not what its suffix says
        kind = {"json": "JSON", "parquet": "a parquet table", "text": "text"}[builder]
        raise DataError(f"{data}: cannot be read as {kind} ({root_cause(exc)})") from exc


def root_cause(exc: BaseException) -> str:
    """``Type: message`` of the innermost exception: datasets wraps the parser's error in a generic one."""
    while exc.__cause__ is not None or (exc.__context__ is not None and not exc.__suppress_context__):
        exc = exc.__cause__ or exc.__context__
    return f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"


def _load_hub_dataset(data: str, split: str) -> Any:
    import datasets

    try:
        return datasets.load_dataset(data, split=split)
    except Exception as exc:  # offline, unknown id, bad split: one clear message
        raise DataFileNotFoundError(
            f"data file not found: {data!r}; loading it as a datasets hub id (split {split!r}) also failed, "
            f"and hub datasets need network access ({type(exc).__name__}: {exc})"
        ) from exc


def check_text_file(path: Path, name: str) -> None:
    """Refuse an empty file, a binary one (NUL bytes) or one that is not UTF-8 (UTF-16 with a byte-order
    mark, Latin-1, ...), naming the first offending byte. Reads the file in chunks (memory stays flat)."""
    if path.stat().st_size == 0:
        raise DataError(f"{name}: the file is empty")
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0  # of the chunk's first byte in the file
    with path.open("rb") as handle:
        while True:
            chunk = handle.read(1 << 20)
            pending = decoder.getstate()[0]  # bytes of a character cut by the previous chunk
            data = pending + chunk
            start = offset - len(pending)
            try:
                decoder.decode(chunk, final=not chunk)
                bad = None
            except UnicodeDecodeError as exc:
                bad = exc.start
            nul = data.find(b"\0")
            if nul >= 0 and (bad is None or nul < bad):
                raise DataError(
                    f"{name}: not text (NUL byte at offset {start + nul}): a binary file, or UTF-16/32 "
                    "text; convert it to UTF-8"
                )
            if bad is not None:
                bom = (
                    ": a UTF-16 byte-order mark"
                    if start + bad == 0 and data[:2] in (b"\xff\xfe", b"\xfe\xff")
                    else ""
                )
                raise DataError(
                    f"{name}: not UTF-8 text (byte 0x{data[bad]:02x} at offset {start + bad}{bom}); "
                    "convert it to UTF-8"
                )
            if not chunk:
                return
            offset += len(chunk)


def read_records(data: str, required: tuple[str, ...] = (), *, split: str = "test") -> list[tuple[str, dict]]:
    """``(where, row)`` pairs of a local .jsonl/.json/.parquet file or a datasets hub id. ``where`` is
    ``file:line`` for JSONL (``file:row N`` / ``id:row N`` otherwise), so every later error can name it; a
    row lacking a ``required`` field (or holding null there) fails here. JSONL is read line by line (rows
    whose field types differ make no Arrow table), the rest through ``datasets``."""
    path = Path(data).expanduser()
    if path.is_file():
        suffix = path.suffix.lower()
        builder = LOCAL_DATA_BUILDERS.get(suffix)
        if builder not in ("json", "parquet"):
            raise DataError(
                f"{data}: unsupported file type {path.suffix!r} for records (allowed: .jsonl, .json, .parquet)"
            )
        if builder != "parquet":
            check_text_file(path, data)
        if suffix == ".jsonl":
            records = _jsonl_lines(path, data)
        else:
            dataset = _load_local_dataset(path, data, builder)
            records = [(f"{data}:row {n}", row) for n, row in enumerate(dataset.to_list(), start=1)]
    elif looks_like_local_path(data):
        raise DataFileNotFoundError(f"data file not found: {data}")
    else:
        records = [
            (f"{data}:row {n}", row)
            for n, row in enumerate(_load_hub_dataset(data, split).to_list(), start=1)
        ]
    if not records:
        raise DataError(f"{data}: the file holds no records")
    for where, row in records:
        missing = [name for name in required if row.get(name) is None]
        if missing:
            raise DataError(
                f"{where}: missing field {', '.join(repr(m) for m in missing)} "
                f"(each row needs {', '.join(required)})"
            )
    return records


def _jsonl_lines(path: Path, name: str) -> list[tuple[str, dict]]:
    import json

    records = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{name}:{number}: not valid JSON ({exc.msg})") from None
            if not isinstance(row, dict):
                raise DataError(f"{name}:{number}: expected a JSON object, got {type(row).__name__}")
            records.append((f"{name}:{number}", row))
    return records
