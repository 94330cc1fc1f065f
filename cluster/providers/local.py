"""The local provider: allocations are process groups on this machine.

Each job gets a directory and a small supervisor process (``local_job.py``) that
plays the scheduler: it starts the worker job script in its own process group,
sends the early-warning signal to the batch shell, SIGTERM to the whole group at
the wall-time and SIGKILL a grace period later -- exactly what SLURM does -- and
records the job's state in ``state.json``.  Supervisors are detached, so jobs
outlive a restarted control loop, and polling is just reading files.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from cluster.providers.base import (
    JobInfo,
    JobState,
    Provider,
    ProviderError,
    WorkerSpec,
)
from serve_app.processes import pid_alive

DEFAULT_SCRIPT = Path(__file__).resolve().parent.parent / "worker_job.sh"


class LocalOptions(BaseModel):
    """A local pool's ``provider_options``: all optional."""

    model_config = ConfigDict(extra="forbid")

    jobs_dir: str | None = Field(default=None, description=(
        "job directories (state, logs); default RUN_DIR/jobs/POOL"))
    job_script: str = Field(default=str(DEFAULT_SCRIPT), description="the worker job script")
    queue_delay_s: float = Field(default=0.0, ge=0, description=(
        "pretend queue wait before a job starts (tests, demos)"))
    kill_grace_s: float = Field(default=10.0, ge=0, description=(
        "SIGTERM to SIGKILL at the wall-time, as SLURM's KillWait"))
    node_ip_base: str = Field(default="127.0.0", description=(
        "each job advertises its own loopback address BASE.N"))
    first_host: int = Field(default=10, ge=2, le=249, description="the first N of BASE.N")
    refuse_submits: str | None = Field(default=None, description=(
        "every submit fails with this message, as a scheduler refusing the job would "
        "(tests)"))


class LocalProvider(Provider):
    name = "local"

    def __init__(self, jobs_dir: str | Path, job_script: str | Path = DEFAULT_SCRIPT,
                 queue_delay_s: float = 0.0, kill_grace_s: float = 10.0,
                 node_ip_base: str = "127.0.0", first_host: int = 10,
                 refuse_submits: str | None = None):
        self.jobs_dir = Path(jobs_dir)
        self.jobs_dir.mkdir(parents=True, exist_ok=True)
        self.job_script = Path(job_script)
        self.queue_delay_s = queue_delay_s
        self.kill_grace_s = kill_grace_s
        self.node_ip_base = node_ip_base
        self.first_host = first_host
        self.refuse_submits = refuse_submits

    def _next_ip(self) -> str:
        """Each allocation advertises its own loopback address (FIELD-NOTES)."""
        counter = self.jobs_dir / "ip-counter"
        n = int(counter.read_text()) + 1 if counter.exists() else 0
        counter.write_text(str(n))
        return f"{self.node_ip_base}.{self.first_host + n % (250 - self.first_host)}"

    def submit(self, spec: WorkerSpec) -> str:
        if self.refuse_submits:
            raise ProviderError(self.refuse_submits)
        job_id = f"local-{uuid.uuid4().hex[:10]}"
        job_dir = self.jobs_dir / job_id
        job_dir.mkdir()
        env = {**spec.env,
               "HPCSERVE_HEAD_ADDRESS": spec.head_address,
               "HPCSERVE_ALLOCATION_ID": spec.allocation_id,
               "HPCSERVE_POOL": spec.pool,
               "HPCSERVE_RESOURCES": json.dumps(spec.resources),
               "HPCSERVE_NUM_CPUS": str(spec.num_cpus),
               "HPCSERVE_NUM_GPUS": str(spec.num_gpus),
               "HPCSERVE_NODE_IP": self._next_ip(),
               "HPCSERVE_PYTHON": sys.executable}
        fd = os.open(job_dir / "env.json", os.O_WRONLY | os.O_CREAT, 0o600)
        with os.fdopen(fd, "w") as f:  # carries the Ray token: owner-only
            json.dump(env, f)
        (job_dir / "job.json").write_text(json.dumps({
            "script": str(self.job_script), "walltime_s": spec.walltime_s,
            "warning_s": spec.warning_s, "queue_delay_s": self.queue_delay_s,
            "kill_grace_s": self.kill_grace_s, "node": env["HPCSERVE_NODE_IP"],
            "workdir": spec.workdir or str(job_dir)}))
        self._write_state(job_dir, {"state": "PENDING", "submit_time": time.time()})
        try:
            proc = subprocess.Popen([sys.executable, "-m", "cluster.providers.local_job",
                                     str(job_dir)], start_new_session=True,
                                    stdin=subprocess.DEVNULL,
                                    stdout=open(job_dir / "supervisor.log", "ab"),
                                    stderr=subprocess.STDOUT,
                                    cwd=str(Path(__file__).resolve().parents[2]))
        except OSError as err:
            raise ProviderError(f"cannot start local job: {err}") from err
        (job_dir / "supervisor.pid").write_text(str(proc.pid))
        return job_id

    def poll(self, job_ids: list[str]) -> dict[str, JobInfo]:
        return {job_id: self._info(job_id) for job_id in job_ids}

    def _info(self, job_id: str) -> JobInfo:
        job_dir = self.jobs_dir / job_id
        try:
            st = json.loads((job_dir / "state.json").read_text())
        except (OSError, ValueError):
            return JobInfo(job_id, JobState.UNKNOWN, reason="no such job")
        state = JobState(st["state"])
        if not state.terminal and not pid_alive(_read_pid(job_dir / "supervisor.pid")):
            state, st["reason"] = JobState.FAILED, "supervisor vanished"
        return JobInfo(job_id, state, node=st.get("node"), start_time=st.get("start_time"),
                       end_time=st.get("end_time"), reason=st.get("reason", ""))

    def expected_start(self, job_id: str) -> float | None:
        """This scheduler's queue is ``queue_delay_s`` long: a pending job starts then."""
        if self._info(job_id).state is not JobState.PENDING:
            return None
        job_dir = self.jobs_dir / job_id
        try:
            submitted = json.loads((job_dir / "state.json").read_text())["submit_time"]
            return submitted + json.loads((job_dir / "job.json").read_text())["queue_delay_s"]
        except (OSError, ValueError, KeyError):
            return None

    def cancel(self, job_id: str) -> None:
        """Like scancel: the supervisor TERMs the job's group, KILLs it after a grace."""
        job_dir = self.jobs_dir / job_id
        pid = _read_pid(job_dir / "supervisor.pid")
        if pid_alive(pid):
            os.kill(pid, signal.SIGTERM)
            return
        job_pid = _read_pid(job_dir / "job.pid")  # supervisor gone: end the job ourselves
        if pid_alive(job_pid):
            os.killpg(job_pid, signal.SIGKILL)

    def describe(self) -> str:
        return f"local process groups running {self.job_script}"

    @staticmethod
    def _write_state(job_dir: Path, state: dict) -> None:
        tmp = job_dir / "state.json.tmp"
        tmp.write_text(json.dumps(state))
        tmp.replace(job_dir / "state.json")


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text())
    except (OSError, ValueError):
        return None
