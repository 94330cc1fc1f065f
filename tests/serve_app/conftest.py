"""Fixtures shared by the data-plane tests."""

from __future__ import annotations

import os
import subprocess
import sys
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


_PROBE = """
import json, sys
import ray
from ray import serve
ray.init(address=sys.argv[1], _node_ip_address=sys.argv[2], log_to_driver=False,
         namespace="serve")
names = sys.argv[3].split(",")
def handle(name):  # "deployment", or "app/deployment" for one in another app
    app, _, deployment = name.rpartition("/")
    return deployment, serve.get_deployment_handle(deployment, app_name=app or sys.argv[4])
handles = dict(handle(n) for n in names)
def stats_of(handle):
    try:
        return handle.stats.remote().result(timeout_s=30)
    except Exception as err:  # a replica being replaced: say so, keep probing
        return {"error": repr(err)}
for _ in sys.stdin:
    stats = {n: stats_of(h) for n, h in handles.items()}
    print(json.dumps(stats if len(names) > 1 else next(iter(stats.values()))), flush=True)
"""


class EngineStatsProbe:
    """Calls an engine deployment's ``stats()`` from a separate Ray driver process.

    Why a subprocess: Ray reads its auth settings when it is first imported, so this
    pytest process (which may have imported Ray for other tests) cannot reliably
    join a token-authenticated cluster itself.  The probe is stopped by its PID.
    """

    def __init__(self, head, deployment: str | list[str], app: str = "hpcserve"):
        """Several deployments: ``stats()`` is ``{deployment: stats}``; a deployment
        of another application is named ``app/deployment``."""
        names = deployment if isinstance(deployment, str) else ",".join(deployment)
        self.process = subprocess.Popen(
            [sys.executable, "-c", _PROBE, head.gcs_address, head.node_ip, names, app],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            text=True, env=head.process_env())

    def stats(self) -> dict:
        import json

        self.process.stdin.write("\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"stats probe exited with {self.process.wait()}")
        return json.loads(line)

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.close()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@pytest.fixture(scope="session")
def stats_probe() -> type[EngineStatsProbe]:
    """``stats_probe(head, deployment)``: see ``EngineStatsProbe`` (close it yourself)."""
    return EngineStatsProbe
