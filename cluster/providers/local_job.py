"""Supervisor of one local job: the scheduler's role for the local provider.

Run as ``python -m cluster.providers.local_job JOB_DIR`` (detached by
LocalProvider.submit).  Timeline, as on SLURM with ``--signal=B:USR1@warning``:
optional queue delay -> RUNNING -> USR1 to the batch shell at end - warning ->
SIGTERM to the job's process group at the wall-time end -> SIGKILL after the grace.
SIGTERM to the supervisor is a cancel (scancel): TERM the group, KILL after grace.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from cluster.providers.local import LocalProvider
from serve_app.processes import stop_session


class Supervisor:
    def __init__(self, job_dir: Path):
        self.job_dir = job_dir
        self.job = json.loads((job_dir / "job.json").read_text())
        self.state = json.loads((job_dir / "state.json").read_text())
        self.cancelled = False
        signal.signal(signal.SIGTERM, self._on_cancel)

    def _on_cancel(self, *_):
        self.cancelled = True

    def _set(self, **fields) -> None:
        self.state.update(fields)
        LocalProvider._write_state(self.job_dir, self.state)

    def _signal_group(self, pgid: int, sig: int) -> None:
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            pass

    def run(self) -> None:
        deadline = time.time() + self.job["queue_delay_s"]
        while time.time() < deadline and not self.cancelled:
            time.sleep(0.2)
        if self.cancelled:
            self._set(state="CANCELLED", reason="cancelled while pending")
            return
        env = {**os.environ, **json.loads((self.job_dir / "env.json").read_text())}
        start = time.time()
        end = start + self.job["walltime_s"]
        env["HPCSERVE_WALLTIME_END"] = str(int(end))
        log = open(self.job_dir / "job.log", "ab")
        proc = subprocess.Popen(["bash", self.job["script"]], env=env, stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, cwd=self.job["workdir"])
        (self.job_dir / "job.pid").write_text(str(proc.pid))
        self._set(state="RUNNING", start_time=start, end_time=end, node=self.job["node"])
        warned, term_at, final = False, None, None
        while proc.poll() is None:
            now = time.time()
            if self.cancelled and term_at is None:
                final, term_at = "CANCELLED", now
                self._signal_group(proc.pid, signal.SIGTERM)
            elif not warned and now >= end - self.job["warning_s"]:
                warned = True
                proc.send_signal(signal.SIGUSR1)  # batch shell only, like --signal=B:USR1
            if term_at is None and now >= end:
                final, term_at = "TIMEOUT", now
                self._signal_group(proc.pid, signal.SIGCONT)
                self._signal_group(proc.pid, signal.SIGTERM)
            if term_at is not None and now >= term_at + self.job["kill_grace_s"]:
                self._signal_group(proc.pid, signal.SIGKILL)
            time.sleep(0.2)
        stop_session(proc.pid, grace_s=1.0)  # leftovers of the job, as a scheduler would
        if final is None:
            final = "COMPLETED" if proc.returncode == 0 else "FAILED"
        self._set(state=final, exit_code=proc.returncode, finish_time=time.time(),
                  reason=self.state.get("reason", ""))


if __name__ == "__main__":
    Supervisor(Path(sys.argv[1])).run()
