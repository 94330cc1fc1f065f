"""The allocation pool's executor: observe, ask the policy, apply its plan.

Each tick the pool (1) refreshes job states from the provider, (2) matches jobs to
Ray nodes by their allocation label (joined, serving, idle since when), then asks
``cluster.policy.decide`` what to do and applies it: submit through the provider,
drain through Ray (DrainNode with a deadline: Serve starts replacement replicas
before it stops the old ones), release a drained job early.  Failed, vanished or
stuck jobs are recorded here; replacing them is the policy's floor rule, paced by a
backoff.  A provider that errors never stops serving: the tick skips what needs it.
For a queued job it also asks the scheduler's expected start, at most every
``EXPECTED_START_EVERY_S`` (a query per job: not every tick).

``lead_time`` adapts to what was observed (queue wait + start-up + hand-over),
see ``LeadTime``.  All state lives in ``StateStore``, so a restarted loop resumes.
"""

from __future__ import annotations

import logging
import math
import time
import uuid
from typing import Callable

from cluster import metrics
from cluster.config import PoolConfig
from cluster.policy import (
    Drain,
    NodeState,
    Observation,
    Plan,
    Release,
    Submit,
    budget_left_s,
    decide,
    node_seconds_used,
)
from cluster.providers.base import JobState, Provider, ProviderError, WorkerSpec
from cluster.ray_view import NodeView
from cluster.state import (
    DRAINING,
    FAILED,
    LIVE_PHASES,
    QUEUED,
    RETIRED,
    SERVING,
    STARTING,
    Allocation,
    StateStore,
)

log = logging.getLogger("hpcserve.pool")

EXPECTED_START_EVERY_S = 10.0  # how often to ask the scheduler about one queued job

# drain(node_id, deadline_s, reason) -> (accepted, message); RayView.drain in production.
Drainer = Callable[[str, float, str], tuple[bool, str]]


class LeadTime:
    """How long before a wall-time end to submit the successor, and to drain.

    The successor must have joined *and* taken over (Serve starts the replacement
    replicas on it while the old node drains) before the old node must drain.  So:
    worst recent (submit -> node joined) + worst recent (drain -> successor serving)
    + drain lead + margin.  A few quick rotations are no proof that the next queue
    will be quick too: until ``TRUST_AFTER`` rotations were seen the observations
    may only lengthen the configured ``lead_time_s``, never shorten it.  A queue
    that gets slower pushes submissions earlier on the next rotation.
    """

    TRUST_AFTER = 3

    def __init__(self, pool: PoolConfig, store: StateStore):
        self.pool, self.store = pool, store

    def seconds(self) -> float:
        startup = self.store.observations(self.pool.name, "startup_s")
        handover = self.store.observations(self.pool.name, "handover_s")
        if not startup or not handover:
            return self.pool.lead_time_s
        lead = (max(startup) + max(handover) + self.drain_seconds()
                + self.pool.lead_time_margin_s)
        if min(len(startup), len(handover)) < self.TRUST_AFTER:
            lead = max(lead, self.pool.lead_time_s)
        return min(lead, self.pool.walltime_s * 0.8)

    def drain_seconds(self) -> float:
        """How long before the wall-time end a drain must start to end in time.

        The scheduler kills the job at its wall-time, drained or not, so a node whose
        drains were seen to take longer than ``warning_s`` drains that much earlier.
        """
        released = self.store.observations(self.pool.name, "release_s")
        if not released:
            return self.pool.warning_s
        return max(self.pool.warning_s, max(released) + self.pool.lead_time_margin_s)


