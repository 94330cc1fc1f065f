"""A minimal Provider that runs the worker job as a local process group.

Why it exists: the HEAppE provider tests need a batch system behind the test
server whose jobs really run, start in milliseconds and can be inspected
(standin_job.sh records its environment).  The rotation test backs the server
with cluster/providers/local.py running the real worker job instead (the backing
provider is a parameter).  Tests only.

Every job is its own session (process group), so cancel and wall-time kills
reach the script and its children, and close() stops exactly what was started.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from cluster.providers.base import JobInfo, JobState, Provider, WorkerSpec


@dataclass
class _Job:
    proc: subprocess.Popen[bytes]
    spec: WorkerSpec
    start: float
    timer: threading.Timer
    ended: float | None = None
    cancelled: bool = False
    timed_out: bool = False


class ProcessProvider(Provider):
    name = "process"

    def __init__(self, jobs_dir: str | os.PathLike[str], job_script: str | os.PathLike[str],
                 kill_wait_s: float = 5.0) -> None:
        self.jobs_dir = Path(jobs_dir)
        self.jobs_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.job_script = Path(job_script)
        self.kill_wait_s = kill_wait_s
        self._ids = itertools.count(1000)
        self._jobs: dict[str, _Job] = {}
        self._lock = threading.Lock()

    def submit(self, spec: WorkerSpec) -> str:
        job_id = str(next(self._ids))
        start = time.time()
        # spec.env (behind HEAppE: the template's exports) over the spec's fields; the
        # scheduler's own values (wall-time end, job id) last.
        env = {**os.environ, "HPCSERVE_PYTHON": sys.executable,
               "HPCSERVE_HEAD_ADDRESS": spec.head_address,
               "HPCSERVE_ALLOCATION_ID": spec.allocation_id, "HPCSERVE_POOL": spec.pool,
               "HPCSERVE_RESOURCES": json.dumps(spec.resources, sort_keys=True),
               "HPCSERVE_NUM_CPUS": str(spec.num_cpus), "HPCSERVE_NUM_GPUS": str(spec.num_gpus),
               "HPCSERVE_WALLTIME_S": str(spec.walltime_s),
               "HPCSERVE_WARNING_S": str(spec.warning_s), **spec.env,
               "HPCSERVE_WALLTIME_END": str(int(start + spec.walltime_s)),
               "HPCSERVE_JOB_ID": job_id}
        with open(self.jobs_dir / f"{job_id}.out", "wb") as out:
            proc = subprocess.Popen(["bash", str(self.job_script)], env=env, stdout=out,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    cwd=spec.workdir or self.jobs_dir, start_new_session=True)
        timer = threading.Timer(spec.walltime_s, self._walltime_kill, args=(job_id,))
        timer.daemon = True
        with self._lock:
            self._jobs[job_id] = _Job(proc, spec, start, timer)
        timer.start()
        return job_id

    def poll(self, job_ids: list[str]) -> dict[str, JobInfo]:
        result = {}
        for job_id in job_ids:
            job = self._jobs.get(job_id)
            if job is None:
                result[job_id] = JobInfo(job_id, JobState.UNKNOWN, reason="never submitted here")
                continue
            rc = job.proc.poll()
            if rc is not None and job.ended is None:
                job.ended = time.time()
                job.timer.cancel()
            if rc is None:
                state = JobState.RUNNING
            elif job.cancelled:
                state = JobState.CANCELLED
            elif job.timed_out:
                state = JobState.TIMEOUT
            else:
                state = JobState.COMPLETED if rc == 0 else JobState.FAILED
            result[job_id] = JobInfo(job_id, state, node="127.0.0.1", start_time=job.start,
                                     end_time=job.start + job.spec.walltime_s,
                                     reason="" if rc in (None, 0) else f"exit code {rc}")
        return result

    def cancel(self, job_id: str) -> None:
        job = self._jobs.get(job_id)
        if job is None or job.proc.poll() is not None:
            return
        job.cancelled = True
        self._stop(job)

    def pgid(self, job_id: str) -> int:
        """The job's process group id (= the PID we started)."""
        return self._jobs[job_id].proc.pid

    def close(self) -> None:
        """Stop every job this provider started that still runs."""
        for job in list(self._jobs.values()):
            job.timer.cancel()
            if job.proc.poll() is None:
                job.cancelled = True
                self._stop(job)

    def _walltime_kill(self, job_id: str) -> None:
        job = self._jobs[job_id]
        if job.proc.poll() is None:
            job.timed_out = True
            self._stop(job)

    def _stop(self, job: _Job) -> None:
        """TERM the job's process group, KILL it after kill_wait_s (like a scheduler)."""
        job.timer.cancel()
        for sig, wait_s in ((signal.SIGTERM, self.kill_wait_s), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(job.proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                job.proc.wait(timeout=wait_s)
            except subprocess.TimeoutExpired:
                continue
            # The script exited; its children in the group may not have yet.
            try:
                os.killpg(job.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            break
