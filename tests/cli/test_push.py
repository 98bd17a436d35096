"""``hf-prune push`` and a recipe's ``publish:``, end to end against the local Hub stand-in (tests/hub_server.py).

Two real outputs are pruned from a tiny Llama saved under an absolute temporary path: a stock one (layer_drop,
with an evaluation, so it carries report.md and eval results) and a remote-code one (text_token_pruning).
Every push checks what arrived against the local bytes read here, that no byte sent names the temporary root,
that the token appears only in the authorization header, and that the local folder did not change.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import huggingface_hub
import pytest
import yaml
from hub_server import HubServer
from tiny_models import pydoc_text, save_tiny_model, write_calibration_file

import hf_prune
from hf_prune.cli import main
from hf_prune.model_card import REMOTE_CODE_NOTE

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TOKEN = "hf_PUBLISHTESTSECRETtoken0123456789abcd"
RENDERED = {"README.md", "hf_prune.json", "report.md"}


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("push-root")
    source = save_tiny_model("llama", root / "source-model")
    data = write_calibration_file(root / "eval.txt", num_chars=3000)
    stock = {
        "model": str(source),
        "output": str(root / "pruned"),
        "stages": [{"method": "layer_drop", "layers": [1, 1]}],
        "evaluate": [{"task": "perplexity", "data": str(data), "seq_len": 16, "limit": 2}],
    }
    hf_prune.prune(stock, progress=False)
    remote = {
        "model": str(source),
        "output": str(root / "pruned-remote"),
        "stages": [{"method": "text_token_pruning", "algorithm": "random", "keep_ratio": 0.5}],
    }
    hf_prune.prune(remote, progress=False)
    return root


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """The stand-in Hub; huggingface_hub online, pointed at it, with the test token and no login cache."""
    constants = huggingface_hub.constants
    with HubServer() as server:
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
        # The agent-detection probe goes to constants.ENDPOINT: keep it here too.
        monkeypatch.setattr(constants, "ENDPOINT", server.url)
        monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-login" / "token"))
        monkeypatch.setattr(constants, "AGENT_HARNESSES_PATH", str(tmp_path / "agents.json"))
        monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        yield server


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def push(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["push", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_token_kept_secret(hub: HubServer, *texts: str, folders: tuple[Path, ...] = ()) -> None:
    """The token is in every request's authorization header and nowhere else: not in what was printed,
    any request's path or body or other headers, any uploaded file, any local file."""
    for text in texts:
        assert TOKEN not in text
    for request in hub.requests:
        if request.path != "/api/agent-harnesses":  # the anonymous probe
            assert request.headers.get("authorization") == f"Bearer {TOKEN}", request.path
        others = {k: v for k, v in request.headers.items() if k != "authorization"}
        assert TOKEN not in request.path + json.dumps(others) and TOKEN.encode() not in request.body
    for repo in hub.repos.values():
        for files in repo.branches.values():
            assert not any(TOKEN.encode() in content for content in files.values())
    for folder in folders:
        assert not any(TOKEN.encode() in content for content in snapshot(folder).values())


def front_matter(card: str) -> dict:
    return yaml.safe_load(card.split("---\n")[1])


def test_push_sends_every_file_and_no_local_path(outputs, hub, capsys):
    folder = outputs / "pruned"
    before = snapshot(folder)
    code, out, err = push(
        capsys, str(folder), "--repo-id", "me/pruned", "--endpoint", hub.url, "--base-model", "org/base"
    )
    assert code == 0, err
    sent = hub.files("me/pruned")
    assert set(sent) == set(before) and {"model.safetensors", "tokenizer.json", "report.md"} <= set(sent)
    for name in set(before) - RENDERED:
        assert sent[name] == before[name], name
    root = str(outputs).encode()
    for name, content in sent.items():
        assert root not in content and str(outputs.resolve()).encode() not in content, name
    assert all(root not in request.body for request in hub.requests)
    card = sent["README.md"].decode()
    data = front_matter(card)
    assert data["base_model"] == "org/base" and data["library_name"] == "transformers"
    assert {"pruned", "hf-prune", "layer_drop"} <= set(data["tags"]) and "finetune" not in data["tags"]
    assert data["model-index"][0]["name"] == "pruned"
    assert 'from_pretrained("me/pruned")' in card and "`source-model`" in card
    report = json.loads(sent["hf_prune.json"])
    assert report["recipe"]["model"] == "source-model" and report["recipe"]["output"] == "pruned"
    assert report["evaluation"][0]["data"] == "eval.txt"
    assert snapshot(folder) == before, "the local folder changed"
    assert hub.repos["me/pruned"].commits[0]["summary"].startswith("Upload model pruned with hf-prune")
    assert len(hub.repos["me/pruned"].commits) == 1 and f"{hub.url}/me/pruned/commit/" in out
    assert_token_kept_secret(hub, out, err, folders=(folder,))


