"""Free ports for Ray nodes, Serve and engines that share one machine.

Several Ray nodes on one host collide unless every component has its own port
(FIELD-NOTES), and a stock Ray on the same host uses the well-known defaults
(6379, 8265, 10001, 8000, 10002-19999).  Single ports come from the kernel's
ephemeral range; port *ranges* (Ray worker ports, Serve's direct-ingress ports)
come from 20000-29999, which neither the kernel nor a stock Ray hands out.
"""

from __future__ import annotations

import random
import socket
import sys
from contextlib import ExitStack

from serve_app.processes import port_free

_RANGE_LO, _RANGE_HI = 20000, 30000


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """``n`` distinct ports free right now (held together so none repeats)."""
    with ExitStack() as stack:
        ports = []
        for _ in range(n):
            s = stack.enter_context(socket.socket())
            s.bind((host, 0))
            ports.append(s.getsockname()[1])
        return ports


def free_port(host: str = "127.0.0.1") -> int:
    return free_ports(1, host)[0]


def free_port_range(size: int, host: str = "127.0.0.1", attempts: int = 50) -> tuple[int, int]:
    """A block ``[lo, lo + size - 1]`` whose ports are all free right now."""
    rng = random.Random()
    for _ in range(attempts):
        lo = rng.randrange(_RANGE_LO, _RANGE_HI - size)
        if all(port_free(p, host) for p in range(lo, lo + size)):
            return lo, lo + size - 1
    raise RuntimeError(f"no free block of {size} ports in {_RANGE_LO}-{_RANGE_HI}")


if __name__ == "__main__":  # used by the worker job script: prints N free ports
    print(" ".join(map(str, free_ports(int(sys.argv[1]) if len(sys.argv) > 1 else 1))))
