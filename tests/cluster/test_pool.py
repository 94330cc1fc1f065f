"""Pool decisions that need no Ray: queue timeouts, replacement with backoff,
re-adoption without duplicates, provider outages, adaptive lead time.

Jobs are real local jobs (the local provider's supervisor) running a stand-in
script that just sleeps, so states come from the provider as in production.
"""

from __future__ import annotations

import time

import pytest

from cluster.config import PoolConfig
from cluster.pool import LeadTime, Pool
from cluster.providers.base import JobInfo, JobState, Provider, ProviderError, WorkerSpec
from cluster.providers.local import LocalProvider
from cluster.state import (
    DRAINING,
    FAILED,
    QUEUED,
    SERVING,
    STARTING,
    Allocation,
    StateStore,
)


@pytest.fixture
def script(tmp_path):
    path = tmp_path / "sleep_job.sh"
    path.write_text("#!/usr/bin/env bash\ntrap 'exit 0' TERM USR1\nsleep 600 & wait\n")
    return path


def _pool(tmp_path, script, store=None, queue_delay_s=0.0, **overrides):
    config = PoolConfig(**{"name": "p", "walltime_s": 600, **overrides})
    provider = LocalProvider(tmp_path / "jobs", job_script=script, queue_delay_s=queue_delay_s,
                             kill_grace_s=2)
    store = store or StateStore(tmp_path / "state.db")
    spec = WorkerSpec(allocation_id="", pool="p", head_address="127.0.0.1:1",
                      walltime_s=config.walltime_s, warning_s=config.warning_s)
    drains = []
    pool = Pool(config, provider, store, spec,
                drain=lambda node_id, deadline, why: drains.append(node_id) or (True, ""))
    return pool, provider, store


def _cancel_all(provider, store):
    for a in store.allocations():
        provider.cancel(a.job_id)


