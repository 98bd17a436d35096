"""Publishing a saved hf-prune output to the Hub in one commit (``hf-prune push`` and a recipe's ``publish:``).

The local folder is never changed. Every file goes up byte-identical except two, which are sent as the Hub
should see them and never written to disk: ``README.md`` (the card re-rendered to load from the repo id,
with no local path) and ``hf_prune.json`` (every local path in it reduced to its base name); text reports
(``report.md``) get the recipe's local paths reduced the same way. Everything that can be refused is refused
before the first request: a folder that is not an hf-prune output, a bad repo id, an unreadable file.

The address is ``endpoint``, else ``HF_ENDPOINT`` (huggingface_hub's rule); the token is huggingface_hub's
(``HF_TOKEN``, then the login cache) and is never printed, logged or written: messages are built here, not
copied from the exception, and anything quoted from the server has the token masked.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hf_prune.checkpoint import hub_model_card
from hf_prune.errors import PublishError, clip
from hf_prune.model_card import public_value
from hf_prune.output_safety import REPORT_FILE, format_bytes
from hf_prune.recipe_sections import repo_id_problem

#: Files rendered for the Hub (not sent as they are on disk), and what the dry run says of them.
HUB_RENDERED = {
    "README.md": "the model card rendered for the Hub: loads from the repo id, no local path",
    REPORT_FILE: "the report with local paths reduced to base names",
}
#: Text reports whose local paths (those the recipe names) are reduced to base names before upload.
_SCRUBBED_SUFFIXES = (".md",)
#: Never published: caches, version control, editor and lock leftovers (a save leaves its own temporary
#: folders beside the output, not in it; hidden names are skipped all the same).
_SKIPPED_DIRS = {"__pycache__", ".git", ".cache", ".ipynb_checkpoints"}
_SKIPPED_SUFFIXES = (".pyc", ".lock", ".tmp", ".swp")


@dataclass(frozen=True)
class UploadFile:
    """One file of the commit: ``local`` is sent as it is; ``content`` replaces the file's bytes."""

    path_in_repo: str
    local: Path
    size: int
    content: bytes | None = None
    note: str = ""


@dataclass
class PushResult:
    repo_id: str
    repo_url: str
    commit_url: str
    commit_oid: str
    revision: str
    files: list[UploadFile] = field(default_factory=list)


# ---- what would be sent ---------------------------------------------------------------------------------


def plan_upload(
    folder: str | os.PathLike, repo_id: str, *, base_model: str | None = None
) -> list[UploadFile]:
    """The files of the commit, in name order, after the checks that need no network."""
    root = Path(folder).expanduser()
    report = read_output_report(root)
    local_paths = _recipe_local_paths(report.get("recipe") or {})
    files = []
    for path in _publishable_files(root):
        name = path.relative_to(root).as_posix()
        if name == "README.md":
            content = hub_model_card(root, report, repo_id, base_model=base_model).encode()
        elif name == REPORT_FILE:
            content = (json.dumps(public_value(report), indent=2) + "\n").encode()
        elif path.suffix in _SCRUBBED_SUFFIXES:
            content = _scrub(_read(path), local_paths)
            content = None if content == _read(path) else content
        else:
            content = None
        size = len(content) if content is not None else path.stat().st_size
        note = HUB_RENDERED.get(name) or ("local paths reduced to base names" if content is not None else "")
        files.append(UploadFile(name, path, size, content, note))
    return files


def describe_plan(files: list[UploadFile]) -> list[str]:
    """Lines of a dry run: each file with its size, and what was rendered for the Hub."""
    width = max(len(f.path_in_repo) for f in files)
    lines = [
        f"  {f.path_in_repo:<{width}}  {format_bytes(f.size):>9}" + (f"  ({f.note})" if f.note else "")
        for f in files
    ]
    total = format_bytes(sum(f.size for f in files))
    return [*lines, f"{len(files)} files, {total}; every file not marked is sent byte-identical"]


