"""SLURM provider: worker jobs through the SLURM command-line clients.

Why the CLI and not slurmrestd: every SLURM site has sbatch/squeue/scancel on
the login node where the head runs; slurmrestd is often not deployed.  Every
client call runs with a timeout, so an unreachable slurmctld surfaces as a
ProviderError (retryable) instead of a hung control loop.

Choices made from measurements on slurm-wlm 22.05 (see FIELD-NOTES):

- Polling uses ``squeue --noheader --states=all --jobs=...`` with
  ``SLURM_TIME_FORMAT=%s`` (epoch times).  ``squeue --json`` in 22.05 ignores
  ``--jobs``/``--user``/``--states`` and dumps the whole cluster's queue on every
  poll, which does not scale on a production machine.  Jobs squeue no longer
  lists fall back to ``scontrol show job -o``; a job neither knows is UNKNOWN.
- Secrets (``spec.env``: Ray auth token, ...) reach the job through the
  environment of the ``sbatch`` process with ``--export=ALL``: never on a
  command line (``ps``) and never in a file we write.  Output files go to a
  0700 directory.
- The early warning is ``--signal=B:USR1@warning_s``: only the batch shell gets
  it (which is what the worker job traps to drain); SLURM may deliver it up to
  ~30 s earlier than asked, and the wall-time SIGTERM comes 0-30 s after the end.
- ``--no-requeue``: the pool replaces failed allocations itself; a requeued job
  would reappear under the same id with a new start time.
- A queued job's expected start is ``squeue --start`` (the backfill scheduler's
  estimate), asked by the pool at most every few seconds per queued job.
"""

from __future__ import annotations

import getpass
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from cluster.providers.base import (
    JobInfo,
    JobState,
    Provider,
    ProviderError,
    WorkerSpec,
)

DEFAULT_JOB_SCRIPT = Path(__file__).resolve().parent.parent / "worker_job.sh"

# SLURM's long state names (squeue %T, scontrol JobState) -> ours.
_STATE_MAP: dict[str, JobState] = {
    "PENDING": JobState.PENDING,
    "CONFIGURING": JobState.PENDING,    # nodes booting: the script is not running yet
    "REQUEUED": JobState.PENDING,
    "REQUEUE_HOLD": JobState.PENDING,
    "REQUEUE_FED": JobState.PENDING,
    "RESV_DEL_HOLD": JobState.PENDING,
    "RESIZING": JobState.RUNNING,
    "RUNNING": JobState.RUNNING,
    "SUSPENDED": JobState.RUNNING,
    "STOPPED": JobState.RUNNING,
    "SIGNALING": JobState.RUNNING,
    "STAGE_OUT": JobState.RUNNING,
    # Processes are still being killed and the node is still held; the final
    # state (COMPLETED/TIMEOUT/...) is only known once this ends.
    "COMPLETING": JobState.RUNNING,
    "COMPLETED": JobState.COMPLETED,
    "CANCELLED": JobState.CANCELLED,
    "TIMEOUT": JobState.TIMEOUT,
    "DEADLINE": JobState.TIMEOUT,
    "FAILED": JobState.FAILED,
    "NODE_FAIL": JobState.FAILED,
    "BOOT_FAIL": JobState.FAILED,
    "OUT_OF_MEMORY": JobState.FAILED,
    "PREEMPTED": JobState.FAILED,
    "REVOKED": JobState.FAILED,
    "SPECIAL_EXIT": JobState.FAILED,
}

