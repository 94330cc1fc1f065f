"""What the failover relay did, per model, as Prometheus counters on its own port.

The relay reaches a failover model's replicas itself, so HAProxy counts those
requests at its frontend only, not in the model's backend; and whether streams are
being resumed (replicas dying under load) is what an operator of the relay wants to
see.  ``GET /metrics`` on the relay's port (loopback, ``HPCSERVE_RELAY_PORT``)
answers them; no thread and no second port, it is one more request to the relay.
"""

from __future__ import annotations

from collections.abc import Callable, Container

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest

from cluster.relay_stream import response_head
from serve_app.layout import ROUTE_PREFIX, model_name

PATH = b"/metrics"
REGISTRY = CollectorRegistry()
REQUESTS = Counter("hpcserve_relay_requests", "Requests the failover relay took, by model",
                   ["model"], registry=REGISTRY)
RESUMED = Counter("hpcserve_relay_resumed_streams", "Times a stream cut mid-stream (its "
                  "replica or engine lost) went on from another replica; a stream cut twice "
                  "counts twice", ["model"], registry=REGISTRY)
LOST = Counter("hpcserve_relay_lost", "Requests the relay could not answer whole: neither a "
               "replica nor HAProxy answered, a whole answer was cut, or a cut stream could "
               "not go on (the client got an error)", ["model"], registry=REGISTRY)
PASSED_OVER = Counter("hpcserve_relay_replicas_passed_over", "Replicas that refused, timed "
                      "out or closed before answering, another tried", ["model"],
                      registry=REGISTRY)
_PREFIX = ROUTE_PREFIX.encode()


class ModelStats:
    """One model's counters (labelled once, not per request)."""

    def __init__(self, model: str):
        self.requests, self.resumed = REQUESTS.labels(model), RESUMED.labels(model)
        self.lost, self.passed_over = LOST.labels(model), PASSED_OVER.labels(model)


_by_route: dict[bytes, ModelStats] = {}


def stats_for(url: bytes, known: Callable[[], Container[bytes]]) -> ModelStats:
    """The counters of the model whose route ``url`` is at (``/_m/<model>/...``), if
    that route is one of the ``known()`` prefixes (HAProxy's config has it; asked only
    for a route not seen yet, so a request pays one dict lookup); of
    ``(other)`` if not: the relay's port is open to local users, and labels made
    from whatever they send would grow without bound."""
    route = url[len(_PREFIX):].split(b"/", 1)[0] if url.startswith(_PREFIX) else b""
    stats = _by_route.get(route)
    if stats is None:
        if route and _PREFIX + route + b"/" in known():
            stats = _by_route[route] = ModelStats(model_name(route.decode(errors="replace")))
        else:
            stats = _by_route.get(b"") or _by_route.setdefault(b"", ModelStats("(other)"))
    return stats


def response() -> bytes:
    body = generate_latest(REGISTRY)
    return response_head(200, [(b"content-type", CONTENT_TYPE_LATEST.encode())], False,
                         len(body)) + body
