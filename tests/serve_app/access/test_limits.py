"""Leases on the head's buckets: replicas admitting locally never admit more, together,
than one bucket allows, and the leases follow the traffic.

Plain data: a ``Bucket`` (the ledger's side) and one ``Allowance`` per replica,
synced the way ``AccessClient.sync`` and ``LedgerServer.sync`` do it.
"""

from __future__ import annotations

import random

import pytest

from serve_app.access.limits import Allowance, Bucket, format_duration


class Service:
    """Replicas sharing one limit of ``capacity`` per minute (or concurrent slots)."""

    def __init__(self, replicas: int, capacity: float, refill_per_s: float):
        self.bucket = Bucket(capacity, refill_per_s)
        self.names = [f"r{i}" for i in range(replicas)]
        self.local = {r: Allowance(capacity, refill_per_s) for r in self.names}
        self.now = 0.0

    def sync(self, replica: str) -> None:
        used, demand, refused = self.local[replica].report()
        lease = self.bucket.settle(replica, used, demand, self.now, set(self.names),
                                   refused)
        self.local[replica].granted(lease, self.bucket.level)

    def sync_all(self) -> None:
        for r in self.names:
            self.sync(r)


def test_a_burst_over_two_replicas_gets_the_limit_not_twice_the_limit():
    svc = Service(2, capacity=30, refill_per_s=30 / 60)
    svc.sync_all()
    admitted = sum(svc.local[svc.names[i % 2]].try_take(1) for i in range(60))
    assert admitted == 30


def test_leases_follow_the_replica_that_sees_the_traffic():
    svc = Service(2, capacity=100, refill_per_s=0)
    svc.sync_all()
    busy = svc.local["r0"]
    first = sum(busy.try_take(1) for _ in range(100))
    assert first == 50  # an idle service splits the bucket evenly
    more = 0
    for _ in range(5):   # the busy replica keeps asking: its demand moves the lease to it
        svc.sync_all()
        more += sum(busy.try_take(1) for _ in range(20))
    assert first + more >= 90, (first, more)
    assert first + more <= 100


@pytest.mark.parametrize("replicas", [1, 2, 4])
def test_random_traffic_never_exceeds_capacity_plus_refill(replicas):
    rng = random.Random(replicas)
    capacity, rate = 60.0, 1.0
    svc = Service(replicas, capacity, rate)
    admitted, dt, steps = 0, 0.05, 4000
    for step in range(steps):
        svc.now = step * dt
        for _ in range(rng.randint(0, 3)):
            admitted += svc.local[rng.choice(svc.names)].try_take(1)
        if step % 5 == 0:  # every 0.25 s, replicas in a random order
            for r in rng.sample(svc.names, len(svc.names)):
                svc.sync(r)
    allowed = capacity + rate * steps * dt
    assert admitted <= allowed
    assert admitted >= 0.8 * allowed  # and the limit is not much stricter than it says


def test_concurrency_slots_come_back_when_requests_finish():
    svc = Service(2, capacity=4, refill_per_s=0)
    svc.sync_all()
    r0 = svc.local["r0"]
    assert [r0.try_take(1) for _ in range(3)] == [True, True, False]
    r0.give_back(1)
    r0.give_back(1)
    svc.sync_all()
    svc.sync_all()
    assert svc.bucket.level == 4  # both back; none lost


def test_tokens_admitted_on_the_estimate_are_charged_the_real_use():
    svc = Service(1, capacity=1000, refill_per_s=0)
    svc.sync_all()
    a = svc.local["r0"]
    assert a.try_take(600)
    a.give_back(600 - 150)   # the request used 150 tokens
    assert a.try_take(800)
    svc.sync_all()
    assert svc.bucket.level == pytest.approx(1000 - 150 - 800)


def test_a_lost_report_is_sent_again():
    svc = Service(1, capacity=10, refill_per_s=0)
    svc.sync_all()
    a = svc.local["r0"]
    assert sum(a.try_take(1) for _ in range(4)) == 4
    assert a.try_take(7) is False  # one refusal
    a.unreport(a.report())  # the ledger did not answer
    svc.sync_all()
    assert svc.bucket.level == 6
    assert svc.bucket.refused == 1
    assert sum(a.try_take(1) for _ in range(10)) == 6


def test_a_replica_that_stops_syncing_gives_its_lease_back():
    svc = Service(2, capacity=10, refill_per_s=0)
    svc.sync_all()
    svc.names = ["r0"]  # r1 is gone
    svc.sync("r0")
    assert sum(svc.local["r0"].try_take(1) for _ in range(20)) == 10


def test_retry_after_and_reset_headers():
    a = Allowance(capacity=60, refill_per_s=1)
    a.granted(lease=0, level=0)
    assert a.wait_s(5) == pytest.approx(5)
    assert a.reset_s() == pytest.approx(60)
    assert format_duration(60) == "1m0s" and format_duration(1.2) == "2s"
    assert format_duration(0.02) == "20ms"


def test_alternating_replicas_are_not_refused_while_the_bucket_has_room():
    """One client, requests one after another, spread over two replicas: the
    replica that did not get the last request must still admit the next one."""
    svc = Service(2, capacity=400, refill_per_s=0)
    svc.sync_all()
    used = 0
    for i in range(20):
        a = svc.local[svc.names[i % 2]]
        if not a.try_take(66):          # admitted on prompt + max_tokens
            break
        a.give_back(66 - 60)            # charged what it really used
        used += 60
        svc.sync_all()
    assert 400 - 2 * 66 <= used <= 400


def test_an_embeddings_request_is_admitted_on_its_inputs_alone():
    from serve_app.access.steps import estimate_tokens
    from serve_app.openai_protocol import EmbeddingRequest

    texts = EmbeddingRequest.model_validate({"model": "e", "input": ["a" * 40, "b" * 8]})
    assert estimate_tokens(texts, max_model_len=256) == 11 + 3  # nothing to generate
    ids = EmbeddingRequest.model_validate({"model": "e", "input": [[1, 2, 3], [4]]})
    assert estimate_tokens(ids, max_model_len=256) == 4