def read_output_report(root: Path) -> dict[str, Any]:
    """``hf_prune.json`` of an output folder; refuses a folder that is not an hf-prune output."""
    if not root.exists():
        raise PublishError(f"{root}: no such folder")
    if not root.is_dir():
        raise PublishError(f"{root}: not a folder (push takes the output folder of hf-prune prune / train)")
    for required in (REPORT_FILE, "config.json"):
        if not (root / required).is_file():
            raise PublishError(
                f"{root}: not an hf-prune output (no {required}); push publishes a folder saved by "
                "hf-prune prune or hf-prune train"
            )
    try:
        report = json.loads(_read(root / REPORT_FILE))
    except ValueError as exc:
        raise PublishError(f"{root / REPORT_FILE}: not valid JSON ({exc}); save the output again") from None
    if not isinstance(report, dict) or not isinstance(report.get("stages"), list):
        raise PublishError(f"{root / REPORT_FILE}: not an hf-prune report (no stages); save the output again")
    return report


def _publishable_files(root: Path) -> list[Path]:
    found = []
    try:
        for dirpath, dirnames, filenames in os.walk(root, onerror=_raise_unreadable):
            dirnames[:] = sorted(d for d in dirnames if d not in _SKIPPED_DIRS and not d.startswith("."))
            for name in sorted(filenames):
                path = Path(dirpath) / name
                if name.startswith(".") or name.endswith(_SKIPPED_SUFFIXES) or not path.is_file():
                    continue
                if not os.access(path, os.R_OK):
                    raise PublishError(f"{path}: cannot be read (permission denied); nothing was sent")
                found.append(path)
    except OSError as exc:
        raise PublishError(f"{root}: cannot be read ({exc.strerror or exc}); nothing was sent") from None
    return found


def _raise_unreadable(exc: OSError) -> None:
    raise exc


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise PublishError(f"{path}: cannot be read ({exc.strerror or exc}); nothing was sent") from None


def _recipe_local_paths(recipe: dict[str, Any]) -> dict[str, str]:
    """Each local path string the recipe holds (as written, and expanded / resolved) → its public form."""
    found: dict[str, str] = {}

    def walk(value: Any, key: str | None) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(v, k)
        elif isinstance(value, list):
            for item in value:
                walk(item, key)
        elif isinstance(value, str) and (public := public_value(value, key)) != value:
            for form in (value, os.path.expanduser(value), os.path.abspath(os.path.expanduser(value))):
                found[form.rstrip("/")] = public

    walk(recipe, None)
    return found


def _scrub(text: bytes, local_paths: dict[str, str]) -> bytes:
    for path in sorted(local_paths, key=len, reverse=True):  # longest first: /a/b before /a
        if len(path) > 1:
            text = text.replace(path.encode(), local_paths[path].encode())
    return text


# ---- fingerprints: a file that changes while it is sent ---------------------------------------------------


def fingerprint(path: Path) -> tuple[int, int, str]:
    """(size, mtime_ns, sha256) of a file."""
    stat = path.stat()
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return stat.st_size, stat.st_mtime_ns, digest.hexdigest()


def _changed_files(files: list[UploadFile], before: dict[str, tuple[int, int, str]]) -> list[str]:
    changed = []
    for upload in files:
        try:
            now = fingerprint(upload.local)
        except OSError:
            now = None
        if now != before[upload.path_in_repo]:
            changed.append(upload.path_in_repo)
    return changed


# ---- the push -------------------------------------------------------------------------------------------


def check_repo_ids(repo_id: str, base_model: str | None = None, *, key: str = "--repo-id") -> None:
    """Refuse a repo id (or base model id) the Hub would refuse, naming ``key``, before any request."""
    problem = repo_id_problem(repo_id)
    if problem:
        raise PublishError(f"{key}: {problem}")
    if base_model is not None and repo_id_problem(base_model):
        raise PublishError(f"--base-model: must be a Hub model id ORG/NAME, got {base_model!r}")