def _until(predicate, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return False


def test_keeps_the_configured_number_and_readopts_without_duplicates(tmp_path, script):
    pool, provider, store = _pool(tmp_path, script, min_allocations=2)
    try:
        pool.tick(nodes=[])
        assert len(store.allocations(live_only=True)) == 2
        assert _until(lambda: (pool.tick(nodes=[]), all(
            a.phase == STARTING for a in store.allocations(live_only=True)))[1])
        # A restarted control loop: a new Pool over the same state submits nothing.
        again, _, _ = _pool(tmp_path, script, store=store, min_allocations=2)
        for _ in range(3):
            again.tick(nodes=[])
        assert len(store.allocations()) == 2
    finally:
        _cancel_all(provider, store)


def test_job_stuck_in_queue_is_replaced_with_backoff(tmp_path, script):
    pool, provider, store = _pool(tmp_path, script, queue_delay_s=60, queue_timeout_s=1)
    try:
        pool.tick(nodes=[])
        first = store.allocations()[0]
        assert first.phase == QUEUED
        time.sleep(1.5)
        pool.tick(nodes=[])
        first = next(a for a in store.allocations() if a.id == first.id)
        assert first.phase == FAILED and "queue_timeout" in first.reason
        assert _until(lambda: provider.poll([first.job_id])[first.job_id].state.terminal)
        # The replacement waits for the backoff, then comes.
        assert len(store.allocations()) == 1
        assert pool.next_submit_after > time.time()
        pool.next_submit_after = 0  # let the backoff pass
        pool.tick(nodes=[])
        assert len(store.allocations(live_only=True)) == 1
        assert len(store.allocations()) == 2
    finally:
        _cancel_all(provider, store)


def test_failed_job_is_replaced(tmp_path):
    bad = tmp_path / "fail.sh"
    bad.write_text("#!/usr/bin/env bash\nexit 3\n")
    pool, provider, store = _pool(tmp_path, bad)
    pool.tick(nodes=[])
    job = store.allocations()[0].job_id
    assert _until(lambda: provider.poll([job])[job].state is JobState.FAILED)
    pool.tick(nodes=[])
    assert store.allocations()[0].phase == FAILED
    pool.next_submit_after = 0
    pool.tick(nodes=[])
    assert len(store.allocations()) == 2


class _Unreachable(LocalProvider):
    """A scheduler that is down: every call fails (what SLURM/HEAppE outages look like)."""

    def submit(self, spec):
        raise ProviderError("scheduler unreachable")

    def poll(self, job_ids):
        raise ProviderError("scheduler unreachable")


def test_provider_outage_keeps_state_and_backs_off(tmp_path, script):
    pool, provider, store = _pool(tmp_path, script)
    try:
        pool.tick(nodes=[])
        assert _until(lambda: (pool.tick(nodes=[]),
                               store.allocations()[0].phase == STARTING)[1])
        pool.provider = _Unreachable(tmp_path / "jobs")
        pool.tick(nodes=[])  # poll fails: the running allocation is kept as it was
        assert [a.phase for a in store.allocations()] == [STARTING]
        pool.provider = provider
        pool.tick(nodes=[])
        assert [a.phase for a in store.allocations()] == [STARTING]
    finally:
        _cancel_all(provider, store)


def test_lead_time_adapts_to_observations(tmp_path):
    store = StateStore(tmp_path / "state.db")
    config = PoolConfig(name="p", walltime_s=3600, lead_time_s=300, warning_s=60,
                        lead_time_margin_s=10)
    lead = LeadTime(config, store)
    assert lead.seconds() == 300  # configured until rotations were seen
    store.observe("p", "startup_s", 40)
    assert lead.seconds() == 300  # a start-up alone says nothing about hand-over
    store.observe("p", "handover_s", 25)
    assert lead.seconds() == 300  # one quick rotation does not shorten it ...
    store.observe("p", "startup_s", 350)
    assert lead.seconds() == 350 + 25 + 60 + 10  # ... but a slow queue lengthens it
    for _ in range(2):
        store.observe("p", "startup_s", 40)
        store.observe("p", "handover_s", 25)
    assert lead.seconds() == 350 + 25 + 60 + 10  # the worst of the recent ones
    for _ in range(3):
        store.observe("p", "startup_s", 40)
    assert lead.seconds() == 40 + 25 + 60 + 10  # trusted, and the slow one is old
    store.observe("p", "release_s", 80)  # drains take longer than the warning
    assert lead.drain_seconds() == 80 + 10
    assert lead.seconds() == 40 + 25 + 90 + 10


def test_drains_early_enough_for_the_drain_to_end_before_the_wall_time(tmp_path, script):
    """A real scheduler kills the job at its wall-time: when drains were seen to take
    longer than the warning, a node whose successor is late drains that much earlier."""
    from cluster.ray_view import ALLOCATION_LABEL, NodeView
    from cluster.state import DRAINING, SERVING

    pool, provider, store = _pool(tmp_path, script, lead_time_s=0, warning_s=15,
                                  lead_time_margin_s=10)
    try:
        pool.tick(nodes=[])
        assert _until(lambda: (pool.tick(nodes=[]), store.allocations()[0].phase == STARTING)[1])
        a = store.allocations()[0]
        node = NodeView(node_id="n1", ip="127.0.0.1", alive=True, draining=False,
                        labels={ALLOCATION_LABEL: a.id}, replicas=[{"state": "RUNNING"}])
        pool.tick(nodes=[node])
        assert store.allocations()[0].phase == SERVING
        pool.tick(nodes=[node], now=a.end_time - 30)
        assert store.allocations()[0].phase == SERVING  # warning_s=15 not reached yet
        store.observe("p", "release_s", 40)
        pool.tick(nodes=[node], now=a.end_time - 49)
        assert store.allocations()[0].phase == DRAINING  # 40 s drain + 10 s margin
    finally:
        _cancel_all(provider, store)


def test_steady_only_while_all_serve_far_from_rotation(tmp_path, script):
    """The control loop slows down only when nothing needs watching: every slot
    serving and no rotation (lead time) or wall-time warning within the horizon."""
    from cluster.ray_view import ALLOCATION_LABEL, NodeView
    from cluster.state import SERVING

    pool, provider, store = _pool(tmp_path, script, lead_time_s=120, warning_s=60)
    try:
        now = time.time()
        assert not pool.steady(now, 10)  # empty pool: a submit is due
        pool.tick(nodes=[])
        assert _until(lambda: (pool.tick(nodes=[]), store.allocations()[0].phase == STARTING)[1])
        assert not pool.steady(time.time(), 10)  # starting: watch it join
        a = store.allocations()[0]
        node = NodeView(node_id="n1", ip="127.0.0.1", alive=True, draining=False,
                        labels={ALLOCATION_LABEL: a.id}, replicas=[{"state": "RUNNING"}])
        pool.tick(nodes=[node])
        a = store.allocations()[0]
        assert a.phase == SERVING
        assert pool.steady(time.time(), 10)
        # Within lead time + horizon of the wall-time end: not steady any more.
        assert not pool.steady(a.end_time - 120 - 5, 10)
        assert pool.steady(a.end_time - 120 - 15, 10)
    finally:
        _cancel_all(provider, store)


def test_budget_of_one_allocation_hour_stops_the_pool_growing_and_says_so(tmp_path, script):
    pool, provider, store = _pool(tmp_path, script, min_allocations=1, max_allocations=3,
                                  walltime_s=3600, max_node_hours_per_day=1.0)
    try:
        pool.demand_nodes = 2  # Serve wants two more replicas than fit
        pool.tick(nodes=[])
        pool.tick(nodes=[])
        assert len(store.allocations()) == 1  # the first hour is the whole budget
        messages = [m for _, _, _, m in store.events()]
        assert any(m.startswith("budget: floor") or m.startswith("budget: demand")
                   for m in messages), messages
        from cluster.status import _pool_summary
        summary = _pool_summary(pool.config, store, time.time())
        assert summary["node_hours_left"] <= 0.0 and summary["node_hours_budget"] == 1.0
    finally:
        _cancel_all(provider, store)


class _Scheduler(Provider):
    """A scheduler in memory: refuses every submit when told to, gives expected starts,
    counts the calls."""

    name = "fake"

    def __init__(self, refuse: str = "", start: float | None = None):
        self.refuse, self.start = refuse, start
        self.jobs: dict[str, JobState] = {}
        self.submits = self.asked = 0

    def submit(self, spec):
        self.submits += 1
        if self.refuse:
            raise ProviderError(self.refuse)
        self.jobs[f"j{self.submits}"] = JobState.PENDING
        return f"j{self.submits}"

    def poll(self, job_ids):
        return {j: JobInfo(j, self.jobs.get(j, JobState.UNKNOWN)) for j in job_ids}

    def cancel(self, job_id):
        self.jobs[job_id] = JobState.CANCELLED

    def expected_start(self, job_id):
        self.asked += 1
        return self.start


REFUSAL = ("sbatch: error: Batch job submission failed: Invalid account or "
           "account/partition combination specified")


def test_a_refusing_provider_is_retried_with_growing_backoff_and_says_why(tmp_path, script):
    """Demand waits and every sbatch is refused: tried again after 4, 8, 16, 32 s (not
    every tick), the reason is the pool's 'blocked', and the allocation that serves
    from before does not reset the backoff (it proves nothing about submitting)."""
    pool, _, store = _pool(tmp_path, script, min_allocations=1, max_allocations=2)
    t0 = time.time()
    store.save(Allocation(id="p-old", pool="p", provider="fake", job_id="j0", phase=SERVING,
                          submit_time=t0 - 900, start_time=t0 - 890, joined_time=t0 - 880,
                          serving_time=t0 - 870, end_time=t0 + 3000))
    pool.provider = scheduler = _Scheduler(refuse=REFUSAL)
    scheduler.jobs["j0"] = JobState.RUNNING
    pool.demand_nodes = 1  # Serve wants a replica more than the serving node holds
    attempts, reasons = [], set()
    for second in range(100):  # the control loop's 1 s ticks
        before = scheduler.submits
        pool.tick(nodes=None, now=t0 + second)
        if scheduler.submits > before:
            attempts.append(second)
        reasons.add(pool.blocked(t0 + second).split(";")[0])
    assert attempts == [0, 4, 12, 28, 60], attempts
    assert reasons == {f"submit failed: {REFUSAL}"}, reasons  # blocked the whole time
    # also between a backoff's end and the tick that retries (no flicker to 'starting')
    assert pool.blocked(pool.next_submit_after + 0.5).endswith("; trying again")
    assert [a.id for a in store.allocations(live_only=True)] == ["p-old"]
    backoffs = [m for _, _, _, m in store.events(100) if m.startswith("submit failed")]
    assert [m.rsplit("backoff ", 1)[1] for m in backoffs] == ["4s", "8s", "16s", "32s", "64s"]
    # the scheduler takes jobs again: one is submitted, the pool is no longer blocked
    scheduler.refuse = ""
    pool.tick(nodes=None, now=t0 + 124)
    assert scheduler.submits == 6 and pool.blocked(t0 + 124) == ""
    assert len(store.allocations(live_only=True)) == 2


def test_expected_start_is_asked_every_10_s_per_queued_job_not_every_tick(tmp_path, script):
    pool, _, store = _pool(tmp_path, script, min_allocations=1)
    pool.provider = scheduler = _Scheduler(start=1_900_000_000.0)
    t0 = float(round(time.time()))
    for second in range(25):
        pool.tick(nodes=None, now=t0 + second)
    (a,) = store.allocations(live_only=True)
    # submitted at 0 s, asked from the next tick on: at 1, 11 and 21 s
    assert a.phase == QUEUED and scheduler.asked == 3
    assert pool.expected_starts == {a.id: 1_900_000_000.0}
    scheduler.start = None  # the estimate is withdrawn (N/A): so is ours
    pool.tick(nodes=None, now=t0 + 31)
    assert pool.expected_starts == {}
    scheduler.start = 1_900_000_100.0
    pool.tick(nodes=None, now=t0 + 41)
    assert pool.expected_starts == {a.id: 1_900_000_100.0}
    scheduler.jobs[a.job_id] = JobState.RUNNING  # started: nothing more to ask
    pool.tick(nodes=None, now=t0 + 51)
    assert pool.expected_starts == {} and scheduler.asked == 5


def test_local_provider_expects_a_job_to_start_after_its_queue_delay(tmp_path, script):
    provider = LocalProvider(tmp_path / "jobs", job_script=script, queue_delay_s=60,
                             kill_grace_s=2)
    spec = WorkerSpec(allocation_id="a1", pool="p", head_address="127.0.0.1:1",
                      walltime_s=600, warning_s=60)
    before = time.time()
    job = provider.submit(spec)
    try:
        assert before + 60 <= provider.expected_start(job) <= time.time() + 60
    finally:
        provider.cancel(job)
    assert _until(lambda: provider.poll([job])[job].state.terminal)
    assert provider.expected_start(job) is None and provider.expected_start("nope") is None


def test_a_node_whose_replica_is_still_being_created_is_not_idle(tmp_path, script):
    """Ray placed a replica on the new node (its slot is taken) but the replica's worker
    has not started, so Serve does not list it there yet: not idle, not given back
    (seen on a loaded box: the node was drained 10 s after joining, and its replica
    with it)."""
    from cluster.ray_view import ALLOCATION_LABEL, NodeView, resources_in_use

    pool, provider, store = _pool(tmp_path, script, min_allocations=0, max_allocations=1,
                                  idle_release_s=10)
    try:
        pool.demand_nodes = 1
        pool.tick(nodes=[])
        assert _until(lambda: (pool.tick(nodes=[]), store.allocations()[0].phase == STARTING)[1])
        a = store.allocations()[0]
        total = {"CPU": 1.0, "hpc_slot": 1.0, "memory": 1e9, "node:127.0.0.10": 1.0}
        creating = NodeView(node_id="n1", ip="127.0.0.10", alive=True, draining=False,
                            labels={ALLOCATION_LABEL: a.id},
                            busy=resources_in_use(total, {"CPU": 1.0, "memory": 1e9,
                                                          "node:127.0.0.10": 1.0}))
        assert creating.busy and not creating.replicas
        pool.demand_nodes = 0  # the replica got its node: Ray's demand is gone
        t0 = time.time()
        for second in range(0, 40, 5):
            pool.tick(nodes=[creating], now=t0 + second)
        assert store.allocations(live_only=True)[0].idle_since == 0.0  # never idle
        empty = NodeView(node_id="n1", ip="127.0.0.10", alive=True, draining=False,
                         labels={ALLOCATION_LABEL: a.id},
                         busy=resources_in_use(total, dict(total)))
        assert not empty.busy
        pool.tick(nodes=[empty], now=t0 + 40)
        pool.tick(nodes=[empty], now=t0 + 51)
        assert store.allocations()[0].phase == DRAINING  # idle 11 s: given back
    finally:
        _cancel_all(provider, store)
