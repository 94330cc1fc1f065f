"""Cores per role (bench-compare --engine-cores), on real process trees."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from cluster.bench.cpu import CpuAccount
from cluster.bench.layout import ALLOCATION, pin

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


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs two cores")
def test_engine_nodes_and_the_head_get_their_own_cores(tmp_path):
    home = tmp_path / "home"
    (home / "run").mkdir(parents=True)
    own = os.sched_getaffinity(0)
    started: list[subprocess.Popen] = []

    def tree(*marker: str) -> tuple[subprocess.Popen, int]:
        p = subprocess.Popen([sys.executable, "-c", TREE, *marker], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
        started.append(p)
        return p, int(p.stdout.readline())

    try:
        head, head_child = tree()  # hpcserve's head, and under it an allocation's job
        alloc, alloc_child = tree(ALLOCATION)
        bare, bare_child = tree()
        (home / "run" / "head.json").write_text(json.dumps({"pid": head.pid}))
        (home / "run" / "control.pid").write_text(str(alloc.pid))  # found as the control loop's
        counts = pin(CpuAccount(bare.pid, home), {1})
        assert counts == {"engine": 4, "head": 2}
        head_cores = sorted(set(range(os.cpu_count())) - {1})
        assert sorted(os.sched_getaffinity(0)) == head_cores  # and the client it starts
        for p, cores in ((head, head_cores), (alloc, [1]), (bare, [1])):
            p.stdin.write("\n")
            p.stdin.flush()
            threads, late, child = eval(p.stdout.readline())  # noqa: S307 (our own print)
            assert threads == [tuple(cores)] * len(threads) and len(threads) >= 2
            assert late == cores and child == cores
    finally:
        os.sched_setaffinity(0, own)
        for p in started:
            p.kill()
            p.wait()


def test_a_layout_leaves_the_head_a_core():
    with pytest.raises(ValueError, match="must leave a core"):
        pin(CpuAccount(0, None), set(range(os.cpu_count() or 1)))
