"""Keeps the control loop running: restart it within a second when it dies.

Serving never depends on the control loop, but rotation, replacement and scaling
do: a loop that was killed and stayed dead let the service die at the next
wall-time.  ``hpcserve up`` starts this small supervisor detached; it runs the loop
(``python -m cluster.control``) as its child in its own process group, restarts it
when it exits for any reason but a stop, and counts restarts in ``control.restarts``
(``hpcserve status`` shows them).  The loop re-adopts its jobs from the state store,
so a restart submits nothing twice.  Crash loops back off up to 30 s.

Files in RUN_DIR: ``supervisor.pid`` (this process, the group ``hpcserve down``
stops), ``control.pid`` (the current loop), ``control.restarts`` (``N TIME``).
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path


def restarts(run_dir: Path) -> tuple[int, float]:
    """(restarts so far, time of the last one) from ``control.restarts``."""
    try:
        count, when = (run_dir / "control.restarts").read_text().split()
        return int(count), float(when)
    except (OSError, ValueError):
        return 0, 0.0


def supervise(run_dir: Path) -> None:
    stopping = False
    child: subprocess.Popen | None = None

    def _stop(*_):
        nonlocal stopping
        stopping = True
        if child is not None and child.poll() is None:
            child.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    count, _ = restarts(run_dir)
    quick_deaths = 0
    while not stopping:
        started = time.monotonic()
        with open(run_dir / "logs" / "control.log", "ab") as log:
            child = subprocess.Popen([sys.executable, "-m", "cluster.control", str(run_dir)],
                                     stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        (run_dir / "control.pid").write_text(str(child.pid))
        code = child.wait()
        if stopping:
            break
        count += 1
        (run_dir / "control.restarts").write_text(f"{count} {time.time()}")
        quick_deaths = quick_deaths + 1 if time.monotonic() - started < 10 else 0
        delay = min(30.0, 0.5 * 2 ** max(0, quick_deaths - 2))
        print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} supervisor: control loop {child.pid} "
              f"exited ({code}); restart {count} in {delay:.1f}s", file=sys.stderr, flush=True)
        deadline = time.monotonic() + delay
        while not stopping and time.monotonic() < deadline:
            time.sleep(0.1)


if __name__ == "__main__":
    supervise(Path(sys.argv[1]))
