"""A real single-node SLURM for the provider tests, started once per session.

Why real: what matters (wall-time kills, early-warning signals, states squeue
reports after a job ends, controller outages) is exactly what a mock gets wrong.
The cluster lives in its own temp dir with its own munge and free ports
(scripts/slurm-dev-cluster), so it neither needs nor disturbs any other SLURM,
and it is stopped by the PIDs in its pid files.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "slurm-dev-cluster"


@dataclass
class SlurmDevCluster:
    """Handle on a running dev cluster: its dir, slurm.conf, outage controls."""

    dir: Path

    @property
    def conf(self) -> Path:
        return self.dir / "slurm.conf"

    def env(self) -> dict[str, str]:
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def run(self, command: str, *options: str,
            timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(SCRIPT), command, str(self.dir), *options],
                              capture_output=True, text=True, timeout=timeout)

    def stop_ctld(self) -> None:
        proc = self.run("stop-ctld")
        assert proc.returncode == 0, proc.stderr

    def start_ctld(self) -> None:
        proc = self.run("start-ctld")
        assert proc.returncode == 0, proc.stderr


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[SlurmDevCluster]:
    if os.geteuid() != 0 and shutil.which("slurmctld") is None:
        pytest.skip("SLURM not installed and not root to install it")
    # A short path under /tmp: munge's unix socket path must stay < 108 bytes.
    cluster = SlurmDevCluster(Path(tempfile.mkdtemp(prefix="hpcslurm-")))
    proc = cluster.run("start", timeout=600)
    if proc.returncode != 0:
        cluster.run("stop")
        pytest.fail(f"slurm-dev-cluster start failed:\n{proc.stdout}\n{proc.stderr}")
    try:
        yield cluster
    finally:
        cluster.run("stop")
        shutil.rmtree(cluster.dir, ignore_errors=True)


# ---- the HEAppE test server (tests/heappe_server), shared by the HEAppE tests ----------
# Imported inside the fixtures: the server needs the optional heappe extra (py4heappe),
# which the other tests here do not.

import sys
import time

HEAPPE_SERVER_DIR = REPO / "tests" / "heappe_server"
sys.path.insert(0, str(HEAPPE_SERVER_DIR))   # heappe_test_server, process_provider


@pytest.fixture
def heappe_backing(tmp_path: Path):
    """The batch system behind ``heappe``: process groups running standin_job.sh."""
    from process_provider import ProcessProvider
    provider = ProcessProvider(tmp_path / "jobs", HEAPPE_SERVER_DIR / "standin_job.sh",
                               kill_wait_s=3)
    yield provider
    provider.close()


@pytest.fixture
def heappe(heappe_backing):
    """A HEAppE test server on a free port (one per test), fast stand-in jobs."""
    from heappe_test_server import HeappeServer, HeappeState, Site

    from cluster.ports import free_port
    site = Site(openid_tokens={"oidc-a"}, lexis_tokens={"lexis-a"})
    with HeappeServer(HeappeState(heappe_backing, site), free_port()) as server:
        yield server


@pytest.fixture(scope="module")
def heappe_local(tmp_path_factory):
    """A HEAppE test server whose jobs run the real cluster/worker_job.sh through
    LocalProvider (a scheduler-like supervisor per job).  ``server.state.backing``
    is the LocalProvider; every job still running at the end is cancelled."""
    from heappe_test_server import HeappeServer, HeappeState

    from cluster.ports import free_port
    from cluster.providers.local import LocalProvider
    jobs_dir = tmp_path_factory.mktemp("heappe-jobs")
    # Loopback addresses of their own, apart from the local provider's default 127.0.0.x.
    backing = LocalProvider(jobs_dir, node_ip_base="127.0.5", kill_grace_s=10)
    server = HeappeServer(HeappeState(backing), free_port())
    server.start()
    try:
        yield server
    finally:
        server.stop()
        stop_local_jobs(backing)


def stop_local_jobs(backing, timeout: float = 40) -> None:
    """Cancel (through their supervisors) the jobs of a LocalProvider that still run."""
    ids = [d.name for d in backing.jobs_dir.iterdir() if (d / "state.json").exists()]
    running = [j for j, i in backing.poll(ids).items() if not i.state.terminal]
    for job_id in running:
        backing.cancel(job_id)
    deadline = time.monotonic() + timeout
    while running and time.monotonic() < deadline:
        running = [j for j, i in backing.poll(running).items() if not i.state.terminal]
        time.sleep(0.5)
