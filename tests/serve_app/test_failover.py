"""Mid-stream failover with a real engine replica killed: the failover relay's.

A model with ``failover: true`` on ``direct`` (the default) has an application of
its own, and HAProxy sends its requests through the failover relay on the head
(``cluster.failover_relay``): when the engine replica a stream is on dies, the
relay asks another replica to continue from the text already sent, and the
client sees one uninterrupted stream.  Two allocations, one engine replica on
each; the replica generating the stream is found by the CPU its process tree
burns and SIGKILLed mid-stream.  The other replica's CPU while the rest of the
stream arrives proves the stream did move (a stream already generated in full
before the kill would pass every other check).  The same with ``ingress: routed``,
whose ingress replica fails over itself.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from serve_app.processes import session_members

MAX_TOKENS = 1200  # ~2.5 s at the tiny model's c=1 speed: the kill lands mid-stream


@pytest.fixture(scope="module", params=["direct", "routed"])
def stack(hpcserve_stack, request):
    """Two models, ``tiny`` with failover.  ``direct``: each an application of its own,
    HAProxy sends ``tiny`` through the relay; ``routed``: both behind the ingress."""
    s = hpcserve_stack(
        name=f"failover-{request.param}", pool={"min_allocations": 2},
        args={"ingress": request.param, "models": [
            {"name": "tiny", "engine": "zmq", "max_model_len": 2048, "num_replicas": 2,
             "failover": True, "resources": {"hpc_slot": 0.5}},
            {"name": "other", "engine": "zmq", "max_model_len": 2048,
             "resources": {"hpc_slot": 0.5}}]})
    s.ingress = request.param
    s.replica_title = "ray::ServeReplica:" + (
        "hpcserve.m.tiny" if request.param == "direct" else "hpcserve") + ":engine-tiny"
    yield s
    s.down()


def test_the_failover_model_takes_the_relay_or_the_ingress(stack):
    import json
    status = json.loads(stack.cli("status", "--json").stdout)
    apps = {name: set(a["deployments"]) for name, a in status["applications"].items()}
    haproxy = (_haproxy_dir(stack) / "haproxy.cfg").read_text()
    # `other` asks nothing: failover: auto, off where the pool (local) shares the head's cores
    assert status["failover_models"] == ([] if stack.ingress == "routed" else ["tiny"])
    if stack.ingress == "routed":
        assert apps == {"hpcserve": {"Ingress", "engine-tiny", "engine-other"}}
        assert "hpcserve_failover_relay" not in haproxy
        return
    assert apps == {"hpcserve": {"Ingress"}, "hpcserve.m.tiny": {"engine-tiny"},
                    "hpcserve.m.other": {"engine-other"}}
    assert "use_backend hpcserve_failover_relay" in haproxy
    # the relay finds the model's two replicas in Serve's config, to send to directly
    from cluster.relay_backends import parse
    assert len(parse(haproxy)["/_m/tiny"]) == 2
    assert (_haproxy_dir(stack).parent / "hpcserve-failover.map").read_text() == "tiny 1\n"


def _haproxy_dir(stack) -> Path:
    """Where Serve's HAProxy runs: its config, and the relay's PID and log."""
    (config,) = (Path(stack.head.private_dir) / "h").glob("*/haproxy.cfg")
    return config.parent


def _job_sessions(home: Path) -> set[int]:
    """The sessions of this stack's batch jobs: every process a job started is in one."""
    return {int(f.read_text().strip()) for f in home.rglob("*.pid")}


def _engine_replicas(home: Path, replica: str) -> list[int]:
    """PIDs of the replica processes of one engine deployment (``ray::ServeReplica:...``)."""
    found = []
    for pid in (p for sid in _job_sessions(home) for p in session_members(sid)):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()
        except (OSError, UnicodeDecodeError):
            continue
        # while it runs a method (health checks too) Ray retitles it ...engine-tiny.method
        if cmd == replica or cmd.startswith(replica + "."):
            found.append(pid)
    return found