def test_push_of_remote_code_carries_the_modeling_files_and_says_why(outputs, hub, capsys):
    folder = outputs / "pruned-remote"
    before = snapshot(folder)
    code, out, err = push(capsys, str(folder), "--repo-id", "me/remote", "--endpoint", hub.url, "--private")
    assert code == 0, err
    sent = hub.files("me/remote")
    modeling = {name for name in before if name.endswith(".py")}
    assert "prompt_token_pruning.py" in modeling and all(sent[name] == before[name] for name in modeling)
    card = sent["README.md"].decode()
    assert 'from_pretrained("me/remote", trust_remote_code=True)' in card
    assert " ".join(REMOTE_CODE_NOTE.split()) in " ".join(card.split())
    assert "base_model" not in front_matter(card)  # the source is a local folder: no Hub id to name
    assert hub.repos["me/remote"].private and snapshot(folder) == before
    assert_token_kept_secret(hub, out, err)


def test_push_to_a_new_branch_with_a_message(outputs, hub, capsys):
    folder = outputs / "pruned"
    argv = ("--repo-id", "me/branchy", "--endpoint", hub.url)
    assert push(capsys, str(folder), *argv)[0] == 0
    code, out, err = push(capsys, str(folder), *argv, "--revision", "pruned-v2", "--commit-message", "second")
    assert code == 0, err
    assert set(hub.files("me/branchy", "pruned-v2")) == set(snapshot(folder))
    assert hub.repos["me/branchy"].commits[-1] == {**hub.repos["me/branchy"].commits[-1], "summary": "second"}
    assert hub.repos["me/branchy"].commits[-1]["revision"] == "pruned-v2"


def test_dry_run_lists_every_file_and_contacts_nothing(outputs, hub, capsys):
    folder = outputs / "pruned"
    code, out, err = push(capsys, str(folder), "--repo-id", "me/dry", "--endpoint", hub.url, "--dry-run")
    assert code == 0, err
    assert hub.requests == []
    for name in snapshot(folder):
        assert re.search(rf"^  {re.escape(name)} +\S+ k?B", out, flags=re.MULTILINE), name
    assert "README.md" in out and "rendered for the Hub" in out
    assert str(outputs) not in out and TOKEN not in out + err


ERRORS = {
    "401": (401, "*", r"401 no valid token: set HF_TOKEN or run `hf auth login`"),
    "403": (403, "create", r"403 your token has no write access to me/refused"),
    "404": (404, "preupload", r"404 the repo me/refused or its revision main was not found"),
    "409": (409, "commit", r"409 conflict: "),
}


@pytest.mark.parametrize("debug", [False, True], ids=["plain", "debug"])
@pytest.mark.parametrize("case", list(ERRORS))
def test_hub_errors_are_one_line_and_leave_the_folder_alone(case, debug, outputs, hub, capsys):
    status, endpoint, pattern = ERRORS[case]
    hub.fail(status, endpoint)
    folder = outputs / "pruned"
    before = snapshot(folder)
    argv = [str(folder), "--repo-id", "me/refused", "--endpoint", hub.url, *(["--debug"] if debug else [])]
    code, out, err = push(capsys, *argv)
    assert code == 2
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and re.search(pattern, errors[0]), err
    assert ("Traceback" in err) == debug
    assert snapshot(folder) == before
    assert_token_kept_secret(hub, out, err, folders=(folder,))


def test_an_unreachable_hub_is_named(outputs, hub, capsys):
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    closed = f"http://127.0.0.1:{port}"
    code, out, err = push(capsys, str(outputs / "pruned"), "--repo-id", "me/x", "--endpoint", closed)
    assert code == 2 and err.count("error:") == 1
    assert "the Hub is unreachable" in err and closed in err and "HF_ENDPOINT" in err
    assert TOKEN not in out + err


def test_a_file_changed_during_the_upload_is_named(outputs, hub, capsys, tmp_path):
    folder = shutil.copytree(outputs / "pruned", tmp_path / "pruned")
    weights = folder / "model.safetensors"
    before = snapshot(folder)
    hub.on_preupload = lambda: weights.open("ab").write(b"\0")
    code, out, err = push(capsys, str(folder), "--repo-id", "me/moving", "--endpoint", hub.url)
    assert code == 2 and err.count("error:") == 1
    assert re.search(r"model\.safetensors changed while it was being uploaded.*push again", err), err
    after = snapshot(folder)
    assert after.pop("model.safetensors") == before.pop("model.safetensors") + b"\0" and after == before
    assert TOKEN not in out + err


