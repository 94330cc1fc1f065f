"""SlurmProvider against a real single-node SLURM (see conftest.py).

Each test asserts what the pool relies on: states and times as the scheduler
reports them, the early-warning signal before the wall-time, clear errors for
bad submissions, and bounded ProviderErrors while slurmctld is down.
"""

from __future__ import annotations

import socket
import stat
import subprocess
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from cluster.providers.base import JobInfo, JobState, ProviderError, WorkerSpec
from cluster.providers.slurm import (
    SlurmConfig,
    SlurmProvider,
    SlurmRejected,
    parse_expected_start,
)

STANDIN = Path(__file__).with_name("standin_job.sh")
HOST = socket.gethostname().split(".")[0]
SECRET = "tok-" + uuid.uuid4().hex


def provider_for(cluster, out: Path, **overrides) -> SlurmProvider:
    settings = {"partition": "debug", "slurm_conf": str(cluster.conf),
                "output_dir": str(out), **overrides}
    config = SlurmConfig(**settings)
    return SlurmProvider(config, job_script=STANDIN)


def spec_for(markers: Path, *, walltime_s: int = 600, warning_s: int = 60,
             **env: str) -> WorkerSpec:
    markers.mkdir(parents=True, exist_ok=True)
    return WorkerSpec(
        allocation_id=uuid.uuid4().hex[:8], pool="test", head_address="127.0.0.1:6379",
        walltime_s=walltime_s, warning_s=warning_s, num_cpus=1,
        resources={"hpc_slot": 1.0},
        env={"STANDIN_MARKER_DIR": str(markers), "SECRET_RAY_AUTH_TOKEN": SECRET, **env})


def wait_for(provider: SlurmProvider, job_id: str, done: Callable[[JobInfo], bool],
             timeout: float) -> JobInfo:
    deadline = time.monotonic() + timeout
    while True:
        info = provider.poll([job_id])[job_id]
        if done(info):
            return info
        assert time.monotonic() < deadline, f"job {job_id} stuck: {info}"
        time.sleep(0.5)


def wait_file(path: Path, timeout: float = 20) -> str:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never written"
        time.sleep(0.2)
    return path.read_text()


def running(info: JobInfo) -> bool:
    return info.state is JobState.RUNNING


def terminal(info: JobInfo) -> bool:
    return info.state.terminal


def test_submit_poll_running_then_cancel(slurm_cluster, tmp_path):
    provider = provider_for(slurm_cluster, tmp_path / "out")
    spec = spec_for(tmp_path / "m")
    before = time.time()
    job_id = provider.submit(spec)
    assert job_id.isdigit()
    first = provider.poll([job_id])[job_id]
    assert first.state in (JobState.PENDING, JobState.RUNNING)

    info = wait_for(provider, job_id, running, timeout=60)
    assert info.node == HOST
    assert info.start_time is not None and before - 2 <= info.start_time <= time.time() + 1
    assert info.end_time == info.start_time + 600     # --time=10 (minutes)

    # The job sees its configuration and the secret, and can find its own end.
    seen = wait_file(tmp_path / "m" / f"{job_id}.env").splitlines()
    env = dict(line.split("=", 1) for line in seen if "=" in line)
    assert env["HPCSERVE_ALLOCATION_ID"] == spec.allocation_id
    assert env["HPCSERVE_HEAD_ADDRESS"] == "127.0.0.1:6379"
    assert env["HPCSERVE_RESOURCES"] == '{"hpc_slot": 1.0}'
    assert env["HPCSERVE_NUM_CPUS"] == "1" and env["HPCSERVE_WARNING_S"] == "60"
    assert env["SECRET_RAY_AUTH_TOKEN"] == SECRET
    assert float(env["WALLTIME_END"]) == info.end_time

    provider.cancel(job_id)
    final = wait_for(provider, job_id, terminal, timeout=30)
    assert final.state is JobState.CANCELLED
    provider.cancel(job_id)                            # idempotent on an ended job


