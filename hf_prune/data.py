"""Reading text through ``datasets``: local .txt / .jsonl / .json / .parquet files, or a hub dataset id.

Shared by calibration and evaluation, so both accept the same sources and fail the same way.
"""

from __future__ import annotations

from pathlib import Path

from .errors import DataError

#: File suffix -> ``datasets`` builder.
LOCAL_DATA_BUILDERS = {".txt": "text", ".text": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def looks_like_local_path(data: str) -> bool:
    """A reference meant as a file (a known suffix or an explicit path), not a datasets hub id."""
    return Path(data).suffix.lower() in LOCAL_DATA_BUILDERS or data.startswith(("./", "../", "/", "~", "."))


def load_text_records(data: str, *, text_field: str = "text", split: str = "train",
                      sample_by: str = "paragraph") -> list[str]:
    """The non-blank text records of ``data``; a .txt file is cut by ``sample_by`` (line/paragraph/document)."""
    import datasets

    path = Path(data).expanduser()
    if path.is_file():
        builder = LOCAL_DATA_BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise DataError(f"{data}: unsupported file type {path.suffix!r} "
                            f"(allowed: {', '.join(sorted(LOCAL_DATA_BUILDERS))})")
        kwargs = {"sample_by": sample_by} if builder == "text" else {}
        try:
            dataset = datasets.load_dataset(builder, data_files=str(path), split="train", **kwargs)
        except StopIteration:  # the json builder's answer to a file with no records
            raise DataError(f"{data}: the file holds no records") from None
    elif looks_like_local_path(data):
        raise FileNotFoundError(f"data file not found: {data}")
    else:
        try:
            dataset = datasets.load_dataset(data, split=split)
        except Exception as exc:  # offline, unknown id, bad split: one clear message
            raise FileNotFoundError(
                f"data file not found: {data!r}; loading it as a datasets hub id (split {split!r}) also failed, "
                f"and hub datasets need network access ({type(exc).__name__}: {exc})") from exc
    if text_field not in dataset.column_names:
        raise DataError(f"{data}: no text field {text_field!r} (fields: {', '.join(dataset.column_names) or 'none'})")
    records = []
    for value in dataset[text_field]:
        if value is not None and not isinstance(value, str):
            raise DataError(f"{data}: field {text_field!r} holds {type(value).__name__} values, not text")
        if value and value.strip():
            records.append(value)
    if not records:
        raise DataError(f"{data}: no text to use (the file is empty or every {text_field!r} record is blank)")
    return records


def read_records(data: str, required: tuple[str, ...] = (), *, split: str = "test") -> list[tuple[str, dict]]:
    """``(where, row)`` pairs of a local .jsonl/.json/.parquet file or a datasets hub id, read through
    ``datasets``. ``where`` is ``file:line`` for JSONL (``file:row N`` / ``id:row N`` otherwise), so every
    later error can name it; a row lacking a ``required`` field (or holding null there) fails here."""
    import datasets

    path = Path(data).expanduser()
    if path.is_file():
        suffix = path.suffix.lower()
        if LOCAL_DATA_BUILDERS.get(suffix) not in ("json", "parquet"):
            raise DataError(f"{data}: unsupported file type {path.suffix!r} for records (allowed: .jsonl, .json, .parquet)")
        try:
            dataset = datasets.load_dataset(LOCAL_DATA_BUILDERS[suffix], data_files=str(path), split="train")
        except Exception as exc:  # StopIteration included: the json builder's answer to an empty file
            if suffix != ".jsonl":
                raise DataError(f"{data}: cannot be read as a table ({type(exc).__name__}: {exc})") from exc
            # Bad JSON, or fields whose type changes from row to row (no Arrow table): read line by line.
            records = _jsonl_lines(path, data)
        else:
            if suffix == ".jsonl":
                with path.open(encoding="utf-8") as handle:
                    wheres = [f"{data}:{n}" for n, line in enumerate(handle, start=1) if line.strip()]
            else:
                wheres = [f"{data}:row {n}" for n in range(1, dataset.num_rows + 1)]
            records = list(zip(wheres, dataset.to_list(), strict=True))
    elif looks_like_local_path(data):
        raise FileNotFoundError(f"data file not found: {data}")
    else:
        try:
            dataset = datasets.load_dataset(data, split=split)
        except Exception as exc:
            raise FileNotFoundError(
                f"data file not found: {data!r}; loading it as a datasets hub id (split {split!r}) also failed, "
                f"and hub datasets need network access ({type(exc).__name__}: {exc})") from exc
        records = [(f"{data}:row {n}", row) for n, row in enumerate(dataset.to_list(), start=1)]
    if not records:
        raise DataError(f"{data}: the file holds no records")
    for where, row in records:
        missing = [name for name in required if row.get(name) is None]
        if missing:
            raise DataError(f"{where}: missing field {', '.join(repr(m) for m in missing)} "
                            f"(each row needs {', '.join(required)})")
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