def push_folder(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    endpoint: str | None = None,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    base_model: str | None = None,
    progress: bool = True,
    key: str = "--repo-id",
) -> PushResult:
    """Create the repo (or use it), create ``revision`` when it is a missing branch, and commit every file
    of ``plan_upload`` in one commit. ``key`` names the repo id in errors (``publish.repo_id`` in a recipe)."""
    check_repo_ids(repo_id, base_model, key=key)
    report = read_output_report(Path(folder).expanduser())
    files = plan_upload(folder, repo_id, base_model=base_model)
    before = {f.path_in_repo: fingerprint(f.local) for f in files}

    import huggingface_hub
    from huggingface_hub import CommitOperationAdd, HfApi

    if huggingface_hub.constants.is_offline_mode():
        raise PublishError(
            "HF_HUB_OFFLINE is set: a push needs the Hub; unset it (or set it to 0) and push again"
        )
    if not progress:
        huggingface_hub.utils.disable_progress_bars()
    api = HfApi(endpoint=endpoint)  # endpoint None: HF_ENDPOINT, else huggingface.co; token: HF_TOKEN, login
    branch = revision or "main"
    methods = ", ".join(dict.fromkeys(stage["method"] for stage in report["stages"]))
    message = commit_message or f"Upload model pruned with hf-prune ({methods})"
    step = "create the repo"
    try:
        repo_url = api.create_repo(repo_id, private=private, exist_ok=True)
        if branch != "main":
            step = f"create the branch {branch}"
            api.create_branch(repo_id, branch=branch, exist_ok=True)
        operations = [
            CommitOperationAdd(f.path_in_repo, f.content if f.content is not None else str(f.local))
            for f in files
        ]
        step = "upload the files"
        info = api.create_commit(repo_id, operations=operations, commit_message=message, revision=branch)
    except Exception as exc:  # huggingface_hub, httpx and OS errors: one line, no token
        error = _publish_error(exc, step=step, repo_id=repo_id, branch=branch, endpoint=api.endpoint)
        if error is None:
            raise
        raise error from None
    changed = _changed_files(files, before)
    if changed:
        raise PublishError(
            f"{', '.join(changed)} changed while it was being uploaded: the Hub copy in {repo_id} may not match "
            f"the local one (commit {info.oid}); wait for whatever writes it to finish and push again"
        )
    return PushResult(repo_id, str(repo_url), info.commit_url, info.oid, branch, files)


def _publish_error(
    exc: Exception, *, step: str, repo_id: str, branch: str, endpoint: str
) -> PublishError | None:
    """The one-line error for a failed request, or None for an exception that is no request failure."""
    import httpx2
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    where = f"could not {step} ({repo_id} on {endpoint})"
    if isinstance(exc, OfflineModeIsEnabled):
        return PublishError("HF_HUB_OFFLINE is set: a push needs the Hub; unset it and push again")
    if isinstance(exc, (httpx2.TransportError, ConnectionError)):
        return PublishError(
            f"{where}: the Hub is unreachable ({type(exc).__name__}); check the address (--endpoint, "
            f"publish.endpoint or HF_ENDPOINT, now {endpoint}) and your network, then push again"
        )
    if not isinstance(exc, HfHubHTTPError) or exc.response is None:
        return None
    status = exc.response.status_code
    said = _server_said(exc)
    hints = {
        401: "no valid token: set HF_TOKEN or run `hf auth login` (a token with write access)",
        403: f"your token has no write access to {repo_id}: use a token with write permission "
        "for that user or organization, or another --repo-id",
        404: f"the repo {repo_id} or its revision {branch} was not found: check --repo-id and --revision",
        409: f"conflict: {repo_id} may exist with another type (a dataset or Space), or the branch {branch} "
        "moved while pushing: check the repo on the Hub and push again",
    }
    hint = hints.get(status, "the Hub refused the request; check the repo on the Hub and push again")
    return PublishError(f"{where}: {status} {hint}{said}")


def _server_said(exc: Any) -> str:
    """What the server's message added, clipped, with the token masked (a server may echo a header)."""
    from huggingface_hub import get_token

    text = " ".join(str(getattr(exc, "server_message", "") or "").split())
    token = get_token()
    if token:
        text = text.replace(token, "***")
    return f" (the Hub said: {clip(text, 200)})" if text else ""
