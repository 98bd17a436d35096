"""A small stand-in for the Hub's upload API on 127.0.0.1, for push tests that never leave the machine.

It answers what huggingface_hub 2.4 calls for a commit: ``POST /api/repos/create``, ``POST
/api/models/{repo}/branch/{branch}``, ``POST /api/models/{repo}/preupload/{rev}`` (every file
``uploadMode: "regular"``, so contents travel base64 inside the commit and neither LFS nor Xet is
involved), ``POST /api/models/{repo}/commit/{rev}`` (NDJSON: a ``header`` line, then ``file`` /
``deletedFile`` lines), ``GET /api/models/{repo}[/revision/{rev}]``, ``POST /api/validate-yaml``,
``GET /api/whoami-v2``, and ``GET /api/agent-harnesses`` (404). Files are kept in memory per (repo,
branch); every request is recorded (method, path, headers, body) so tests can search them.

``fail(status, endpoint)`` makes one endpoint (or ``"*"``: all) answer ``status``; ``on_preupload`` runs
before the preupload answer (a test changes a local file there, mid-push).
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote, urlsplit


@dataclass
class Recorded:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Repo:
    private: bool
    branches: dict[str, dict[str, bytes]] = field(default_factory=lambda: {"main": {}})
    commits: list[dict[str, Any]] = field(default_factory=list)


class HubServer:
    def __init__(self) -> None:
        self.requests: list[Recorded] = []
        self.repos: dict[str, Repo] = {}
        self.failures: dict[str, int] = {}
        self.on_preupload: Callable[[], None] | None = None
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> HubServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._server.shutdown()
        self._server.server_close()

    def fail(self, status: int, endpoint: str = "*") -> None:
        """Answer ``status`` at ``endpoint`` (create, branch, preupload, commit, info, validate, or *)."""
        self.failures[endpoint] = status

    def files(self, repo_id: str, branch: str = "main") -> dict[str, bytes]:
        return self.repos[repo_id].branches[branch]


def _handler_for(hub: HubServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:  # keep test output clean
            pass

        def do_GET(self) -> None:
            self._dispatch("GET")

        def do_POST(self) -> None:
            self._dispatch("POST")

        def _dispatch(self, method: str) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            path = unquote(urlsplit(self.path).path)
            hub.requests.append(
                Recorded(method, self.path, {k.lower(): v for k, v in self.headers.items()}, body)
            )
            try:
                self._route(method, path, body)
            except Exception as exc:  # a bug here shows as a 500 with its text, not a hang
                self._answer(500, {"error": f"test server: {type(exc).__name__}: {exc}"})

        def _route(self, method: str, path: str, body: bytes) -> None:
            parts = path.strip("/").split("/")
            if path == "/api/agent-harnesses":
                return self._answer(404, {"error": "not here"})
            if path == "/api/whoami-v2":
                return self._answer(200, {"name": "tester", "type": "user", "orgs": []})
            if path == "/api/validate-yaml":
                return self._failed("validate") or self._answer(200, {})
            if path == "/api/repos/create" and method == "POST":
                return self._failed("create") or self._create(json.loads(body))
            if len(parts) >= 4 and parts[:2] == ["api", "models"]:
                repo_id, rest = f"{parts[2]}/{parts[3]}", parts[4:]
                if method == "GET" and (not rest or rest[0] == "revision"):
                    return self._failed("info") or self._info(repo_id, "/".join(rest[1:]) or "main")
                if method == "POST" and len(rest) >= 2:
                    kind, revision = rest[0], "/".join(rest[1:])
                    if kind in ("branch", "preupload", "commit"):
                        return self._failed(kind) or getattr(self, f"_{kind}")(repo_id, revision, body)
            return self._answer(404, {"error": f"no route {method} {path}"})

        def _failed(self, endpoint: str) -> bool:
            status = hub.failures.get(endpoint) or hub.failures.get("*")
            if status is None:
                return False
            self._answer(status, {"error": f"planted {status} at {endpoint}"})
            return True

        def _create(self, payload: dict[str, Any]) -> None:
            repo_id = f"{payload['organization']}/{payload['name']}"
            if repo_id in hub.repos:
                return self._answer(
                    409, {"error": "You already created this model repo", "url": self._url(repo_id)}
                )
            hub.repos[repo_id] = Repo(private=payload.get("visibility") == "private")
            self._answer(200, {"url": self._url(repo_id)})

        def _branch(self, repo_id: str, branch: str, body: bytes) -> None:
            repo = self._repo(repo_id)
            if repo is None:
                return None
            if branch in repo.branches:
                return self._answer(409, {"error": "Reference already exists"})
            repo.branches[branch] = dict(repo.branches["main"])
            self._answer(200, {})

        def _preupload(self, repo_id: str, revision: str, body: bytes) -> None:
            if self._repo(repo_id, revision) is None:
                return None
            if hub.on_preupload is not None:
                hub.on_preupload()
            files = json.loads(body)["files"]
            answer = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]
            self._answer(200, {"files": answer})

        def _commit(self, repo_id: str, revision: str, body: bytes) -> None:
            repo = self._repo(repo_id, revision)
            if repo is None:
                return None
            lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
            assert lines[0]["key"] == "header", lines[0]
            files = repo.branches[revision]
            for line in lines[1:]:
                value = line["value"]
                if line["key"] == "file":
                    assert value["encoding"] == "base64"
                    files[value["path"]] = base64.b64decode(value["content"])
                elif line["key"] == "deletedFile":
                    files.pop(value["path"], None)
                else:
                    raise ValueError(f"unexpected commit line {line['key']}")
            oid = hashlib.sha1(body).hexdigest()
            repo.commits.append({"oid": oid, "revision": revision, "summary": lines[0]["value"]["summary"]})
            self._answer(
                200,
                {"commitUrl": f"{self._url(repo_id)}/commit/{oid}", "commitOid": oid, "pullRequestUrl": None},
            )

        def _info(self, repo_id: str, revision: str) -> None:
            repo = self._repo(repo_id, revision)
            if repo is None:
                return None
            sha = repo.commits[-1]["oid"] if repo.commits else "0" * 40
            siblings = [{"rfilename": name} for name in sorted(repo.branches[revision])]
            self._answer(200, {"id": repo_id, "sha": sha, "private": repo.private, "siblings": siblings})

        def _repo(self, repo_id: str, revision: str | None = None) -> Repo | None:
            repo = hub.repos.get(repo_id)
            if repo is None:
                self._answer(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
            elif revision is not None and revision not in repo.branches:
                self._answer(
                    404, {"error": f"Invalid rev id: {revision}"}, {"X-Error-Code": "RevisionNotFound"}
                )
                return None
            return repo

        def _url(self, repo_id: str) -> str:
            return f"{hub.url}/{repo_id}"

        def _answer(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(data)

    return Handler