def test_secret_not_on_command_line_or_in_readable_files(slurm_cluster, tmp_path):
    out = tmp_path / "out"
    provider = provider_for(slurm_cluster, out)
    spec = spec_for(tmp_path / "m")
    assert not any(SECRET in arg for arg in provider.sbatch_command(spec))
    job_id = provider.submit(spec)
    wait_for(provider, job_id, running, timeout=60)
    shown = subprocess.run(["scontrol", "show", "job", "-o", job_id], env=slurm_cluster.env(),
                           capture_output=True, text=True, check=True).stdout
    assert SECRET not in shown
    assert stat.S_IMODE(out.stat().st_mode) == 0o700
    provider.cancel(job_id)
    wait_for(provider, job_id, terminal, timeout=30)


def test_walltime_warning_signal_then_timeout(slurm_cluster, tmp_path):
    """1-minute jobs: USR1 reaches the batch shell before the end.

    A job that keeps running after USR1 is killed at the wall-time (SIGTERM to
    the shell, 0-30 s after EndTime) and ends TIMEOUT even though its TERM trap
    exits 0.  A job that exits on USR1 (a drained worker) ends COMPLETED.
    """
    provider = provider_for(slurm_cluster, tmp_path / "out")
    markers = tmp_path / "m"
    stays = provider.submit(spec_for(markers, walltime_s=60, warning_s=30))
    drains = provider.submit(spec_for(markers, walltime_s=60, warning_s=30,
                                      STANDIN_EXIT_ON_USR1="1"))
    planned = {j: wait_for(provider, j, running, timeout=60).end_time for j in (stays, drains)}

    deadline = time.monotonic() + 150
    while not all(i.state.terminal for i in provider.poll([stays, drains]).values()):
        assert time.monotonic() < deadline, provider.poll([stays, drains])
        time.sleep(1)
    final = provider.poll([stays, drains])

    assert final[stays].state is JobState.TIMEOUT, final[stays]
    assert final[drains].state is JobState.COMPLETED, final[drains]
    for job_id in (stays, drains):
        warned = float((markers / f"{job_id}.usr1").read_text().split()[0])
        # Asked for 30 s ahead; SLURM's 30 s check interval may make it earlier.
        assert planned[job_id] - 30 - 35 <= warned <= planned[job_id] - 25 + 1
    killed = float((markers / f"{stays}.term").read_text().split()[0])
    assert killed >= planned[stays] - 1
    assert not (markers / f"{drains}.term").exists()
    # Once ended, end_time is the actual end, not the planned one.
    assert final[stays].end_time >= planned[stays]


def test_signalled_job_completes_and_scontrol_fallback_agrees(slurm_cluster, tmp_path):
    provider = provider_for(slurm_cluster, tmp_path / "out")
    job_id = provider.submit(spec_for(tmp_path / "m", STANDIN_EXIT_ON_USR1="1"))
    wait_for(provider, job_id, running, timeout=60)
    # RUNNING comes before the batch script runs; its .env marker says its traps are set.
    wait_file(tmp_path / "m" / f"{job_id}.env", timeout=60)
    subprocess.run(["scancel", "--batch", "--signal=USR1", job_id], env=slurm_cluster.env(),
                   check=True, timeout=30)
    info = wait_for(provider, job_id, terminal, timeout=30)
    assert info.state is JobState.COMPLETED and info.node == HOST
    fallback = provider._scontrol(job_id)      # what poll uses once squeue drops a job
    assert (fallback.state, fallback.node, fallback.start_time) == (
        info.state, info.node, info.start_time)


def test_unknown_and_malformed_job_ids(slurm_cluster, tmp_path):
    provider = provider_for(slurm_cluster, tmp_path / "out")
    job_id = provider.submit(spec_for(tmp_path / "m"))
    infos = provider.poll(["987654", job_id, "not-a-job"])
    assert infos["987654"].state is JobState.UNKNOWN
    assert infos["not-a-job"].state is JobState.UNKNOWN
    assert infos[job_id].state in (JobState.PENDING, JobState.RUNNING)
    assert provider.poll(["987654"])["987654"].state is JobState.UNKNOWN
    provider.cancel("987654")                          # unknown: nothing to do, no error
    provider.cancel(job_id)
    wait_for(provider, job_id, terminal, timeout=30)


