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


def read_jsonl_records(path: str, required: tuple[str, ...] = ()) -> list[dict]:
    """Rows of a local JSONL file; errors name the file and the 1-based line (bad JSON, missing fields)."""
    import json

    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    rows = []
    with file.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
            missing = [name for name in required if name not in row]
            if missing:
                raise DataError(f"{path}:{number}: missing field {', '.join(repr(m) for m in missing)} "
                                f"(each row needs {', '.join(required)})")
            rows.append(row)
    if not rows:
        raise DataError(f"{path}: the file holds no records")
    return rows
