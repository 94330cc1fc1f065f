"""Ports chosen now and bound later must survive the machine's outgoing connections."""

import socket

import pytest

from cluster.ports import free_port_range, free_ports
from serve_app import port_claims, processes
from serve_app.processes import _ephemeral_range


@pytest.fixture(autouse=True)
def claims(tmp_path, monkeypatch):
    """Claims of this test only (the ports themselves are the host's)."""
    monkeypatch.setattr(port_claims, "_DIR", str(tmp_path / "ports"))
    monkeypatch.setattr(port_claims, "_checked", {})
    monkeypatch.setattr(port_claims, "_local", {})


def test_single_ports_are_distinct_free_and_outside_the_ephemeral_range():
    ephemeral = _ephemeral_range()
    if all(p in ephemeral for r in processes._LISTENER_POOLS for p in r):
        pytest.skip(f"this kernel's ephemeral range {ephemeral} covers the pools")
    ports = free_ports(40)
    assert len(set(ports)) == 40
    assert not [p for p in ports if p in ephemeral]
    for p in ports:  # each can be bound now
        with socket.socket() as s:
            s.bind(("127.0.0.1", p))


def test_a_port_handed_out_is_not_handed_out_again_before_it_is_bound():
    first = set(free_ports(200))
    second = set(free_ports(200))
    assert not first & second


def test_a_bound_port_is_never_chosen(monkeypatch):
    pool = range(31100, 31120)
    monkeypatch.setattr(processes, "_LISTENER_POOLS", (pool,))
    taken = next(p for p in pool if processes.port_free(p))
    with socket.socket() as held:
        held.bind(("127.0.0.1", taken))
        chosen = free_ports(10)  # 50 draws per port from 20: every port is tried
    assert taken not in chosen and len(set(chosen)) == 10


def test_a_port_range_lies_below_the_single_ports_and_is_free():
    lo, hi = free_port_range(50)
    assert hi - lo == 49 and 20000 <= lo and hi < 30000


def test_port_ranges_of_two_nodes_on_one_host_do_not_overlap():
    blocks = [free_port_range(200) for _ in range(20)]
    taken = [p for lo, hi in blocks for p in range(lo, hi + 1)]
    assert len(taken) == len(set(taken)) == 20 * 200
