"""Shared test fixtures. Real data is read from ../shared/data (relative to the repo root)."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from local_http import FakeServer

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = (REPO_ROOT / ".." / "shared" / "data").resolve()
GPT2_VOCAB = SHARED_DATA / "gpt2_vocab"

# CLI runs in the tests keep JAX's compilation cache out of the user's home.
os.environ.setdefault("XDG_CACHE_HOME", str(Path(os.environ.get("TMPDIR", "/tmp")) / f"jaxft-test-cache-{os.getuid()}"))

# Subprocesses (CLI tests) and library code find the genuine vocabulary offline.
if GPT2_VOCAB.is_dir():
    os.environ.setdefault("JAXFT_GPT2_VOCAB", str(GPT2_VOCAB))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data; skipped where absent, except in CI (where .ci/run refuses to start)."""
    if not SHARED_DATA.is_dir():
        if os.environ.get("CI"):
            pytest.fail(f"{SHARED_DATA} is missing in CI")
        pytest.skip(f"{SHARED_DATA} not present")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tokenizer(shared_data):
    from jaxft.tokenizer import from_files

    return from_files(shared_data / "gpt2_vocab")


@pytest.fixture
def server() -> Iterator[FakeServer]:
    """A scripted HTTP server on 127.0.0.1 (see tests/local_http.py)."""
    s = FakeServer()
    yield s
    s.close()


@pytest.fixture
def refused_url() -> str:
    """A URL on 127.0.0.1 where nothing listens (connection refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/f.bin"