# sbatch stderr fragments that mean "try again later", not "this spec is wrong".
_TRANSIENT = (
    "unable to contact slurm controller",
    "socket timed out",
    "temporarily unable",
    "resource temporarily unavailable",
    "zero bytes were transmitted",
    "connection refused",
    "communication connection failure",
)
_GONE = ("invalid job id", "already completing or completed", "job has already finished")
_SQUEUE_FORMAT = "%i|%T|%N|%S|%e|%r"
_JOB_ID = re.compile(r"^\d+(_\d+)?$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_NAME_CHARS = re.compile(r"[^A-Za-z0-9._-]+")


class SlurmRejected(ProviderError):
    """sbatch refused the job itself (bad partition, account, QOS, limits).

    Retrying the same spec cannot succeed, unlike an unreachable controller;
    the pool should surface this to the operator instead of looping.
    """

    retryable = False


class SlurmConfig(BaseModel):
    """Site settings for worker jobs (a pool's ``provider_options``); each maps to one
    sbatch option.  Unknown keys are refused when the config is loaded.

    ``output_dir`` must be visible on compute nodes (a shared filesystem).
    """

    model_config = ConfigDict(extra="forbid")

    partition: str | None = Field(default=None, description="sbatch --partition")
    account: str | None = Field(default=None, description="sbatch --account")
    qos: str | None = Field(default=None, description="sbatch --qos")
    gres: str | None = Field(default=None, description=(
        "sbatch --gres, e.g. gpu:a100:1; default gpu:<num_gpus> when the pool asks for GPUs"))
    job_name_prefix: str = Field(default="hpcserve", description="job names start with this")
    output_dir: str = Field(default="~/.hpcserve/slurm", description=(
        "job stdout/stderr (created 0700); must exist on the compute nodes too"))
    extra_args: list[str] = Field(default_factory=list, description=(
        "appended verbatim to sbatch; never put secrets here (visible in ps)"))
    slurm_conf: str | None = Field(default=None, description=(
        "exported as SLURM_CONF to every SLURM command (a non-default cluster)"))
    slurm_bin_dir: str | None = Field(default=None, description=(
        "where sbatch/squeue/scancel live, if not on PATH"))
    command_timeout_s: float = Field(default=30.0, gt=0, description=(
        "timeout of each SLURM command; an unreachable controller is retried later"))
    adopt_existing: bool = Field(default=True, description=(
        "on submit, reuse a live job with the same name (a restarted head)"))
    job_script: str | None = Field(default=None, description=(
        "the worker job script; default: hpcserve's cluster/worker_job.sh"))


class SlurmProvider(Provider):
    """Submits the worker job script with sbatch; polls with squeue/scontrol."""

    name = "slurm"

    def __init__(self, config: SlurmConfig | None = None,
                 job_script: str | os.PathLike[str] | None = None) -> None:
        self.config = config or SlurmConfig()
        job_script = job_script or self.config.job_script
        self.job_script = Path(job_script) if job_script else DEFAULT_JOB_SCRIPT
        if not self.job_script.is_file():
            raise ValueError(f"SLURM job_script {self.job_script} does not exist")
        self.output_dir = Path(os.path.expanduser(self.config.output_dir)).resolve()

    # ---- the Provider interface -------------------------------------------------

    def submit(self, spec: WorkerSpec) -> str:
        name = self.job_name(spec)
        if self.config.adopt_existing:
            existing = self._live_job_named(name)
            if existing:
                return existing
        self.output_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            proc = self._run(self.sbatch_command(spec), env=self._job_env(spec))
        except ProviderError:
            # sbatch may have timed out after slurmctld accepted the job: look for
            # it by name before the caller retries and creates a duplicate.
            found = self._live_job_named(name)
            if found:
                return found
            raise
        if proc.returncode != 0:
            err = proc.stderr.strip() or proc.stdout.strip()
            if any(t in err.lower() for t in _TRANSIENT):
                raise ProviderError(f"sbatch failed (rc={proc.returncode}): {err}")
            raise SlurmRejected(f"sbatch rejected job {name}: {err}")
        job_id = proc.stdout.strip().split(";")[0].strip()
        if not _JOB_ID.match(job_id):
            raise ProviderError(f"sbatch printed no job id: {proc.stdout!r} {proc.stderr!r}")
        return job_id

    def poll(self, job_ids: list[str]) -> dict[str, JobInfo]:
        ids = list(dict.fromkeys(str(j) for j in job_ids))
        if not ids:
            return {}
        bad = [j for j in ids if not _JOB_ID.match(j)]
        result = {j: JobInfo(j, JobState.UNKNOWN, reason="not a SLURM job id") for j in bad}
        good = [j for j in ids if j not in result]
        if good:
            result.update(self._squeue(good))
        for job_id in good:
            if job_id not in result:
                result[job_id] = self._scontrol(job_id)
        return {j: result[j] for j in ids}

    def cancel(self, job_id: str) -> None:
        if not _JOB_ID.match(str(job_id)):
            return
        proc = self._run([self._bin("scancel"), str(job_id)])
        err = proc.stderr.strip()
        if proc.returncode != 0 and not any(g in err.lower() for g in _GONE):
            raise ProviderError(f"scancel {job_id} failed (rc={proc.returncode}): {err}")

    def expected_start(self, job_id: str) -> float | None:
        """The backfill scheduler's estimate (``squeue --start``).  A pending job shows
        ``N/A`` until a backfill cycle has placed it (~30 s on the dev cluster) and
        when it cannot be placed (held, dependency); a started job is not listed."""
        if not _JOB_ID.match(str(job_id)):
            return None
        proc = self._run([self._bin("squeue"), "--start", "--noheader", f"--jobs={job_id}",
                          "--format=%S"])
        if proc.returncode != 0:
            if "invalid job id" in proc.stderr.lower():
                return None
            raise ProviderError(f"squeue --start failed (rc={proc.returncode}): "
                                f"{proc.stderr.strip()}")
        return parse_expected_start(proc.stdout)

    def describe(self) -> str:
        c = self.config
        where = ", ".join(f"{k}={v}" for k, v in (
            ("partition", c.partition), ("account", c.account), ("qos", c.qos),
            ("gres", c.gres)) if v)
        return f"slurm: sbatch {self.job_script}" + (f" ({where})" if where else "")

    # ---- building the submission ------------------------------------------------

    def job_name(self, spec: WorkerSpec) -> str:
        """Unique per allocation, so a lost sbatch reply can be found again."""
        raw = f"{self.config.job_name_prefix}-{spec.pool}-{spec.allocation_id}"
        return _NAME_CHARS.sub("_", raw)[:200]

    def sbatch_command(self, spec: WorkerSpec) -> list[str]:
        """The sbatch argv for a spec; it never contains ``spec.env`` values."""
        c = self.config
        minutes = max(1, math.ceil(spec.walltime_s / 60))
        args = [
            self._bin("sbatch"), "--parsable",
            f"--job-name={self.job_name(spec)}",
            "--nodes=1", "--ntasks=1",
            f"--cpus-per-task={max(1, spec.num_cpus)}",
            f"--time={minutes}",
            f"--output={self.output_dir}/%x-%j.out",
            f"--chdir={spec.workdir or self.output_dir}",
            "--export=ALL",
            "--no-requeue",
        ]
        if spec.warning_s > 0:
            args.append(f"--signal=B:USR1@{min(spec.warning_s, 65535)}")
        for opt, value in (("partition", c.partition), ("account", c.account), ("qos", c.qos)):
            if value:
                args.append(f"--{opt}={value}")
        gres = c.gres or (f"gpu:{spec.num_gpus}" if spec.num_gpus > 0 else None)
        if gres:
            args.append(f"--gres={gres}")
        args.extend(c.extra_args)
        args.append(str(self.job_script))
        return args

    def _job_env(self, spec: WorkerSpec) -> dict[str, str]:
        """The sbatch process environment, which --export=ALL copies into the job.

        The head's own SLURM_*/SBATCH_* variables are dropped: when the head runs
        inside an allocation they would leak its job's settings into the worker's.
        """
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("SLURM_", "SBATCH_")) or k == "SLURM_CONF"}
        env.setdefault("HPCSERVE_PYTHON", sys.executable)
        for key, value in spec.env.items():
            if not _ENV_NAME.match(key) or "\0" in value:
                raise SlurmRejected(f"spec.env has an invalid variable name or value: {key!r}")
            env[key] = value
        env.update({
            "HPCSERVE_HEAD_ADDRESS": spec.head_address,
            "HPCSERVE_ALLOCATION_ID": spec.allocation_id,
            "HPCSERVE_POOL": spec.pool,
            "HPCSERVE_RESOURCES": json.dumps(spec.resources, sort_keys=True),
            "HPCSERVE_NUM_CPUS": str(spec.num_cpus),
            "HPCSERVE_NUM_GPUS": str(spec.num_gpus),
            "HPCSERVE_WALLTIME_S": str(spec.walltime_s),
            "HPCSERVE_WARNING_S": str(spec.warning_s),
        })
        if self.config.slurm_conf:
            env["SLURM_CONF"] = self.config.slurm_conf
        return env

    # ---- querying -----------------------------------------------------------------

    def _squeue(self, ids: list[str]) -> dict[str, JobInfo]:
        proc = self._run([self._bin("squeue"), "--noheader", "--states=all",
                          f"--jobs={','.join(ids)}", f"--format={_SQUEUE_FORMAT}"])
        if proc.returncode != 0:
            # squeue fails with "Invalid job id" only when *none* of the ids is known.
            if "invalid job id" in proc.stderr.lower():
                return {}
            raise ProviderError(f"squeue failed (rc={proc.returncode}): {proc.stderr.strip()}")
        infos: dict[str, JobInfo] = {}
        for line in proc.stdout.splitlines():
            parts = line.strip().split("|", 5)
            if len(parts) != 6 or parts[0] not in ids:
                continue
            job_id, state, node, start, end, reason = parts
            infos[job_id] = _job_info(job_id, state, node, start, end, reason)
        return infos

    def _scontrol(self, job_id: str) -> JobInfo:
        proc = self._run([self._bin("scontrol"), "show", "job", "-o", job_id])
        if proc.returncode != 0:
            if "invalid job id" in proc.stderr.lower():
                return JobInfo(job_id, JobState.UNKNOWN, reason="unknown to slurmctld")
            raise ProviderError(f"scontrol show job {job_id} failed: {proc.stderr.strip()}")
        fields = dict(re.findall(r"(?:^|\s)(JobState|NodeList|StartTime|EndTime|Reason)=(\S*)",
                                 proc.stdout))
        if "JobState" not in fields:
            return JobInfo(job_id, JobState.UNKNOWN, reason="unparsable scontrol output")
        return _job_info(job_id, fields["JobState"], fields.get("NodeList", ""),
                         fields.get("StartTime", ""), fields.get("EndTime", ""),
                         fields.get("Reason", ""))

    def _live_job_named(self, name: str) -> str | None:
        proc = self._run([self._bin("squeue"), "--noheader", f"--user={getpass.getuser()}",
                          f"--name={name}", "--states=PENDING,CONFIGURING,RUNNING,SUSPENDED",
                          "--format=%i"])
        if proc.returncode != 0:
            raise ProviderError(f"squeue --name failed (rc={proc.returncode}): "
                                f"{proc.stderr.strip()}")
        found = [line.strip() for line in proc.stdout.splitlines() if line.strip()]
        return found[0] if found else None

    # ---- running commands ---------------------------------------------------------

    def _bin(self, command: str) -> str:
        d = self.config.slurm_bin_dir
        return str(Path(d) / command) if d else command

    def _run(self, argv: list[str], env: dict[str, str] | None = None,
             ) -> subprocess.CompletedProcess[str]:
        """Run one SLURM client with a hard timeout; any failure to run is a ProviderError."""
        if env is None:
            env = dict(os.environ)
            if self.config.slurm_conf:
                env["SLURM_CONF"] = self.config.slurm_conf
        env["SLURM_TIME_FORMAT"] = "%s"
        timeout = self.config.command_timeout_s
        try:
            return subprocess.run(argv, env=env, capture_output=True, text=True,
                                  timeout=timeout, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired as exc:
            raise ProviderError(f"{Path(argv[0]).name} timed out after {timeout:g} s "
                                f"(slurmctld unreachable?)") from exc
        except OSError as exc:
            raise ProviderError(f"cannot run {argv[0]}: {exc}") from exc


def parse_expected_start(output: str) -> float | None:
    """``squeue --start --format=%S`` with ``SLURM_TIME_FORMAT=%s``: epoch seconds,
    ``N/A`` (no estimate yet), or nothing (the job is no longer pending)."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    return _epoch(lines[0]) if lines else None


def _epoch(value: str) -> float | None:
    value = value.strip()
    if not value.isdigit():      # N/A, Unknown, None
        return None
    seconds = float(value)
    return seconds if seconds > 0 else None


def _job_info(job_id: str, slurm_state: str, node: str, start: str, end: str,
              reason: str) -> JobInfo:
    base = slurm_state.strip().split()[0].rstrip("+") if slurm_state.strip() else ""
    state = _STATE_MAP.get(base, JobState.UNKNOWN)
    started = state is not JobState.PENDING
    node = node.strip()
    reason = reason.strip()
    if reason in ("None", "(null)"):
        reason = ""
    if base == "COMPLETING":
        reason = reason or "completing"
    elif state is JobState.UNKNOWN:
        reason = reason or f"unrecognised SLURM state {slurm_state!r}"
    return JobInfo(
        job_id=job_id,
        state=state,
        node=node if started and node and node not in ("(null)", "None") else None,
        start_time=_epoch(start) if started else None,
        end_time=_epoch(end) if started else None,
        reason=reason,
    )
