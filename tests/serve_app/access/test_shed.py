"""Floods shed at HAProxy: the decision on plain data, and the map and rules on a
real HAProxy (the binary Ray Serve runs) answering real HTTP."""

from __future__ import annotations

import hashlib
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from cluster.haproxy_guard import write_shed_files
from cluster.ports import free_ports
from serve_app.access.limits import Bucket
from serve_app.access.shed import (
    MEMORY_S,
    REFUSED_TO_SHED,
    Shed,
    ShedMap,
    active,
    decide,
    frontend_rules,
)
from tests import haproxy_support
from tests.cluster.rotation_support import wait_until

KEYS = {hashlib.sha256(b"k-flood").hexdigest(): {"name": "flood", "revoked_at": None},
        hashlib.sha256(b"k-calm").hexdigest(): {"name": "calm", "revoked_at": None}}
FLOOD, CALM = KEYS


def empty_bucket(capacity: float, refused: float, now: float = 100.0) -> Bucket:
    """A requests bucket drained at ``now`` with ``refused`` recent refusals."""
    return Bucket(capacity, capacity / 60, level=0.0, updated=now, refused=refused)


def test_an_empty_bucket_whose_clients_keep_sending_is_shed_until_it_refills():
    buckets = {"key:flood|requests": empty_bucket(60, REFUSED_TO_SHED + 1),
               "key:calm|requests": empty_bucket(60, REFUSED_TO_SHED - 1)}  # backs off
    sheds = decide(KEYS, buckets, {}, now=100.0)
    assert set(sheds) == {FLOOD}
    shed = sheds[FLOOD]
    # a twentieth of 60 requests, refilled at 1 a second
    assert (shed.metric, shed.limit, shed.until) == ("requests", 60, pytest.approx(103.0))
    # HAProxy gets the deadline in Unix seconds (rounded up) and counts down itself
    assert shed.value(100.0, wall_now=1_800_000_000.5) == "requests:60:1800000004"
    # kept until its time, then no longer refused (the bucket has refilled meanwhile)
    assert decide(KEYS, buckets, sheds, now=102.9) == sheds
    assert active(decide(KEYS, buckets, sheds, now=103.1), 103.1) == {}


def test_a_flood_that_goes_on_is_shed_twice_as_long_each_time():
    sheds: dict = {}
    now, waits = 100.0, []
    for _ in range(7):  # the replicas see the key again, refuse it, report it
        buckets = {"key:flood|requests": empty_bucket(60, 50, now)}
        sheds = decide(KEYS, buckets, sheds, now)
        waits.append(round(sheds[FLOOD].until - now))
        now = sheds[FLOOD].until + 0.5
    assert waits == [3, 6, 12, 24, 48, 60, 60]
    # a key that stayed calm for MEMORY_S starts again from the shortest time
    now += MEMORY_S
    quiet = decide(KEYS, {}, sheds, now)
    assert quiet == {}
    buckets = {"key:flood|requests": empty_bucket(60, 50, now)}
    assert decide(KEYS, buckets, quiet, now)[FLOOD].strikes == 0


def test_refusals_are_forgotten_within_seconds_and_a_bucket_with_room_is_not_shed():
    flooded = {"key:flood|requests": empty_bucket(60, 20)}
    assert decide(KEYS, flooded, {}, now=100.0)
    assert decide(KEYS, flooded, {}, now=101.5) == {}      # refilled 1.5 requests
    slow = {"key:flood|requests": Bucket(6, 0.1, level=0.0, updated=100.0, refused=20)}
    assert decide(KEYS, slow, {}, now=100.0)
    assert decide(KEYS, slow, {}, now=103.0) == {}         # 20 refusals 3 s ago: ~1


def test_what_is_left_split_among_the_replicas_leases_counts_as_empty():
    """1.4 requests left and two replicas: each may hold 0.7 and refuse every request,
    so the key is shed; with one unit per replica left, it is not."""
    split = empty_bucket(60, 20)
    split.level, split.leases = 1.4, {"r1": 0.7, "r2": 0.7}
    assert set(decide(KEYS, {"key:flood|requests": split}, {}, now=100.0)) == {FLOOD}
    room = empty_bucket(60, 20)
    room.level, room.leases = 2.0, {"r1": 1.0, "r2": 1.0}
    assert decide(KEYS, {"key:flood|requests": room}, {}, now=100.0) == {}
    one = empty_bucket(60, 20)
    one.level, one.leases = 1.4, {"r1": 1.4}
    assert decide(KEYS, {"key:flood|requests": one}, {}, now=100.0) == {}


