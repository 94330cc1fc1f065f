"""Cores for each role: the engine nodes on some, the head and the client on the others.

On an HPC system hpcserve's head (Ray's head, Serve's controller, HAProxy, the
failover relay) runs on a service node and the engines on compute nodes, so the
head's CPU does not slow an engine down.  On one small box every process shares
every core, and whatever the head burns is taken from the engine.
``scripts/bench-compare --engine-cores 1`` keeps the roles apart as an HPC system
would: each side's engine node on the given cores (bare vLLM's processes, its HTTP
server included; each hpcserve allocation's: its Ray worker node with the engine
replica in it), the rest on the others (hpcserve's head and control loop, with
HAProxy and the relay, which are hpcserve's front end; and the benchmark client,
which would run elsewhere).  Both engines get the same cores, but hpcserve's front
end does not compete with its engine while bare vLLM's HTTP server does with its
own, so the ratio against bare vLLM favours hpcserve here; the like-for-like
comparison is one hpcserve data path against another under the same layout.

Processes are pinned once, after start-up: those started later inherit their
parent's cores (a Ray worker its raylet's), but an allocation the control loop
starts later (a rotation, a replacement) would run on the head's cores, so
``unpinned_engines`` says whether that happened.
"""

from __future__ import annotations

import os

from cluster.bench.cpu import ENGINE_REPLICA, CpuAccount, proc_snapshot, with_descendants

ALLOCATION = "cluster.providers.local_job"  # a local allocation's job: an engine node


def parse_cores(text: str) -> set[int]:
    """``--engine-cores``: cores this process may use, leaving it at least one."""
    cores = {int(c) for c in text.split(",") if c.strip()}
    allowed = os.sched_getaffinity(0)
    if not cores or not cores < allowed:
        raise ValueError(f"--engine-cores {text}: give some of the cores {sorted(allowed)}, "
                         "leaving at least one for the head")
    return cores


def engine_node_pids(snap: dict[int, tuple[int, float, str]]) -> set[int]:
    """The processes of every local allocation: its job and all its descendants."""
    jobs = {pid: True for pid, (_, _, cmd) in snap.items() if ALLOCATION in cmd}
    return set(with_descendants(snap, jobs))


def set_cores(pid: int, cores: set[int]) -> None:
    """Every thread of ``pid`` (affinity is per thread; threads and processes it
    starts later inherit it), until no new thread shows up."""
    done: set[str] = set()
    while todo := set(os.listdir(f"/proc/{pid}/task")) - done:
        for tid in todo:
            try:
                os.sched_setaffinity(int(tid), cores)
            except ProcessLookupError:
                pass  # that thread ended meanwhile
        done |= todo


def pin(cpu: CpuAccount, engine_cores: set[int]) -> dict[str, list[int]]:
    """Each side's engine node on ``engine_cores``, everything else of both sides and
    this thread (and the client it starts) on the other allowed cores; the PIDs
    pinned, by role."""
    rest = os.sched_getaffinity(0) - engine_cores
    if not engine_cores or not rest:
        raise ValueError(f"--engine-cores {sorted(engine_cores)} must leave a core for the head")
    snap = proc_snapshot()
    engine_nodes = engine_node_pids(snap)
    pinned: dict[str, list[int]] = {"engine": [], "head": []}
    for pid, bare_side in cpu.ours(snap).items():
        role = "engine" if bare_side or pid in engine_nodes else "head"
        try:
            set_cores(pid, engine_cores if role == "engine" else rest)
        except (FileNotFoundError, ProcessLookupError):
            continue  # the process ended meanwhile
        pinned[role].append(pid)
    os.sched_setaffinity(0, rest)
    return pinned


def engine_replicas(pids: list[int]) -> list[int]:
    snap = proc_snapshot()
    return [pid for pid in pids if pid in snap and ENGINE_REPLICA.search(snap[pid][2])]


def unpinned_engines(cpu: CpuAccount, engine_cores: set[int]) -> list[int]:
    """This stack's engine-node processes now running outside ``engine_cores`` (an
    allocation started after ``pin``)."""
    snap = proc_snapshot()
    out = []
    for pid in sorted(engine_node_pids(snap) & set(cpu.ours(snap))):
        try:
            if not os.sched_getaffinity(pid) <= engine_cores:
                out.append(pid)
        except ProcessLookupError:
            pass
    return out
