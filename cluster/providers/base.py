"""The provider interface: how the pool talks to a batch system.

A provider does four things: submit a worker job, poll jobs, cancel a job, and
describe the worker job it runs (and, optionally, says when a queued job is
expected to start).  Everything else -- rotation, replacement,
lead times, persistence -- lives in the pool, so a new batch system is one module.
"""

from __future__ import annotations

import abc
import enum
from dataclasses import dataclass, field


class JobState(str, enum.Enum):
    PENDING = "PENDING"      # submitted, waiting in the queue
    RUNNING = "RUNNING"      # the worker job script is running
    COMPLETED = "COMPLETED"  # ended by itself or cancelled by us
    CANCELLED = "CANCELLED"
    TIMEOUT = "TIMEOUT"      # killed at its wall-time
    FAILED = "FAILED"        # non-zero exit, node failure, submit-time rejection
    UNKNOWN = "UNKNOWN"      # the scheduler no longer knows the job (vanished)

    @property
    def terminal(self) -> bool:
        return self not in (JobState.PENDING, JobState.RUNNING)


@dataclass
class WorkerSpec:
    """Everything a worker job needs to join the head and host replicas.

    ``env`` is exported into the job's environment (Ray token, Serve settings).
    ``resources`` are Ray custom resources the node advertises (e.g. hpc_slot).
    """

    allocation_id: str
    pool: str
    head_address: str           # host:port of the Ray GCS
    walltime_s: int
    warning_s: int              # scheduler's warning signal this long before the end
    num_cpus: int = 1
    num_gpus: int = 0
    resources: dict[str, float] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    workdir: str = ""


@dataclass
class JobInfo:
    job_id: str
    state: JobState
    node: str | None = None          # hostname or IP the job runs on
    start_time: float | None = None  # epoch seconds
    end_time: float | None = None    # wall-time end (epoch seconds) once running
    reason: str = ""


class ProviderError(Exception):
    """The batch system could not be reached or refused a call (retryable)."""


class Provider(abc.ABC):
    name: str = "base"

    @abc.abstractmethod
    def submit(self, spec: WorkerSpec) -> str:
        """Submit a worker job; return the scheduler's job id."""

    @abc.abstractmethod
    def poll(self, job_ids: list[str]) -> dict[str, JobInfo]:
        """Current state of each job; a job the scheduler forgot is UNKNOWN."""

    @abc.abstractmethod
    def cancel(self, job_id: str) -> None:
        """End a job early (idempotent)."""

    def expected_start(self, job_id: str) -> float | None:
        """When the scheduler expects a queued job to start (epoch seconds), where it
        gives an estimate; None when it gives none (not computed yet, held, running,
        unknown).  Optional: a scheduler with no estimates keeps this default."""
        return None

    def describe(self) -> str:
        """A human-readable description of the worker job this provider runs."""
        return self.name