def test_tokens_are_shed_too_and_bounds_hold():
    buckets = {"key:flood|tokens": Bucket(100_000, 100_000 / 60, level=0.0, updated=100.0,
                                          refused=10)}
    (shed,) = decide(KEYS, buckets, {}, now=100.0).values()
    assert shed.metric == "tokens" and shed.until == pytest.approx(103.0)
    tiny = {"key:flood|requests": Bucket(1, 1 / 60, level=0.0, updated=100.0, refused=10)}
    (shed,) = decide(KEYS, tiny, {}, now=100.0).values()
    assert shed.until == pytest.approx(160.0)               # at most a minute
    concurrency = {"key:flood|concurrent": Bucket(2, 0.0, level=0.0, updated=100.0,
                                                  refused=50)}
    assert decide(KEYS, concurrency, {}, now=100.0) == {}   # frees up at any moment


def test_a_revoked_key_leaves_the_map():
    sheds = {FLOOD: Shed("flood", "requests", 200.0, 60)}
    revoked = {FLOOD: {"name": "flood", "revoked_at": 99.0}}
    assert decide(revoked, {}, sheds, now=100.0) == {}


# ---- a real HAProxy ---------------------------------------------------------------

HAPROXY_CONFIG = """global
    stats socket {dir}/run/admin.sock mode 600 level admin
""" + haproxy_support.HTTP_DEFAULTS + """frontend http_frontend
    bind 127.0.0.1:{port}
{rules}    http-request return status 200 content-type text/plain string "reached the replicas"
"""


@pytest.fixture
def haproxy(tmp_path: Path):
    (tmp_path / "run").mkdir()
    write_shed_files(tmp_path)
    port = free_ports(1)[0]
    config = tmp_path / "run" / "haproxy.cfg"
    config.write_text(HAPROXY_CONFIG.format(dir=tmp_path, port=port,
                                            rules=frontend_rules(tmp_path)))
    haproxy_support.check_config(config)

    def start() -> subprocess.Popen:
        return haproxy_support.start(config, port,
                                     also=(tmp_path / "run" / "admin.sock").exists)
    procs = [start()]
    yield port, lambda: procs.append(start()), procs
    for p in procs:
        if p.poll() is None:
            p.terminate()
            p.wait(10)


def call(port: int, key: str) -> httpx.Response:
    return httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=10,
                     headers={"Authorization": f"Bearer {key}"})


def test_a_shed_key_is_refused_by_haproxy_with_openai_headers_and_others_pass(haproxy,
                                                                               tmp_path):
    port, restart, procs = haproxy
    now = time.monotonic()
    ShedMap(tmp_path).apply({CALM: Shed("calm", "requests", now + 30, 60)}, now)
    assert call(port, "k-calm").status_code == 429
    shed_map = ShedMap(tmp_path)  # the ledger restarted: what the last one left goes
    shed_map.apply({FLOOD: Shed("flood", "requests", now + 30, 60)}, now)
    assert shed_map.error is None
    r = call(port, "k-flood")
    assert r.status_code == 429
    assert r.json()["error"]["type"] == "rate_limit_error"
    assert 29 <= int(r.headers["retry-after"]) <= 31
    assert r.headers["x-ratelimit-limit-requests"] == "60"
    assert r.headers["x-ratelimit-remaining-requests"] == "0"
    assert r.headers["x-ratelimit-reset-requests"] == r.headers["retry-after"] + "s"
    assert call(port, "k-calm").status_code == 200
    assert httpx.get(f"http://127.0.0.1:{port}/v1/models").status_code == 200  # no key
    # an entry nobody removes (its ledger gone) stops refusing at its deadline
    ShedMap(tmp_path).apply({CALM: Shed("calm", "tokens", time.monotonic() + 1.2, 9)},
                            time.monotonic())
    assert call(port, "k-calm").headers["x-ratelimit-limit-tokens"] == "9"
    wait_until(lambda: call(port, "k-calm").status_code == 200, 10, "the deadline to pass",
               poll_s=0.2)
    shed_map.applied = None  # (another ShedMap wrote the map meanwhile)
    shed_map.apply({FLOOD: Shed("flood", "requests", now + 30, 60)}, now)
    # a HAProxy that Serve restarts reads the map from its file
    procs[0].terminate()
    procs[0].wait(10)
    restart()
    assert call(port, "k-flood").status_code == 429
    # the time is up: the key reaches the replicas again
    shed_map.apply({}, now + 31)
    assert call(port, "k-flood").status_code == 200
    assert (tmp_path / "hpcserve-shed.map").read_text() == ""


def test_what_haproxy_refuses_is_an_error_and_everything_is_sent_again(haproxy, tmp_path):
    """A map HAProxy does not know (here: another directory's, reached through the
    same admin socket): the answer is kept as the error ``hpcserve status`` shows,
    and the next call starts again from an empty map."""
    other = tmp_path / "other"
    (other / "run").mkdir(parents=True)
    (other / "run" / "admin.sock").symlink_to(tmp_path / "run" / "admin.sock")
    shed_map = ShedMap(other)
    now = time.monotonic()
    shed_map.apply({FLOOD: Shed("flood", "requests", now + 30, 60)}, now)
    assert shed_map.error and "map" in shed_map.error.lower(), shed_map.error
    assert shed_map.applied is None
