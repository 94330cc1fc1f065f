"""Free ports for Ray nodes, Serve and engines that share one machine.

Several Ray nodes on one host collide unless every component has its own port,
and a stock Ray on the same host uses the well-known defaults (6379, 8265, 10001,
8000, 10002-19999).  Single ports come from outside the kernel's ephemeral range
(``serve_app.processes.free_ports``: a port chosen now and bound at the first
deploy must not be taken meanwhile by an outgoing connection); port *ranges* (Ray
worker ports, Serve's direct-ingress ports) come from 20000-29999, which neither
the kernel nor a stock Ray hands out.
"""

from __future__ import annotations

import random
import sys

from serve_app import port_claims
from serve_app.processes import free_port, free_ports, port_free

__all__ = ["free_port", "free_port_range", "free_ports"]

_RANGE_LO, _RANGE_HI = 20000, 30000
BLOCK_HOLD_S = 120.0


def free_port_range(size: int, host: str = "127.0.0.1", attempts: int = 50) -> tuple[int, int]:
    """A block ``[lo, lo + size - 1]`` whose ports are all free right now and not
    handed out to another hpcserve process on this host (``port_claims``).

    The claim holds BLOCK_HOLD_S, for nodes starting at the same time: a node binds
    its worker ports one by one as workers start, so it cannot hold its block by
    binding it, and a claim for its lifetime would run the range out where many
    short-lived nodes start on one host (tests)."""
    rng = random.Random()
    for _ in range(attempts):
        lo = rng.randrange(_RANGE_LO, _RANGE_HI - size)
        block = range(lo, lo + size)
        if not all(port_free(p, host) for p in block):
            continue
        claimed = []
        for p in block:
            if not port_claims.claim(p, BLOCK_HOLD_S):
                break
            claimed.append(p)
        if len(claimed) == size:
            return lo, lo + size - 1
        for p in claimed:
            port_claims.release(p)
    raise RuntimeError(f"no free block of {size} ports in {_RANGE_LO}-{_RANGE_HI}")


if __name__ == "__main__":  # used by the worker job script: prints N free ports
    print(" ".join(map(str, free_ports(int(sys.argv[1]) if len(sys.argv) > 1 else 1))))