def test_resubmitting_a_live_allocation_adopts_the_job(slurm_cluster, tmp_path):
    provider = provider_for(slurm_cluster, tmp_path / "out")
    spec = spec_for(tmp_path / "m")
    job_id = provider.submit(spec)
    assert provider.submit(spec) == job_id             # e.g. a retry after a lost reply
    provider.cancel(job_id)
    wait_for(provider, job_id, terminal, timeout=30)


@pytest.mark.parametrize("output, expected", [
    # squeue --start --noheader --format=%S with SLURM_TIME_FORMAT=%s, as slurm-wlm
    # 22.05 prints it on the dev cluster
    ("1796292016\n", 1796292016.0),  # pending on Resources, after a backfill cycle
    ("N/A\n", None),                 # pending, before the backfill cycle; or held
    ("", None),                       # running (or gone): no longer listed
])
def test_expected_start_parses_squeue_start(output, expected):
    assert parse_expected_start(output) == expected


def test_expected_start_of_a_queued_job_is_the_schedulers(slurm_cluster, tmp_path):
    """A job told to wait (--begin) is pending with a start SLURM knows; once it runs
    it has no expected start any more."""
    later = provider_for(slurm_cluster, tmp_path / "out", extra_args=["--begin=now+600"])
    now_ = provider_for(slurm_cluster, tmp_path / "out")
    before = time.time()
    waiting = later.submit(spec_for(tmp_path / "m"))
    started = now_.submit(spec_for(tmp_path / "m"))
    try:
        assert later.poll([waiting])[waiting].state is JobState.PENDING
        assert before + 590 <= later.expected_start(waiting) <= time.time() + 610
        wait_for(now_, started, running, timeout=60)
        assert now_.expected_start(started) is None
        assert now_.expected_start("987654") is None and now_.expected_start("x") is None
    finally:
        for job_id in (waiting, started):
            now_.cancel(job_id)
        for job_id in (waiting, started):
            wait_for(now_, job_id, terminal, timeout=30)


@pytest.mark.parametrize("config, num_gpus, words", [
    ({"partition": "bogus"}, 0, "partition"),
    ({}, 1, "gres"),                                   # no GPU on this node
])
def test_impossible_submissions_are_rejected(slurm_cluster, tmp_path, config, num_gpus, words):
    provider = provider_for(slurm_cluster, tmp_path / "out", **config)
    spec = spec_for(tmp_path / "m")
    spec.num_gpus = num_gpus
    with pytest.raises(SlurmRejected) as err:
        provider.submit(spec)
    assert isinstance(err.value, ProviderError) and not err.value.retryable
    assert words in str(err.value).lower() or "node configuration" in str(err.value).lower()


def test_controller_outage_raises_quickly_and_recovers(slurm_cluster, tmp_path):
    quick = provider_for(slurm_cluster, tmp_path / "out", command_timeout_s=4)
    patient = provider_for(slurm_cluster, tmp_path / "out", command_timeout_s=60)
    job_id = quick.submit(spec_for(tmp_path / "m"))
    before = wait_for(quick, job_id, running, timeout=60)

    slurm_cluster.stop_ctld()
    try:
        for call in (lambda: quick.poll([job_id]), lambda: quick.cancel(job_id),
                     lambda: quick.submit(spec_for(tmp_path / "m"))):
            t0 = time.monotonic()
            with pytest.raises(ProviderError, match="timed out"):
                call()
            assert time.monotonic() - t0 < 4 + 3
        # Without our timeout, squeue itself gives up (connect retries, ~9 s here).
        t0 = time.monotonic()
        with pytest.raises(ProviderError, match="(?i)unable to contact"):
            patient.poll([job_id])
        assert time.monotonic() - t0 < 60
    finally:
        slurm_cluster.start_ctld()

    after = wait_for(quick, job_id, running, timeout=60)    # the job survived the outage
    assert (after.start_time, after.end_time, after.node) == (
        before.start_time, before.end_time, before.node)
    new_id = quick.submit(spec_for(tmp_path / "m"))
    assert new_id != job_id
    for j in (job_id, new_id):
        quick.cancel(j)
    for j in (job_id, new_id):
        assert wait_for(quick, j, terminal, timeout=30).state is JobState.CANCELLED
