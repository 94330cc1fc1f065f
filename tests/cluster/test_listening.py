"""The port listing keeps a listener whose process is younger than the tree it read
(Serve replaces HAProxy's process on every reload)."""

from __future__ import annotations

import os
import subprocess
import sys

import psutil

from cluster.listening import _descends


def test_a_process_started_after_the_tree_was_read_is_still_ours():
    # a root whose child starts later: a grandchild of ours, not in any snapshot
    root = subprocess.Popen(
        [sys.executable, "-c",
         "import subprocess, sys; c = subprocess.Popen([sys.executable, '-c', "
         "'import time; time.sleep(60)']); print(c.pid, flush=True); c.wait()"],
        stdout=subprocess.PIPE, text=True)
    try:
        child = int(root.stdout.readline())
        procs: dict = {}
        assert _descends(child, [root.pid], procs) and child in procs
        assert not _descends(os.getpid(), [root.pid], procs)  # not below the root
        assert not _descends(2 ** 22 + 1, [root.pid], procs)  # no such process
    finally:
        for p in psutil.Process(root.pid).children(recursive=True):
            p.kill()
        root.kill()
        root.wait()
