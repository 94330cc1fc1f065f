"""HeappeProvider against the HEAppE test server (tests/heappe_server).

The real py4heappe client talks HTTP to a server built on py4heappe's own
models, whose jobs run as local process groups.  Each test asserts what the
pool relies on: jobs really run with the worker job's environment, states and
times, cancel that ends the processes, transparent session renewal, bounded
errors while HEAppE is down or hung, and recovery afterwards.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

# tests/heappe_server is on sys.path (tests/cluster/conftest.py)
from heappe_test_server import HeappeServer, HeappeState, Site

from cluster.ports import free_port
from cluster.providers.base import JobInfo, JobState, ProviderError, WorkerSpec
from cluster.providers.heappe import (
    HeappeAuthError,
    HeappeConfig,
    HeappeProvider,
    HeappeRejected,
    preparation_script,
)

SECRET = "tok-" + uuid.uuid4().hex

# Fixtures (tests/cluster/conftest.py): ``heappe`` -- a HEAppE test server on a free port
# whose jobs are process groups of tests/heappe_server/standin_job.sh, run by
# ``heappe_backing`` (a ProcessProvider).


def provider_for(server: HeappeServer, **overrides: object) -> HeappeProvider:
    return HeappeProvider(**server.provider_options(
        connect_timeout_s=2.0, request_timeout_s=3.0, **overrides))


def spec_for(markers: Path, *, walltime_s: int = 600, **env: str) -> WorkerSpec:
    markers.mkdir(parents=True, exist_ok=True)
    return WorkerSpec(
        allocation_id=uuid.uuid4().hex[:8], pool="chat", head_address="10.0.0.5:6379",
        walltime_s=walltime_s, warning_s=60, num_cpus=2,
        resources={"hpc_slot": 1.0, "model:qwen": 0.5},
        env={"STANDIN_MARKER_DIR": str(markers), "RAY_AUTH_TOKEN": SECRET, **env})


def wait_for(provider: HeappeProvider, job_id: str, done: Callable[[JobInfo], bool],
             timeout: float = 20) -> JobInfo:
    deadline = time.monotonic() + timeout
    while True:
        info = provider.poll([job_id])[job_id]
        if done(info):
            return info
        assert time.monotonic() < deadline, f"job {job_id} stuck: {info}"
        time.sleep(0.2)


def read_env(path: Path, timeout: float = 20) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never written: the job did not run"
        time.sleep(0.1)
    return dict(line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)


def test_submit_runs_worker_job_with_its_environment(heappe, tmp_path):
    provider = provider_for(heappe)
    spec = spec_for(tmp_path / "m")
    before = time.time()
    job_id = provider.submit(spec)
    assert job_id.isdigit()
    assert provider.poll([job_id])[job_id].state in (JobState.PENDING, JobState.RUNNING)
    info = wait_for(provider, job_id, lambda i: i.state is JobState.RUNNING)
    assert info.node == "127.0.0.1"
    assert before - 1 <= info.start_time <= time.time()
    assert info.end_time == pytest.approx(info.start_time + 600)

    env = read_env(tmp_path / "m" / f"{spec.allocation_id}.env")
    assert env["HPCSERVE_HEAD_ADDRESS"] == "10.0.0.5:6379"
    assert env["HPCSERVE_ALLOCATION_ID"] == spec.allocation_id
    assert env["HPCSERVE_POOL"] == "chat"
    assert env["HPCSERVE_NUM_CPUS"] == "2"
    assert json.loads(env["HPCSERVE_RESOURCES"]) == {"hpc_slot": 1.0, "model:qwen": 0.5}
    assert env["HPCSERVE_WALLTIME_S"] == "600" and env["HPCSERVE_WARNING_S"] == "60"
    assert env["RAY_AUTH_TOKEN"] == SECRET
    assert env["STANDIN_MARKER_DIR"] == str(tmp_path / "m")   # spec.env travels too
    # What reached HEAppE: HEAppE's field names and limits, the wall-time in seconds.
    task = heappe.state.jobs[int(job_id)].spec.tasks[0]
    assert task.walltime_limit == 600 and task.min_cores == 2 and task.max_cores == 2
    assert heappe.state.jobs[int(job_id)].spec.name.endswith(".w600")
    # A second provider (a restarted head) still knows the wall-time end.
    again = provider_for(heappe).poll([job_id])[job_id]
    assert again.end_time == pytest.approx(info.end_time)


def test_cancel_ends_the_processes_and_is_idempotent(heappe, heappe_backing, tmp_path):
    provider = provider_for(heappe)
    spec = spec_for(tmp_path / "m")
    job_id = provider.submit(spec)
    env = read_env(tmp_path / "m" / f"{spec.allocation_id}.env")
    pgid = heappe_backing.pgid(heappe.state.jobs[int(job_id)].backing_id)
    assert int(env["PID"]) == pgid
    provider.cancel(job_id)
    assert provider.poll([job_id])[job_id].state is JobState.CANCELLED
    deadline = time.monotonic() + 10
    while True:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            break
        assert time.monotonic() < deadline, "job processes survived the cancel"
        time.sleep(0.1)
    assert (tmp_path / "m" / f"{spec.allocation_id}.term").exists()
    provider.cancel(job_id)                      # already cancelled: no error
    provider.cancel("999999")                    # unknown to HEAppE: no error
    assert provider.poll(["999999"])["999999"].state is JobState.UNKNOWN


@pytest.mark.parametrize(("code", "state"), [("0", JobState.COMPLETED), ("3", JobState.FAILED)])
def test_job_ending_by_itself(heappe, tmp_path, code, state):
    provider = provider_for(heappe)
    job_id = provider.submit(spec_for(tmp_path / "m", STANDIN_RUN_S="1", STANDIN_EXIT_CODE=code))
    info = wait_for(provider, job_id, lambda i: i.state.terminal)
    assert info.state is state
    if state is JobState.FAILED:
        assert "exit code 3" in info.reason


def test_state_flags_map_including_timeout(heappe, tmp_path):
    provider = provider_for(heappe)
    job_id = provider.submit(spec_for(tmp_path / "m", walltime_s=600))
    info = wait_for(provider, job_id, lambda i: i.state is JobState.RUNNING)
    job = heappe.state.jobs[int(job_id)]
    for flag, expected in ((128, JobState.PENDING), (2, JobState.PENDING),
                           (256, JobState.UNKNOWN), (64, JobState.CANCELLED)):
        job.forced = (flag, None)
        assert provider.poll([job_id])[job_id].state is expected, flag
    job.forced = (32, info.end_time + 5)         # Failed at the wall-time: a timeout
    assert provider.poll([job_id])[job_id].state is JobState.TIMEOUT
    job.forced = (32, info.start_time + 5)       # Failed early: a failure
    assert provider.poll([job_id])[job_id].state is JobState.FAILED
    job.forced = None
    job.state = 8
    provider.cancel(job_id)


def test_expired_session_is_renewed_transparently(heappe_backing, tmp_path):
    server = HeappeServer(HeappeState(heappe_backing, Site(session_ttl_s=1.0)), free_port())
    server.start()
    try:
        provider = provider_for(server)
        job_id = provider.submit(spec_for(tmp_path / "m"))
        assert provider.authentications == 1
        time.sleep(1.5)                              # the session code expires
        assert provider.poll([job_id])[job_id].state in (JobState.PENDING, JobState.RUNNING)
        assert provider.authentications == 2 and server.state.auth_count == 2
        assert ("CurrentInfoForJob", 401) in server.state.log
        server.state.expire_sessions()               # e.g. HEAppE restarted
        provider.cancel(job_id)
        assert provider.poll([job_id])[job_id].state is JobState.CANCELLED
        assert provider.authentications == 3
    finally:
        server.stop()


def test_wrong_password_is_not_retryable(heappe):
    provider = provider_for(heappe, password="wrong")
    with pytest.raises(HeappeAuthError) as err:
        provider.poll(["1"])
    assert err.value.retryable is False


@pytest.mark.parametrize(("kind", "good"), [("openid", "oidc"), ("lexis", "lexis")])
def test_token_authentication_rereads_a_rotated_token(heappe, tmp_path, kind, good):
    token_file = tmp_path / "token"
    token_file.write_text(f"{good}-a\n")
    provider = provider_for(heappe, username=None, password=None, token_kind=kind,
                            access_token_file=str(token_file))
    assert provider.poll(["5"])["5"].state is JobState.UNKNOWN
    site = heappe.state.site
    tokens = site.openid_tokens if kind == "openid" else site.lexis_tokens
    tokens.clear()
    tokens.add(f"{good}-b")                      # the IdP rotated the token
    token_file.write_text(f"{good}-b\n")
    heappe.state.expire_sessions()
    assert provider.poll(["5"])["5"].state is JobState.UNKNOWN
    assert provider.authentications == 2


def test_server_down_is_a_bounded_error_then_recovers(heappe, tmp_path):
    provider = provider_for(heappe)
    job_id = provider.submit(spec_for(tmp_path / "m"))
    wait_for(provider, job_id, lambda i: i.state is JobState.RUNNING)
    heappe.stop()
    for call in (lambda: provider.poll([job_id]), lambda: provider.cancel(job_id),
                 lambda: provider.submit(spec_for(tmp_path / "m2"))):
        started = time.monotonic()
        with pytest.raises(ProviderError) as err:
            call()
        assert time.monotonic() - started < 10
        assert getattr(err.value, "retryable", True) is not False
    heappe.start()                               # same port, same jobs
    assert provider.poll([job_id])[job_id].state is JobState.RUNNING
    provider.cancel(job_id)


def test_hung_server_times_out(tmp_path):
    with socket.socket() as listener:             # accepts connections, never answers
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        port = listener.getsockname()[1]
        provider = HeappeProvider(base_url=f"http://127.0.0.1:{port}", username="u",
                                  password="p", cluster_id=1, project_id=1,
                                  command_template_id=1, cluster_node_type_id=1,
                                  file_transfer_method_id=1, connect_timeout_s=1.0,
                                  request_timeout_s=1.5)
        started = time.monotonic()
        with pytest.raises(ProviderError, match="unreachable"):
            provider.poll(["1"])
        assert time.monotonic() - started < 6


def test_failed_submit_deletes_the_draft(heappe, tmp_path):
    provider = provider_for(heappe)
    heappe.state.fail_next("SubmitJob", 500)
    with pytest.raises(ProviderError):
        provider.submit(spec_for(tmp_path / "m"))
    (job,) = heappe.state.jobs.values()
    assert job.state == 256 and job.backing_id is None       # deleted, never ran
    # The submit happened but its answer was lost: the job is kept, not duplicated.
    heappe.state.fail_next("SubmitJob", 500, after=True)
    job_id = provider.submit(spec_for(tmp_path / "m"))
    assert heappe.state.jobs[int(job_id)].backing_id is not None
    assert len([j for j in heappe.state.jobs.values() if j.backing_id]) == 1
    provider.cancel(job_id)


def test_rejected_request_is_not_retryable(heappe, tmp_path):
    provider = provider_for(heappe)
    with pytest.raises(HeappeRejected, match="WalltimeLimit") as err:
        provider.submit(spec_for(tmp_path / "m", walltime_s=49 * 3600))
    assert err.value.retryable is False
    with pytest.raises(HeappeRejected, match="cannot travel"):
        provider.submit(spec_for(tmp_path / "m", EVIL="$(touch /tmp/x)"))
    with pytest.raises(HeappeRejected, match="ClusterId"):
        provider_for(heappe, cluster_id=99).submit(spec_for(tmp_path / "m"))


def test_template_maps_parameters_to_worker_env(heappe, tmp_path):
    """The documented PreparationScript, substituted as HEAppE does, exports the env."""
    provider = provider_for(heappe)
    spec = spec_for(tmp_path / "m", walltime_s=3600)
    spec.env["RAY_AUTH_TOKEN"] = "to'k\"en $HOME `x` ;|&"  # free-form: must survive verbatim
    values = provider.template_parameters(spec)
    script = re.sub(r"%%\{([\w\.]+)\}", lambda m: values[m.group(1)], preparation_script())
    out = subprocess.run(["bash", "-c", script + "; env -0"], capture_output=True, check=True,
                         env={"PATH": os.environ["PATH"]}).stdout.decode()
    env = dict(item.split("=", 1) for item in out.split("\0") if "=" in item)
    assert env["RAY_AUTH_TOKEN"] == spec.env["RAY_AUTH_TOKEN"]
    assert env["HPCSERVE_RESOURCES"] == '{"hpc_slot":1.0,"model:qwen":0.5}'
    assert env["HPCSERVE_HEAD_ADDRESS"] == "10.0.0.5:6379"
    assert env["HPCSERVE_WALLTIME_S"] == "3600" and env["HPCSERVE_WARNING_S"] == "60"
    assert abs(int(env["HPCSERVE_WALLTIME_END"]) - (time.time() + 3600)) < 5
    docs = Path(__file__).resolve().parents[3] / "docs" / "heappe.md"
    assert preparation_script() in docs.read_text()      # what admins copy is what we test


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="unknown field.*'clusterid'"):
        HeappeConfig.from_options({"clusterid": 1})
    with pytest.raises(ValueError, match="exactly one way"):
        HeappeConfig(base_url="https://h", cluster_id=1, project_id=1, command_template_id=1,
                     cluster_node_type_id=1, file_transfer_method_id=1)
    with pytest.raises(ValueError, match="project_id"):
        HeappeConfig(base_url="https://h", cluster_id=1, project_id="p1", command_template_id=1,
                     cluster_node_type_id=1, file_transfer_method_id=1, username="u",
                     password="p")
