"""Prometheus metrics of the control plane, next to Ray's: what the pools decide.

The control loop serves them on the head at ``HeadInfo.control_metrics_url``
(loopback; ``hpcserve up`` prints it).  One registry of our own, so a test or a
second pool in the same process never sees Ray's or another loop's series.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

REGISTRY = CollectorRegistry()
_BUCKETS = (1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800, 3600)

ALLOCATIONS = Gauge("hpcserve_pool_allocations", "Live allocations by phase",
                    ["pool", "phase"], registry=REGISTRY)
SUBMITS = Counter("hpcserve_pool_submits", "Jobs submitted, by reason (floor, demand, "
                  "rotation)", ["pool", "reason"], registry=REGISTRY)
DRAINS = Counter("hpcserve_pool_drains", "Allocations drained to give them back, by reason "
                 "(idle, successor, wall-time)", ["pool", "reason"], registry=REGISTRY)
FAILURES = Counter("hpcserve_pool_failures", "Jobs that failed, vanished or stuck in the "
                   "queue", ["pool"], registry=REGISTRY)
QUEUE_WAIT = Histogram("hpcserve_pool_queue_wait_seconds", "Submit to job running",
                       ["pool"], buckets=_BUCKETS, registry=REGISTRY)
STARTUP = Histogram("hpcserve_pool_startup_seconds", "Submit to Ray node joined",
                    ["pool"], buckets=_BUCKETS, registry=REGISTRY)
UNMET_DEMAND = Gauge("hpcserve_pool_unmet_demand_nodes", "Nodes that replicas waiting for "
                     "resources need", ["pool"], registry=REGISTRY)
NODE_SECONDS = Gauge("hpcserve_pool_node_seconds_24h", "Node-seconds used in the last 24 h",
                     ["pool"], registry=REGISTRY)
BUDGET_LEFT = Gauge("hpcserve_pool_budget_node_hours_left", "max_node_hours_per_day not "
                    "used or committed", ["pool"], registry=REGISTRY)
TICKS = Counter("hpcserve_control_ticks", "Control loop passes", registry=REGISTRY)


def reason_kind(reason: str) -> str:
    """The first word of a plan's reason: ``demand: ...`` -> ``demand``."""
    return reason.split(":", 1)[0].split(" ", 1)[0] or "other"


def serve(port: int, host: str = "127.0.0.1") -> None:
    start_http_server(port, addr=host, registry=REGISTRY)
