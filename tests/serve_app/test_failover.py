"""The routed ingress's mid-stream failover, with a real engine replica killed.

The routed ingress (``ingress: routed``, or a model with ``failover: true`` on
``direct``, as here) exists for this: when the engine
replica a stream is on dies, the ingress asks another replica to continue from
the text already sent, and the client sees one uninterrupted stream.  Two
allocations, one engine replica on each; the replica generating the stream is
found by the CPU its process tree burns and SIGKILLed mid-stream.  The other
replica's CPU while the rest of the stream arrives proves the stream did move (a
stream already generated in full before the kill would pass every other check).
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from serve_app.processes import session_members

ENGINE_REPLICA = "ray::ServeReplica:hpcserve:engine-tiny"
MAX_TOKENS = 1200  # ~2.5 s at the tiny model's c=1 speed: the kill lands mid-stream


@pytest.fixture(scope="module")
def stack(hpcserve_stack):
    """Two models on ``ingress: direct``: ``tiny`` asks for failover and stays on the
    router; ``other`` gets an application of its own (``test_model_apps.py``)."""
    s = hpcserve_stack(
        name="failover", pool={"min_allocations": 2},
        args={"ingress": "direct", "models": [
            {"name": "tiny", "engine": "zmq", "max_model_len": 2048, "num_replicas": 2,
             "failover": True, "resources": {"hpc_slot": 0.5}},
            {"name": "other", "engine": "zmq", "max_model_len": 2048,
             "resources": {"hpc_slot": 0.5}}]})
    yield s
    s.down()


def test_the_failover_model_is_on_the_router_and_the_other_has_its_own_app(stack):
    import json
    status = json.loads(stack.cli("status", "--json").stdout)
    apps = {name: set(a["deployments"]) for name, a in status["applications"].items()}
    assert apps == {"hpcserve": {"Ingress", "engine-tiny"},
                    "hpcserve.m.other": {"engine-other"}}


def _job_sessions(home: Path) -> set[int]:
    """The sessions of this stack's batch jobs: every process a job started is in one."""
    return {int(f.read_text().strip()) for f in home.rglob("*.pid")}


def _engine_replicas(home: Path, replica: str = ENGINE_REPLICA) -> list[int]:
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
    replicas = _engine_replicas(stack.home)
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
    assert victim not in _engine_replicas(stack.home)


def test_service_keeps_serving_after_the_kill(stack):
    reply = stack.client().chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=8)
    assert reply.choices[0].finish_reason in ("length", "stop")
    assert reply.usage.completion_tokens >= 1
