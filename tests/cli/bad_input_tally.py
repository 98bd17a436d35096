"""Tally what the CLI does with every bad input of ``test_cli_bad_input.py``, by outcome, without asserting.

    python tests/cli/bad_input_tally.py [--json out.json]

Runs each case in this process against whatever ``hf_prune`` is installed (so an older checkout can be
measured with the same cases) and sorts the outcomes into the categories of the data-safety review:
clear error (exit 2, one line naming the problem), unclear error (exit 2, but not the expected words or
more than one line), raw traceback (an exception escaped, or exit 1), crash (out of memory or over the
time limit), silently wrong (exit 0), data loss (a file in the workspace changed or vanished) and foreign
code run. A case counts once, in its worst category.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import re
import resource
import shutil
import signal
import sys
import tempfile
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]
from test_cli_bad_input import CASES, Workspace, _build_models, _snapshot, _write_data  # noqa: E402

CATEGORIES = (
    "clear error",
    "unclear error",
    "raw traceback",
    "crash",
    "silently wrong",
    "data loss",
    "foreign code run",
)
TIME_LIMIT_S = 60
MEMORY_LIMIT = 8 << 30


class _TimeUp(Exception):
    pass


def _on_alarm(signum, frame):
    raise _TimeUp


def run_case(name: str, prepared: Path, scratch: Path) -> tuple[str, str]:
    import os

    from hf_prune.cli import main

    root = scratch / name
    shutil.copytree(prepared, root)
    home, work = root / "home", root / "work"
    for folder in (home / ".ssh", work / "documents"):
        folder.mkdir(parents=True)
    (home / ".ssh" / "id_ed25519").write_text("secret key")
    (work / "documents" / "thesis.txt").write_text("years of work")
    os.environ["HOME"], os.environ["FOREIGN_CODE_SENTINEL"] = str(home), str(root / "FOREIGN_CODE_RAN")
    os.chdir(work)
    ws = Workspace(root, root / "models" / "stories", home, work)
    build_argv, pattern = CASES[name]
    argv = [*build_argv(ws), "--quiet"]
    before = _snapshot(root)
    err = io.StringIO()
    signal.alarm(TIME_LIMIT_S)
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                code = main(argv)
            except SystemExit as exit_:
                code = exit_.code
    except (_TimeUp, MemoryError) as exc:
        outcome = "crash", type(exc).__name__
    except BaseException as exc:  # noqa: BLE001 — what escaped is the finding
        outcome = "raw traceback", f"{type(exc).__name__}: {str(exc)[:120]}"
    else:
        lines = [line for line in err.getvalue().splitlines() if "error:" in line]
        if code == 0:
            outcome = "silently wrong", "exit 0"
        elif code != 2:
            outcome = "raw traceback", (lines or [f"exit {code}"])[-1][:160]
        elif len(lines) == 1 and re.search(pattern, lines[0]):
            outcome = "clear error", lines[0][:160]
        else:
            outcome = "unclear error", " | ".join(lines)[:160]
    finally:
        signal.alarm(0)
        os.chdir(scratch)
    if (root / "FOREIGN_CODE_RAN").exists():
        return "foreign code run", outcome[1]
    after = _snapshot(root)
    lost = [
        path for path in before if path not in after or (before[path] != after[path] and "models" in path)
    ]
    if lost:
        return "data loss", f"{lost[:3]} ({outcome[1]})"
    return outcome


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--json", help="also write every case's outcome here")
    args = parser.parse_args()
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))
    signal.signal(signal.SIGALRM, _on_alarm)
    with tempfile.TemporaryDirectory(prefix="bad-input-tally-") as scratch:
        scratch = Path(scratch)
        prepared = scratch / "prepared"
        _build_models(prepared / "models")
        _write_data(prepared / "data")
        outcomes = {name: run_case(name, prepared, scratch) for name in CASES}
    totals = {category: sum(1 for c, _ in outcomes.values() if c == category) for category in CATEGORIES}
    for name, (category, detail) in outcomes.items():
        if category != "clear error":
            print(f"{category:<17} {name:<32} {detail}")
    print(f"\n{len(outcomes)} cases: " + ", ".join(f"{n} {c}" for c, n in totals.items()))
    if args.json:
        Path(args.json).write_text(json.dumps({"totals": totals, "cases": outcomes}, indent=2) + "\n")


if __name__ == "__main__":
    main()
