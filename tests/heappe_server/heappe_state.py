"""The HEAppE test server's state: the site, its jobs, and how they run for real.

Why apart from the HTTP app (heappe_test_server.py): the state outlives any one
server -- a test stops and restarts the server on the same port and the jobs must
still be there -- and the mapping of a HEAppE job onto a backing Provider (what
the registered template's PreparationScript would export, and the backing job's
state read back as HEAppE's flags) is the part of HEAppE's behaviour the tests
rely on, so it reads best without the request plumbing around it.
"""

from __future__ import annotations

import base64
import itertools
import json
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from cluster.providers.base import JobState, Provider, WorkerSpec
from cluster.providers.heappe_template import TEMPLATE_PARAMETERS

_FLAG = {JobState.PENDING: 4, JobState.RUNNING: 8, JobState.COMPLETED: 16,
         JobState.FAILED: 32, JobState.TIMEOUT: 32, JobState.CANCELLED: 64,
         JobState.UNKNOWN: 32}
FINAL_FLAGS = (16, 32, 64, 256)   # Finished, Failed, Canceled, Deleted


@dataclass
class Site:
    """What the centre's admin configured: ids, users, the worker template."""

    cluster_id: int = 1
    project_id: int = 11
    command_template_id: int = 7
    cluster_node_type_id: int = 3
    file_transfer_method_id: int = 2
    max_walltime_s: int = 48 * 3600
    users: dict[str, str] = field(default_factory=lambda: {"hpcuser": "hpc-pass"})
    openid_tokens: set[str] = field(default_factory=set)
    lexis_tokens: set[str] = field(default_factory=set)
    session_ttl_s: float = 900.0


@dataclass
class Job:
    id: int
    task_id: int
    spec: Any                       # hp.JobSpecificationExt
    state: int = 1                  # Configuring
    backing_id: str | None = None
    error: str = ""
    created: float = field(default_factory=time.time)
    submitted: float | None = None
    start: float | None = None
    end: float | None = None
    node: str | None = None
    forced: tuple[int, float | None] | None = None   # test override: (flag, end time)


class HeappeState:
    """Server state, kept outside the app so a restarted server keeps its jobs."""

    def __init__(self, backing: Provider, site: Site | None = None) -> None:
        self.backing, self.site = backing, site or Site()
        self.lock = threading.RLock()
        self.sessions: dict[str, float] = {}     # code -> last access
        self.jobs: dict[int, Job] = {}
        self.ids = itertools.count(101)
        self.auth_count = 0
        self.log: list[tuple[str, int]] = []      # (endpoint, status)
        self.faults: dict[str, tuple[int, bool]] = {}   # endpoint -> (status, after handling)

    def fail_next(self, endpoint: str, status: int = 500, after: bool = False) -> None:
        """The next call to endpoint answers `status` (after doing its work if `after`)."""
        self.faults[endpoint] = (status, after)

    def expire_sessions(self) -> None:
        with self.lock:
            self.sessions.clear()

    def refresh(self, job: Job) -> None:
        """Pull the backing job's state into the HEAppE job (as HEAppE's monitor does)."""
        if job.forced is not None:
            job.state, job.end = job.forced
            return
        if job.backing_id is None or job.state in FINAL_FLAGS:
            return
        info = self.backing.poll([job.backing_id])[job.backing_id]
        flag = _FLAG[info.state]
        if flag >= 8 and job.start is None:
            job.start = info.start_time or time.time()
            job.node = info.node
        if flag in FINAL_FLAGS:
            job.end = job.end or time.time()
            job.error = info.reason
        job.state = flag


def worker_spec(spec: Any) -> WorkerSpec:
    """The HEAppE job as a backing job: what the template's PreparationScript would export.

    The job's environment is the task's EnvironmentVariables (the pool's spec.env:
    Ray settings, ...) plus every template parameter exported under its worker env
    name (base64 ones decoded), as the registered PreparationScript does; a backing
    provider adds only what the scheduler decides (wall-time end, node address).

    ``warning_s`` is 0: a HEAppE template cannot ask the scheduler for an early-warning
    signal, so the backing scheduler sends none; the worker job drains itself on its
    own timer (HPCSERVE_WARNING_S from the template).
    """
    task = spec.tasks[0]
    values = {v.command_parameter_identifier: v.parameter_value or ""
              for v in task.template_parameter_values or []}
    exported: dict[str, str] = {}
    for p in TEMPLATE_PARAMETERS:
        raw = values.get(p.identifier, "")
        exported[p.env] = base64.b64decode(raw).decode() if p.base64 else raw
    if not exported.get("RAY_AUTH_TOKEN"):
        exported.pop("RAY_AUTH_TOKEN", None)     # send_token=False: the template has its own
    extra = {e.name: e.value or "" for e in task.environment_variables or [] if e.name}
    return WorkerSpec(
        allocation_id=exported["HPCSERVE_ALLOCATION_ID"], pool=exported["HPCSERVE_POOL"],
        head_address=exported["HPCSERVE_HEAD_ADDRESS"], walltime_s=int(task.walltime_limit),
        warning_s=0, num_cpus=int(exported["HPCSERVE_NUM_CPUS"]),
        num_gpus=int(exported["HPCSERVE_NUM_GPUS"] or 0),
        resources=json.loads(exported["HPCSERVE_RESOURCES"] or "{}"),
        env={**extra, **exported})