@pytest.mark.parametrize(
    ("argv", "pattern"),
    [
        (["{source}", "--repo-id", "me/x"], r"not an hf-prune output \(no hf_prune\.json\)"),
        (["{missing}", "--repo-id", "me/x"], r"no such folder"),
        (["{pruned}", "--repo-id", "no-namespace"], r"--repo-id: must be a Hub repo id ORG/NAME"),
        (["{pruned}", "--repo-id", "me/bad..name"], r"--repo-id: must be a Hub repo id"),
        (["{pruned}", "--repo-id", "me/x", "--base-model", "/abs/path"], r"--base-model: must be a Hub"),
    ],
)
@pytest.mark.parametrize("dry_run", [False, True], ids=["push", "dry-run"])
def test_bad_input_is_refused_before_any_request(argv, pattern, dry_run, outputs, hub, capsys):
    names = {"source": outputs / "source-model", "missing": outputs / "nope", "pruned": outputs / "pruned"}
    code, out, err = push(
        capsys, *[a.format(**names) for a in argv], "--endpoint", hub.url, *(["--dry-run"] if dry_run else [])
    )
    assert code == 2 and re.search(pattern, err), err
    assert hub.requests == []


def test_offline_mode_is_refused_with_its_remedy(outputs, hub, capsys, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    code, out, err = push(capsys, str(outputs / "pruned"), "--repo-id", "me/x", "--endpoint", hub.url)
    assert code == 2 and "HF_HUB_OFFLINE is set" in err and hub.requests == []


def test_a_recipe_publish_section_pushes_after_the_save(outputs, hub, capsys, tmp_path):
    recipe = {
        "model": str(outputs / "source-model"),
        "output": str(tmp_path / "from-recipe"),
        "stages": [{"method": "layer_drop", "layers": [2, 2]}],
        "publish": {"repo_id": "me/from-recipe", "endpoint": hub.url, "base_model": "org/base"},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main(["prune", str(path), "--quiet"]) == 0
    out = capsys.readouterr().out
    local = snapshot(tmp_path / "from-recipe")
    sent = hub.files("me/from-recipe")
    assert set(sent) == set(local) and sent["model.safetensors"] == local["model.safetensors"]
    assert front_matter(sent["README.md"].decode())["base_model"] == "org/base"
    assert front_matter(local["README.md"].decode())["base_model"] == "org/base"  # publish: names it
    assert "me/from-recipe/commit/" in out and "publish" in json.loads(local["hf_prune.json"])["recipe"]
    assert str(tmp_path).encode() not in b"".join(sent.values())


def test_a_train_recipe_publishes_too(outputs, hub, capsys, tmp_path):
    data = tmp_path / "train.txt"
    data.write_text(pydoc_text(3_000))
    recipe = {
        "model": str(outputs / "source-model"),
        "output": str(tmp_path / "sparse"),
        "train": {"data": str(data), "max_length": 32, "arguments": {"max_steps": 2, "seed": 0}},
        "stages": [
            {"method": "gmp", "final_sparsity": 0.5, "end_step": 2, "frequency": 1, "targets": ["*mlp*"]}
        ],
        "publish": {"repo_id": "me/sparse", "endpoint": hub.url},
    }
    path = tmp_path / "train.json"
    path.write_text(json.dumps(recipe))
    assert main(["train", str(path), "--quiet"]) == 0
    sent, local = hub.files("me/sparse"), snapshot(tmp_path / "sparse")
    assert set(sent) == set(local) and sent["model.safetensors"] == local["model.safetensors"]
    assert "me/sparse/commit/" in capsys.readouterr().out
    assert str(tmp_path).encode() not in b"".join(sent.values())


@pytest.mark.slow
def test_hf_endpoint_is_honoured_in_a_fresh_process(outputs, hub, tmp_path):
    env = {
        **os.environ,
        "HF_ENDPOINT": hub.url,
        "HF_HUB_OFFLINE": "0",
        "HF_HUB_DISABLE_XET": "1",
        "HF_TOKEN": TOKEN,
        "HF_HOME": str(tmp_path / "hf-home"),
        "OMP_NUM_THREADS": "1",
    }
    argv = [sys.executable, "-m", "hf_prune.cli", "push", str(outputs / "pruned"), "--repo-id", "me/env"]
    result = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "model.safetensors" in hub.files("me/env") and f"{hub.url}/me/env/commit/" in result.stdout
    assert TOKEN not in result.stdout + result.stderr
    assert not any(TOKEN.encode() in p.read_bytes() for p in (tmp_path / "hf-home").rglob("*") if p.is_file())