class Pool:
    def __init__(self, config: PoolConfig, provider: Provider, store: StateStore,
                 worker_spec: WorkerSpec, drain: Drainer):
        self.config = config
        self.drain = drain
        self.provider = provider
        self.store = store
        self.template = worker_spec  # allocation_id filled per submit
        self.lead = LeadTime(config, store)
        self.failures = 0
        self.next_submit_after = 0.0
        self.demand_nodes = 0  # set by the control loop from Ray's unmet demand
        self.expected_starts: dict[str, float] = {}  # queued allocation -> scheduler's estimate
        self._expected_asked: dict[str, float] = {}  # queued allocation -> when last asked
        self._demand_seen = 0
        self._refused_seen: list[str] = []
        self._last_failure = ""
        self._failed_at = 0.0
        self._refusal = ""  # the provider's last refusal of a submit; "" once one succeeds

    # ---- bookkeeping --------------------------------------------------------
    def live(self) -> list[Allocation]:
        return self.store.allocations(self.config.name, live_only=True)

    def _event(self, a: Allocation | None, message: str) -> None:
        log.info("[%s/%s] %s", self.config.name, a.id if a else "-", message)
        self.store.event(self.config.name, a.id if a else "", message)

    def blocked(self, now: float) -> str:
        """Why this pool cannot add a node now ("" when it can).  A refused submit
        blocks until a submit succeeds, also between its backoff's end and the retry
        (no 'starting' flicker in the model state); a failed job only while its
        backoff lasts."""
        if self._refused_seen:
            return self._refused_seen[0]
        wait = (f"next try in {self.next_submit_after - now:.0f} s"
                if now < self.next_submit_after else "trying again")
        if self._refusal:
            return f"{self._refusal}; {wait}"
        if self._last_failure and now < self.next_submit_after:
            return f"{self._last_failure}; {wait}"
        return ""

    def _backoff(self, now: float, why: str) -> None:
        self._last_failure, self._failed_at = why, now
        self.failures += 1
        delay = min(300.0, 2.0 * 2 ** min(self.failures, 8))
        self.next_submit_after = now + delay
        log.warning("[%s] %s; next submit in %.0fs", self.config.name, why, delay)
        self.store.event(self.config.name, "", f"{why}; backoff {delay:.0f}s")

    def _finish(self, a: Allocation, phase: str, now: float, reason: str) -> None:
        if phase == FAILED:
            metrics.FAILURES.labels(self.config.name).inc()
        a.phase, a.retired_time, a.reason = phase, now, reason
        self.store.save(a)
        self._event(a, f"{phase.lower()}: {reason}")

    # ---- the tick ------------------------------------------------------------
    def tick(self, nodes: list[NodeView] | None, now: float | None = None) -> Plan:
        """One pass.  ``nodes`` is None when the Ray view could not be read."""
        now = time.time() if now is None else now
        if self.demand_nodes != self._demand_seen:
            self._event(None, f"demand: replicas waiting for {self.demand_nodes} node(s)"
                        if self.demand_nodes else "demand: no replica waiting")
            self._demand_seen = self.demand_nodes
        live = self.live()
        self._refresh_jobs(live, now)
        live = self.live()
        self._refresh_expected_starts(live, now)
        node_states = None
        if nodes is not None:
            node_states = self._match_nodes(live, nodes, now)
        plan = decide(self.config, Observation(
            now=now, allocations=live, nodes=node_states, demand_nodes=self.demand_nodes,
            lead_s=self.lead.seconds(), drain_lead_s=self.lead.drain_seconds(),
            submit_blocked=now < self.next_submit_after,
            budget_left_s=budget_left_s(self.config, self.store.allocations(self.config.name),
                                        now)))
        self._export(live, now)
        if plan.refused != self._refused_seen:
            for why in plan.refused:
                self._event(None, why)
            self._refused_seen = plan.refused
        self._apply(plan, {a.id: a for a in live}, nodes or [], now)
        return plan

    def _export(self, live: list[Allocation], now: float) -> None:
        name = self.config.name
        for phase in LIVE_PHASES:
            metrics.ALLOCATIONS.labels(name, phase).set(sum(a.phase == phase for a in live))
        metrics.UNMET_DEMAND.labels(name).set(self.demand_nodes)
        everything = self.store.allocations(name)
        metrics.NODE_SECONDS.labels(name).set(node_seconds_used(everything, now))
        left = budget_left_s(self.config, everything, now)
        if left is not None:
            metrics.BUDGET_LEFT.labels(name).set(left / 3600)

    def steady(self, now: float, horizon_s: float) -> bool:
        """Nothing for the loop to watch closely: every allocation serving, the floor
        met, no replica waiting for a node, no idle node to give back, and no
        rotation or wall-time warning due within ``horizon_s``."""
        live = self.live()
        if len(live) < self.config.min_allocations or self.demand_nodes or \
                any(a.phase != SERVING or a.idle_since for a in live):
            return False
        due = max(self.lead.seconds(), self.lead.drain_seconds()) + horizon_s
        return all(a.end_time and now < a.end_time - due
                   for a in live)

    def _refresh_jobs(self, live: list[Allocation], now: float) -> None:
        if not live:
            return
        try:
            infos = self.provider.poll([a.job_id for a in live])
        except ProviderError as err:
            log.warning("[%s] poll failed, keeping last known state: %s", self.config.name, err)
            return
        for a in live:
            info = infos.get(a.job_id)
            if info is None:
                continue
            a.job_state = info.state.value
            if info.state is JobState.RUNNING and a.phase == QUEUED:
                a.phase, a.start_time = STARTING, info.start_time or now
                a.end_time = info.end_time or (a.start_time + self.config.walltime_s)
                a.node = info.node or ""
                self.store.observe(self.config.name, "queue_wait_s", a.start_time - a.submit_time)
                metrics.QUEUE_WAIT.labels(self.config.name).observe(a.start_time - a.submit_time)
                self._event(a, f"job {a.job_id} running on {a.node}")
            if info.end_time and info.state is JobState.RUNNING:
                a.end_time = info.end_time
            if info.state.terminal:
                if a.phase == DRAINING:
                    self._finish(a, RETIRED, now, f"job {info.state.value.lower()} after drain")
                else:
                    self._finish(a, FAILED, now, f"job {info.state.value}: {info.reason}".strip())
                    self._backoff(now, f"{a.id} ended unexpectedly")
                continue
            if a.phase == QUEUED and now - a.submit_time > self.config.queue_timeout_s:
                self._cancel(a)
                self._finish(a, FAILED, now, "queued past queue_timeout_s")
                self._backoff(now, f"{a.id} stuck in the queue")
                continue
            self.store.save(a)

    def _refresh_expected_starts(self, live: list[Allocation], now: float) -> None:
        """Ask the scheduler when each queued job should start, at most every
        ``EXPECTED_START_EVERY_S`` per job (a query per job, so not every tick)."""
        queued = {a.id: a.job_id for a in live if a.phase == QUEUED}
        for gone in set(self._expected_asked) - set(queued):
            self._expected_asked.pop(gone)
            self.expected_starts.pop(gone, None)
        for alloc_id, job_id in queued.items():
            if now - self._expected_asked.get(alloc_id, -math.inf) < EXPECTED_START_EVERY_S:
                continue
            self._expected_asked[alloc_id] = now
            try:
                when = self.provider.expected_start(job_id)
            except ProviderError as err:
                log.debug("[%s] expected start of %s unknown: %s", self.config.name, job_id, err)
                continue
            if when is None:
                self.expected_starts.pop(alloc_id, None)
            else:
                self.expected_starts[alloc_id] = when

    def _match_nodes(self, live: list[Allocation], nodes: list[NodeView],
                     now: float) -> dict[str, NodeState]:
        by_alloc = {n.allocation: n for n in nodes if n.alive}
        states = {}
        for a in live:
            node = by_alloc.get(a.id)
            if node is None:
                continue
            states[a.id] = NodeState(alive=True, replicas=len(node.replicas),
                                     running_replicas=node.running_replicas)
            if not a.joined_time:
                a.joined_time, a.node_id = now, node.node_id
                self.store.observe(self.config.name, "startup_s", now - a.submit_time)
                metrics.STARTUP.labels(self.config.name).observe(now - a.submit_time)
                self._event(a, f"node {node.ip} joined ({now - a.submit_time:.1f}s after submit)")
            if node.running_replicas and a.phase in (QUEUED, STARTING):
                a.phase, a.serving_time = SERVING, now
                self._event(a, f"serving ({node.running_replicas} replicas)")
                pred = next((p for p in live if p.id == a.predecessor), None)
                if pred is not None and pred.drain_time:
                    self.store.observe(self.config.name, "handover_s", now - pred.drain_time)
            if node.replicas or node.busy:
                a.idle_since = 0.0
            elif not a.idle_since:
                a.idle_since = now
            self.store.save(a)
        return states

    # ---- applying the plan -----------------------------------------------------
    def _apply(self, plan: Plan, by_id: dict[str, Allocation], nodes: list[NodeView],
               now: float) -> None:
        alive = {n.allocation: n for n in nodes if n.alive}
        refused = False
        for action in plan.actions:
            if isinstance(action, Submit):
                if not refused:  # after a refusal the backoff paces the rest; drains go on
                    refused = self._submit(by_id.get(action.predecessor), action.reason,
                                           now) is None
            elif isinstance(action, Drain):
                self._drain(by_id[action.allocation], alive.get(action.allocation), now,
                            action.reason)
            elif isinstance(action, Release):
                a = by_id[action.allocation]
                if action.released:
                    self.store.observe(self.config.name, "release_s", now - a.drain_time)
                self._cancel(a)
                self._finish(a, RETIRED, now, action.reason)
        # healthy again -- a job submitted since the last failure serves: reset the
        # backoff.  (Serving jobs from before a failure prove nothing: a provider that
        # refuses while older jobs serve must still back off further each time.)
        if self.failures and any(a.phase == SERVING and a.submit_time > self._failed_at
                                 for a in by_id.values()):
            self.failures = 0

    def _submit(self, predecessor: Allocation | None, reason: str,
                now: float) -> Allocation | None:
        alloc_id = f"{self.config.name}-{uuid.uuid4().hex[:8]}"
        spec = WorkerSpec(**{**self.template.__dict__, "allocation_id": alloc_id})
        try:
            job_id = self.provider.submit(spec)
        except Exception as err:  # refused, unreachable, or a provider's bug: back off
            if not isinstance(err, ProviderError):
                log.exception("[%s] submit raised", self.config.name)
            self._refusal = f"submit failed: {err}"
            self._backoff(now, self._refusal)
            return None
        self._refusal = ""  # a job is on its way
        a = Allocation(id=alloc_id, pool=self.config.name, provider=self.provider.name,
                       job_id=job_id, submit_time=now,
                       predecessor=predecessor.id if predecessor else "")
        self.store.save(a)
        if predecessor is not None:
            predecessor.successor = a.id
            self.store.save(predecessor)
        self._event(a, f"submitted job {job_id} ({reason})")
        metrics.SUBMITS.labels(self.config.name, metrics.reason_kind(reason)).inc()
        return a

    def _drain(self, a: Allocation, node: NodeView | None, now: float, why: str) -> None:
        metrics.DRAINS.labels(self.config.name, metrics.reason_kind(why)).inc()
        a.phase, a.drain_time = DRAINING, now
        self.store.save(a)
        if node is None:
            self._event(a, f"draining ({why}); node not in Ray")
            return
        ok, msg = self.drain(node.node_id, self.config.drain_deadline_s, why)
        self._event(a, f"drain requested ({why}): {'accepted' if ok else 'rejected: ' + msg}")

    def _cancel(self, a: Allocation) -> None:
        try:
            self.provider.cancel(a.job_id)
        except ProviderError as err:
            log.warning("[%s] cancel of %s failed: %s", self.config.name, a.job_id, err)
