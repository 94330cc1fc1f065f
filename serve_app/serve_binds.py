"""Serve's per-replica gRPC server binds the replica's node address, not every interface.

Every Serve 2.60 replica starts an inter-deployment gRPC server (handle calls,
Serve's proxy -> replica with ``RAY_SERVE_USE_GRPC_BY_DEFAULT``) on ``[::]:0``: all
interfaces, no authentication, and it runs the replica's methods -- the engine
itself -- for anyone who can reach the port.  Every caller connects to it at the
replica's *node address* (``RunningReplicaInfo.node_ip``), so binding exactly that
address loses nothing: on a login node with a loopback node address (the local
default) the port is loopback-only; on a compute node it is the cluster network's
address instead of every interface.

Serve has no option for this, so the name ``replica.add_port_to_grpc_server`` is
wrapped when a replica process imports hpcserve's deployment code, which happens
before the replica starts that server (``ReplicaBase._on_initialized``).  Pinned to
Ray 2.60 (pyproject); ``tests/serve_app/test_safe_binds.py`` checks the result on
the sockets of a running stack.
"""

from __future__ import annotations

import sys

_WILDCARD = "[::]:"


def bind_replica_grpc_to_node_ip() -> None:
    replica = sys.modules.get("ray.serve._private.replica")
    if replica is None or getattr(replica.add_port_to_grpc_server, "_hpcserve", False):
        return
    import ray

    original = replica.add_port_to_grpc_server
    node_ip = ray.util.get_node_ip_address()

    def add_port(server, address: str):
        if address.startswith(_WILDCARD):
            address = f"{node_ip}:{address[len(_WILDCARD):]}"
        return original(server, address)

    add_port._hpcserve = True
    replica.add_port_to_grpc_server = add_port
