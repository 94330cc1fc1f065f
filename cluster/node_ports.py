"""Ports for one Ray node sharing a host with other nodes (head or workers).

Used by the head and, through ``python -m cluster.node_ports IP``, by the worker
job script, which ``eval``s the output.  On a real cluster each worker owns its
node, but jobs that share a node (oversubscribed partitions, the local provider)
need distinct ports for every Ray component and Serve's HAProxy/direct ingress.
"""

from __future__ import annotations

import shlex
import sys

from cluster.ports import free_port_range, free_ports


def node_port_args(ip: str, metrics_port: int | None = None) -> tuple[list[str], dict[str, str]]:
    """(``ray start`` arguments, environment overrides) for a node at ``ip``.

    ``metrics_port``: a fixed Prometheus port for this node (the head's may be set
    in the config so a scraper can be pointed at it); default a free one.
    """
    p = free_ports(10)
    lo, hi = free_port_range(200)
    args = [f"--node-ip-address={ip}", f"--node-manager-port={p[0]}",
            f"--object-manager-port={p[1]}", f"--dashboard-agent-listen-port={p[2]}",
            f"--dashboard-agent-grpc-port={p[3]}", f"--runtime-env-agent-port={p[4]}",
            f"--metrics-export-port={metrics_port or p[5]}", f"--min-worker-port={lo}",
            f"--max-worker-port={lo + 149}"]
    env = {"RAY_SERVE_HAPROXY_METRICS_PORT": str(p[6]),
           "RAY_SERVE_HAPROXY_STATS_PORT": str(p[7]),
           # the Python proxy HAProxy falls back to when no ingress replica is up
           "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT": str(p[8]),
           "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT": str(p[9]),
           "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(lo + 150),
           "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(lo + 174),
           "RAY_SERVE_DIRECT_INGRESS_MIN_GRPC_PORT": str(lo + 175),
           "RAY_SERVE_DIRECT_INGRESS_MAX_GRPC_PORT": str(hi)}
    return args, env


if __name__ == "__main__":
    node_args, node_env = node_port_args(sys.argv[1])
    for key, value in node_env.items():
        print(f"export {key}={shlex.quote(value)}")
    print("NODE_ARGS=" + shlex.quote(" ".join(node_args)))
