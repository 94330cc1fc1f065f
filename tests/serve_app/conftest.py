"""Fixtures shared by the data-plane tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from serve_app.tiny_model import ensure_tiny_model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny chat model, built once per test session.

    ``$HPCSERVE_CACHE`` is reused when set (fast local reruns); otherwise a fresh
    session temp dir, so a run never depends on what an earlier run left behind.
    """
    cache = os.environ.get("HPCSERVE_CACHE") or tmp_path_factory.mktemp("hpcserve-cache")
    return ensure_tiny_model(cache)
