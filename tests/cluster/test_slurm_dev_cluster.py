"""scripts/slurm-dev-cluster itself: a start that cannot succeed says why, at once.

Why: the dev cluster is what every SLURM test stands on, and CI runs on a machine
that is gone before anyone reads its output.  A daemon that cannot bind its port
exits after it has daemonized, so the script must notice (not wait out its
timeout) and print the daemons, the node state and the log lines that explain it.
"""

from __future__ import annotations

import shutil
import socket
import tempfile
from pathlib import Path


def test_taken_slurmd_port_fails_fast_with_the_reason(slurm_cluster, monkeypatch) -> None:
    # slurm_cluster: only to have the packages installed (and skip where they cannot
    # be); this test starts a second, separate dev cluster of the same kind.
    cluster = type(slurm_cluster)(Path(tempfile.mkdtemp(prefix="hpcslurm-")))
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        try:
            # An explicit port is not retried elsewhere: the failure must surface.
            # Fast: with a 600 s wait for the node, only giving up on the dead slurmd
            # ends it inside the 120 s the run is allowed.
            monkeypatch.setenv("SLURM_DEV_WAIT_S", "600")
            proc = cluster.run("start", "--slurmd-port", str(port), timeout=120)
        finally:
            stopped = cluster.run("stop")
    try:
        assert proc.returncode != 0
        assert "not ready (attempt 1)" in proc.stderr
        assert "slurmd: not running" in proc.stderr
        assert f"Unable to bind listen port ({port})" in proc.stderr
        assert stopped.returncode == 0
        for name in ("munged", "slurmctld", "slurmd"):
            assert not (cluster.dir / "run" / f"{name}.pid").exists(), name
    finally:
        shutil.rmtree(cluster.dir, ignore_errors=True)
