"""Cores for each role: the engine nodes on some, the head and the client on the others.

On an HPC system hpcserve's head (Ray's head, Serve's controller, HAProxy, the
failover relay) runs on a service node and the engines on compute nodes, so the
head's CPU does not slow an engine down.  On one small box every process shares
every core, and whatever the head burns is taken from the engine.
``scripts/bench-compare --engine-cores 1`` keeps the roles apart as an HPC system
would: each side's engine node (bare vLLM's processes; each hpcserve allocation's,
its Ray worker node with the engine replica in it) on the given cores, and the
rest (hpcserve's head and control loop, and the benchmark client, which would run
elsewhere) on the others.  Both sides' engines get the same cores, so the ratio
against bare vLLM still compares like with like.
"""

from __future__ import annotations

import os

from cluster.bench.cpu import CpuAccount, proc_snapshot

ALLOCATION = "cluster.providers.local_job"  # a local allocation's job: an engine node


def engine_node_pids(snap: dict[int, tuple[int, float, str]]) -> set[int]:
    """The processes of every local allocation: its job and all its descendants."""
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in snap.items():
        children.setdefault(ppid, []).append(pid)
    found = {pid for pid, (_, _, cmd) in snap.items() if ALLOCATION in cmd}
    todo = list(found)
    while todo:
        for child in children.get(todo.pop(), ()):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def set_cores(pid: int, cores: set[int]) -> None:
    """Every thread of ``pid`` (affinity is per thread; threads and processes it
    starts later inherit it)."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            os.sched_setaffinity(int(tid), cores)
        except (ProcessLookupError, PermissionError):
            pass  # gone meanwhile


def pin(cpu: CpuAccount, engine_cores: set[int]) -> dict[str, int]:
    """Each side's engine node on ``engine_cores``, everything else of both sides and
    this process (and the client it starts) on the other cores; how many processes
    went where."""
    rest = set(range(os.cpu_count() or 1)) - engine_cores
    if not engine_cores or not rest:
        raise ValueError(f"--engine-cores {sorted(engine_cores)} must leave a core for the head")
    snap = proc_snapshot()
    engine_nodes = engine_node_pids(snap)
    counts = {"engine": 0, "head": 0}
    for pid, bare_side in cpu.ours(snap).items():
        role = "engine" if bare_side or pid in engine_nodes else "head"
        try:
            set_cores(pid, engine_cores if role == "engine" else rest)
        except FileNotFoundError:
            continue  # ended meanwhile
        counts[role] += 1
    os.sched_setaffinity(0, rest)
    return counts
