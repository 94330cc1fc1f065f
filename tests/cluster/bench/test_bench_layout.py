"""Cores per role (bench-compare --engine-cores), on real process trees."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cluster.bench.cpu import CpuAccount
from cluster.bench.layout import ALLOCATION, parse_cores, pin, unpinned_engines

# a process with a second thread and a child, both started before it is pinned; then
# one more thread, started after: all say their cores when asked (a line on stdin)
TREE = """
import os, subprocess, sys, threading
child = subprocess.Popen([sys.executable, '-c', 'import sys; sys.stdin.readline()'],
                         stdin=subprocess.PIPE)
ready = threading.Event()
def early(): ready.set(); threading.Event().wait()
threading.Thread(target=early, daemon=True).start(); ready.wait()
print(child.pid, flush=True)
sys.stdin.readline()
cores = {}
def late(): cores['late'] = sorted(os.sched_getaffinity(0))
t = threading.Thread(target=late); t.start(); t.join()
tasks = {int(t): sorted(os.sched_getaffinity(int(t))) for t in os.listdir('/proc/self/task')}
print((sorted(map(tuple, tasks.values())), cores['late'], sorted(os.sched_getaffinity(child.pid))),
      flush=True)
child.stdin.close(); child.wait()
"""


ALLOWED = sorted(os.sched_getaffinity(0))
# a control loop that starts an allocation: only its child's command line carries
# the allocation's mark (split here so that the control loop's own does not)
HEAD, TAIL = ALLOCATION[:8], ALLOCATION[8:]
CONTROL = f"""
import subprocess, sys
alloc = subprocess.Popen([sys.executable, '-c', {TREE!r}, {HEAD!r} + {TAIL!r}],
                         stdin=sys.stdin, stdout=sys.stdout)
alloc.wait()
"""


@pytest.mark.skipif(len(ALLOWED) < 2, reason="needs two cores")
def test_engine_nodes_and_the_head_get_their_own_cores(tmp_path):
    home = tmp_path / "home"
    (home / "run").mkdir(parents=True)
    own = os.sched_getaffinity(0)
    started: list[subprocess.Popen] = []

    def tree(code: str) -> subprocess.Popen:
        p = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
        started.append(p)
        p.stdout.readline()  # its child's PID: all started
        return p

    engine = ALLOWED[-1]
    head_cores = ALLOWED[:-1]
    try:
        head = tree(TREE)  # hpcserve's head, with a child
        control = tree(CONTROL)  # the control loop, and under it an allocation's job
        bare = tree(TREE)
        (home / "run" / "head.json").write_text(json.dumps({"pid": head.pid}))
        (home / "run" / "control.pid").write_text(str(control.pid))
        cpu = CpuAccount(bare.pid, home)
        pinned = pin(cpu, {engine})
        assert (len(pinned["engine"]), len(pinned["head"])) == (4, 3)
        assert unpinned_engines(cpu, {engine}) == []
        # an allocation off its cores (as one started after pinning would be) is seen
        alloc = next(pid for pid in pinned["engine"]
                     if ALLOCATION.encode() in Path(f"/proc/{pid}/cmdline").read_bytes())
        os.sched_setaffinity(alloc, set(ALLOWED))
        assert unpinned_engines(cpu, {engine}) == [alloc]
        os.sched_setaffinity(alloc, {engine})
        assert sorted(os.sched_getaffinity(0)) == head_cores  # and the client it starts
        assert sorted(os.sched_getaffinity(control.pid)) == head_cores
        # the allocation answers on the control loop's pipes
        for p, cores in ((head, head_cores), (control, [engine]), (bare, [engine])):
            p.stdin.write("\n")
            p.stdin.flush()
            threads, late, child = ast.literal_eval(p.stdout.readline())
            assert threads == [tuple(cores)] * len(threads) and len(threads) >= 2
            assert late == cores and child == cores
    finally:
        os.sched_setaffinity(0, own)
        for p in started:  # each ends once its stdin does (the allocation with its loop's)
            p.stdin.close()
        for p in started:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def test_a_layout_leaves_the_head_a_core_of_those_allowed():
    with pytest.raises(ValueError, match="must leave a core"):
        pin(CpuAccount(0, None), set(ALLOWED))
    for text in (",".join(map(str, ALLOWED)), str(max(ALLOWED) + 1), ""):
        with pytest.raises(ValueError, match="leaving at least one"):
            parse_cores(text)
    if len(ALLOWED) > 1:
        assert parse_cores(str(ALLOWED[-1])) == {ALLOWED[-1]}
