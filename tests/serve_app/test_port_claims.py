"""Host-wide port claims: what one hpcserve process hands out, another skips."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from serve_app import port_claims, processes
from serve_app.processes import free_ports

POOL = range(31200, 31210)


@pytest.fixture(autouse=True)
def claims(tmp_path, monkeypatch):
    monkeypatch.setattr(port_claims, "_DIR", str(tmp_path / "ports"))
    monkeypatch.setattr(port_claims, "_checked", {})
    monkeypatch.setattr(port_claims, "_local", {})
    # every port of the pool counts as free: only the claims decide, whatever the
    # suite beside this test has bound
    monkeypatch.setattr(processes, "port_free", lambda port, host="127.0.0.1": True)
    monkeypatch.setattr(processes, "_LISTENER_POOLS", (POOL,))
    return tmp_path / "ports"


def test_a_port_another_process_chose_is_not_chosen_until_its_claim_ends(claims):
    """The race behind a failed ``hpcserve up``: the test put a chosen HTTP port in
    the config, ``up`` chose the head's ports in its own process and took it."""
    child = subprocess.run(
        [sys.executable, "-c",
         "import sys; from serve_app import port_claims as c, processes as p; "
         "c._DIR = sys.argv[1]; p.port_free = lambda *a, **k: True; "
         "p._LISTENER_POOLS = (range(31200, 31210),); print(*p.free_ports(6))",
         str(claims)], capture_output=True, text=True, check=True)
    theirs = set(map(int, child.stdout.split()))
    assert len(theirs) == 6 and theirs <= set(POOL)
    ours = free_ports(4)  # 50 draws per port from 10: every port is tried
    assert set(ours) == set(POOL) - theirs
    given_back = min(theirs)
    assert not port_claims.claim(given_back)
    port_claims.release(given_back)
    assert port_claims.claim(given_back)


def test_a_claim_ends_when_its_hold_does_and_a_bogus_one_is_ignored(claims):
    assert port_claims.claim(31201, hold_s=0.2)
    assert not port_claims.claim(31201)
    time.sleep(0.3)
    assert port_claims.claim(31201)  # expired: claimed again
    # a time far beyond any hold (a clock jump, a hand-made file) does not block
    port_claims.claim(31202)
    far = time.time() + 10 * port_claims.MAX_HOLD_S
    os.utime(claims / "31202", (far, far))
    assert port_claims.claim(31202)


def test_a_directory_open_to_others_is_not_trusted(claims, caplog):
    claims.mkdir(mode=0o700)
    os.chmod(claims, 0o777)
    assert port_claims.claim(31203)
    assert not port_claims.claim(31203)  # still claimed, in this process
    assert not (claims / "31203").exists()
    assert "not a private directory" in caplog.text
