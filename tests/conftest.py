"""Shared test helpers.

Real models and corpora live outside the repository, in ``../shared/assets`` beside the checkout.
A fresh machine may lack that folder, so tests that need it skip there; CI sets
``HF_PRUNE_REQUIRE_ASSETS=1`` so that a missing folder fails instead of silently skipping.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# A stray Hub lookup costs 23-46 s before failing: every test runs offline.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_EVALUATE_OFFLINE", "1")

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_ASSETS = REPO_ROOT.parent / "shared" / "assets"
REQUIRE_ASSETS_ENV = "HF_PRUNE_REQUIRE_ASSETS"


def assets_required() -> bool:
    """Whether a missing shared-assets folder must fail the test rather than skip it."""
    return os.environ.get(REQUIRE_ASSETS_ENV, "").strip().lower() in {"1", "true", "yes"}


def _shared_assets_root() -> Path:
    if not SHARED_ASSETS.is_dir():
        reason = f"shared assets folder {SHARED_ASSETS} is absent"
        if assets_required():
            pytest.fail(f"{reason} and {REQUIRE_ASSETS_ENV}=1 requires it", pytrace=False)
        pytest.skip(f"{reason} (set {REQUIRE_ASSETS_ENV}=1 to make this a failure)")
    return SHARED_ASSETS


def shared_asset(relpath: str | os.PathLike) -> Path:
    """Path of ``relpath`` under ``../shared/assets``; skips (or fails, see module doc) without it.

    Only the absence of the whole folder is a reason to skip: with the folder present, a missing
    file is a broken path or setup and always fails.
    """
    path = _shared_assets_root() / relpath
    if not path.exists():
        pytest.fail(f"shared asset {relpath!s} not found at {path}", pytrace=False)
    return path


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread for modules of tiny models (``pytestmark = usefixtures(...)``), restored after:
    tiny matmuls gain nothing from threads, and on a busy 2-core machine two threads waiting on each
    other make a forward pass ~20x slower."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def shared_assets() -> Path:
    """Root of the shared assets, under the same skip-or-fail rule as :func:`shared_asset`."""
    return _shared_assets_root()
