"""What the local, SLURM and HEAppE rotation tests share: clients that stream chat
completions without pause (every failure kept with its time, so a test can assert
there were none and show which), and the checks on allocations rotated out.
"""

from __future__ import annotations

import threading
import time

from cluster.providers.base import JobInfo
from cluster.state import StateStore


class Clients:
    """``n`` threads streaming continuously until closed (or the ``with`` block ends)."""

    def __init__(self, stack, n: int):
        self.stack = stack
        self.ok = 0
        self.failures: list[str] = []
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True)
                        for i in range(n)]

    def _run(self, i: int) -> None:
        client = self.stack.client(timeout=60)
        while not self.stop.is_set():
            try:
                chunks = list(client.chat.completions.create(
                    model="tiny", messages=[{"role": "user", "content": f"client {i}"}],
                    max_tokens=24, stream=True, stream_options={"include_usage": True}))
                finish = [c.choices[0].finish_reason for c in chunks if c.choices][-1]
                usage = chunks[-1].usage
                if finish not in ("stop", "length") or usage is None:
                    raise AssertionError(f"bad stream end: finish={finish} usage={usage}")
                with self.lock:
                    self.ok += 1
            except Exception as err:  # noqa: BLE001 - every failure counts
                with self.lock:
                    self.failures.append(f"{time.strftime('%H:%M:%S')} client {i}: {err!r}")

    def start(self) -> Clients:
        for t in self.threads:
            t.start()
        return self

    def close(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=90)

    def __enter__(self) -> Clients:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()


def retired_by_rotation(store: StateStore) -> list:
    """Allocations handed over to a successor and released before their wall-time."""
    return [a for a in store.allocations() if a.rotated_out]


def wait_jobs_ended(provider, job_ids: list[str], timeout: float = 60) -> dict[str, JobInfo]:
    """Poll ``provider`` until every job is in a terminal state (or ``timeout``)."""
    deadline = time.monotonic() + timeout
    while True:
        infos = provider.poll(job_ids)
        if all(i.state.terminal for i in infos.values()) or time.monotonic() > deadline:
            return infos
        time.sleep(1)


def stream_through_rotations(stack, store: StateStore, rotations: int, timeout: float
                             ) -> tuple[Clients, list]:
    """4 clients stream until ``rotations`` allocations were rotated out (or
    ``timeout``), and a little longer, across the last hand-over."""
    deadline = time.monotonic() + timeout
    with Clients(stack, n=4) as clients:
        while time.monotonic() < deadline and len(retired_by_rotation(store)) < rotations:
            time.sleep(2)
        time.sleep(5)
    return clients, retired_by_rotation(store)


def wait_until(predicate, timeout: float, what: str, poll_s: float = 1.0) -> None:
    """Poll ``predicate`` until true; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(poll_s)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def elastic_model(max_replicas: int) -> dict:
    """The tiny model with autoscaling that reacts in seconds (the elastic tests)."""
    return {"name": "tiny", "engine": "zmq", "max_model_len": 2048,
            "graceful_shutdown_timeout_s": 5, "health_check_period_s": 1,
            "autoscaling": {"min_replicas": 1, "max_replicas": max_replicas,
                            "target_ongoing_requests": 2, "upscale_delay_s": 2,
                            "downscale_delay_s": 10, "metrics_interval_s": 1,
                            "look_back_period_s": 3}}
