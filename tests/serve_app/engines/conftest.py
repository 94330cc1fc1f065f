"""vLLM test fixtures: a bare vLLM OpenAI server on the tiny model, /dev/shm hygiene.

Fixtures only (nothing here runs unless a vLLM test asks for it), so other engine
tests in this directory do not need vLLM installed.

Why a real bare server: output parity is only meaningful against what users would
otherwise run (``python -m vllm.entrypoints.openai.api_server``), started with the
same model, context length, KV cache size and eager mode as the hpcserve replica.
Everything started here is stopped by its own PID (its process group, since the
server forks an EngineCore), never by name.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from cluster.bench.servers import cleanup_shm
from cluster.ports import free_port

MAX_MODEL_LEN = 2048  # the tiny model's limit: long streams for the disconnect test
KV_CACHE_BYTES = 64 * 1024 * 1024
START_TIMEOUT_S = 240


def vllm_env(cache_root: Path) -> dict[str, str]:
    """What both the bare server and the hpcserve replica run with: the tiny model's
    small-node environment (see ``SMALL_NODE_ENV``), without which the spinning
    executor starves everything else on a 2-core box."""
    from serve_app.engines.vllm import SMALL_NODE_ENV

    return {"HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1",
            "VLLM_CACHE_ROOT": str(cache_root), **SMALL_NODE_ENV}


@pytest.fixture(scope="module")
def shm_guard() -> Iterator[None]:
    """Remove the ``/dev/shm/psm_*`` files vLLM leaves behind, only our own: those
    created while this module ran that no live process holds any more."""
    before = set(Path("/dev/shm").glob("psm_*"))
    yield
    cleanup_shm(before)


@dataclass
class BareVLLM:
    process: subprocess.Popen
    base_url: str
    model: str
    log: Path

    def stop(self) -> None:
        """SIGTERM the server's process group (it and its EngineCore), then SIGKILL."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.process.pid, signal.SIGKILL)  # children that outlived it
        except ProcessLookupError:
            pass
        self.process.wait()


def start_bare_vllm(model_dir: Path, name: str, workdir: Path) -> BareVLLM:
    """Start ``api_server`` on a free port (not waiting for it to be ready)."""
    port = free_port()
    log = workdir / f"bare-vllm-{port}.log"
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server",
           "--model", str(model_dir), "--served-model-name", name,
           "--host", "127.0.0.1", "--port", str(port), "--enforce-eager",
           "--max-model-len", str(MAX_MODEL_LEN),
           "--kv-cache-memory-bytes", str(KV_CACHE_BYTES), "--disable-log-stats"]
    env = {**os.environ, **vllm_env(workdir / "vllm-cache-bare")}
    with open(log, "wb") as out:
        process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env,
                                   start_new_session=True)
    return BareVLLM(process, f"http://127.0.0.1:{port}/v1", name, log)


def wait_ready(server: BareVLLM, timeout: float = START_TIMEOUT_S) -> bool:
    deadline = time.monotonic() + timeout
    health = server.base_url.removesuffix("/v1") + "/health"
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            return False
        try:
            if httpx.get(health, timeout=2).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(1)
    return False


@pytest.fixture(scope="module")
def bare_vllm_starting(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory,
                       shm_guard) -> Iterator[BareVLLM]:
    """The bare server, started but maybe not ready yet: lets hpcserve start alongside."""
    workdir = tmp_path_factory.mktemp("bare-vllm")
    server = start_bare_vllm(tiny_model_dir, "tiny", workdir)
    try:
        yield server  # `bare_vllm` may swap in a restarted process after a failed start
    finally:
        server.stop()


@pytest.fixture(scope="module")
def bare_vllm(bare_vllm_starting: BareVLLM, tiny_model_dir: Path) -> BareVLLM:
    """The bare server, ready; a failed start is retried once (known start flake)."""
    server = bare_vllm_starting
    t0 = time.monotonic()
    ok = wait_ready(server)
    print(f"bare vLLM: waited {time.monotonic() - t0:.1f}s", flush=True)
    if ok:
        return server
    server.stop()
    tail = server.log.read_text(errors="replace")[-3000:]
    retry = start_bare_vllm(tiny_model_dir, "tiny", server.log.parent)
    server.process, server.base_url, server.log = retry.process, retry.base_url, retry.log
    if not wait_ready(server):
        server.stop()
        pytest.fail(f"bare vLLM did not start twice; first log tail:\n{tail}\nsecond:\n"
                    + server.log.read_text(errors="replace")[-3000:])
    return server


@pytest.fixture(scope="module")
def vllm_model_entry(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The `models:` entry: same model and limits as the bare server."""
    cache_root = tmp_path_factory.mktemp("vllm-cache")
    return {"name": "tiny", "engine": "vllm", "max_model_len": MAX_MODEL_LEN,
            "engine_args": {"model": str(tiny_model_dir), "max_model_len": MAX_MODEL_LEN,
                            "enforce_eager": True, "kv_cache_memory_bytes": KV_CACHE_BYTES,
                            "env": vllm_env(cache_root)},
            "health_check_timeout_s": 30}


@pytest.fixture(scope="module")
def vllm_test_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """``env`` for a vLLM replica in the tests (``vllm_env`` with its own cache)."""
    return vllm_env(tmp_path_factory.mktemp("vllm-cache"))