def _tree_cpu_ticks(pid: int) -> int:
    """CPU ticks of ``pid`` and its children (the replica and its engine process)."""
    total = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(entry) == pid or int(fields[1]) == pid:
            total += int(fields[11]) + int(fields[12])  # utime + stime
    return total


def _busiest(pids: list[int], seconds: float = 0.5) -> tuple[int, dict[int, int]]:
    before = {p: _tree_cpu_ticks(p) for p in pids}
    time.sleep(seconds)
    used = {p: _tree_cpu_ticks(p) - before[p] for p in pids}
    return max(used, key=used.get), used


def test_stream_survives_its_engine_replica_being_killed(stack):
    replicas = _engine_replicas(stack.home, stack.replica_title)
    assert len(replicas) == 2, f"expected one engine replica per allocation: {replicas}"
    stream = stack.client(timeout=300).chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "tell me a long story"}],
        max_tokens=MAX_TOKENS, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    chunks = iter(stream)
    text_before = ""
    while len(text_before) < 200:  # well into the stream, far from its end
        chunk = next(chunks)
        if chunk.choices:
            text_before += chunk.choices[0].delta.content or ""
    victim, used = _busiest(replicas)
    others = [used[p] for p in replicas if p != victim]
    assert used[victim] > 3 * max(others), f"no replica stands out as serving: {used}"
    os.kill(victim, signal.SIGKILL)
    (survivor,) = (p for p in replicas if p != victim)
    survivor_before = _tree_cpu_ticks(survivor)

    text_after, finish, usage = "", None, None
    for chunk in chunks:
        if chunk.choices:
            text_after += chunk.choices[0].delta.content or ""
            finish = chunk.choices[0].finish_reason or finish
        if chunk.usage is not None:
            usage = chunk.usage
    # the survivor generated the rest: more work than the victim did in its sample
    survivor_used = _tree_cpu_ticks(survivor) - survivor_before
    assert survivor_used > used[victim], (
        f"the stream never moved: {survivor_used} ticks on the other replica {used}")
    assert text_after, "nothing arrived after the replica was killed"
    assert finish == "length"
    assert usage is not None and usage.completion_tokens == MAX_TOKENS
    # the text sent before the kill is prompt for the second replica, not for usage
    plain = stack.client().chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "tell me a long story"}],
        max_tokens=1)
    assert usage.prompt_tokens == plain.usage.prompt_tokens, (usage, plain.usage)
    assert victim not in _engine_replicas(stack.home, stack.replica_title)
    if stack.ingress == "direct":  # and it was the relay that resumed it
        log = (_haproxy_dir(stack) / "relay.log").read_text()
        assert "resuming on another replica (1 of 2)" in log, log
        import httpx  # and counted it, where `up` said
        assert f"relay:     {stack.head.relay_metrics_url} (mid-stream failover: tiny)" \
            in stack.up_output
        metrics = httpx.get(stack.head.relay_metrics_url, timeout=10).text
        assert 'hpcserve_relay_resumed_streams_total{model="tiny"} 1.0' in metrics, metrics
        assert 'hpcserve_relay_lost_total{model="tiny"} 0.0' in metrics, metrics


def test_service_keeps_serving_after_the_kill(stack):
    reply = stack.client().chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=8)
    assert reply.choices[0].finish_reason in ("length", "stop")
    assert reply.usage.completion_tokens >= 1


def test_a_relay_that_died_is_started_again_by_the_control_loop(stack):
    if stack.ingress != "direct":
        pytest.skip("the routed ingress fails over itself: no relay")
    from tests.cluster.rotation_support import wait_until
    from tests.haproxy_support import answers
    pid_file = _haproxy_dir(stack) / "relay.pid"
    old = int(pid_file.read_text())
    os.kill(old, signal.SIGKILL)
    wait_until(lambda: int(pid_file.read_text()) != old, 60, "a new relay")
    port = int(stack.head.env["HPCSERVE_RELAY_PORT"])
    wait_until(lambda: answers(port), 30, "the new relay listening", poll_s=0.1)
    reply = stack.client().chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=8, stream=True)
    assert sum(1 for chunk in reply if chunk.choices and chunk.choices[0].delta.content) >= 1

