"""The failover relay's counters (``cluster.relay_metrics``), in this process."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from cluster import relay_metrics


@pytest.fixture(autouse=True)
def fresh_labels(monkeypatch):
    monkeypatch.setattr(relay_metrics, "_by_route", {})


def _requests_by_model() -> dict[str, float]:
    body = relay_metrics.response().split(b"\r\n\r\n", 1)[1].decode()
    return {s.labels["model"]: s.value for f in text_string_to_metric_families(body)
            for s in f.samples if s.name == "hpcserve_relay_requests_total"}


def test_a_known_route_is_labelled_by_its_models_name_and_others_by_one_label():
    known = {b"/_m/org_2fModel-7B/": [], b"/_m/tiny/": []}  # the routes HAProxy's config has
    before = _requests_by_model()
    stats = relay_metrics.stats_for(b"/_m/org_2fModel-7B/v1/chat/completions", lambda: known)
    assert relay_metrics.stats_for(b"/_m/org_2fModel-7B/v1/completions", lambda: known) is stats
    stats.requests.inc()
    # a local user posting to made-up routes cannot grow the labels without bound
    for i in range(300):
        relay_metrics.stats_for(b"/_m/made-up-%d/v1/completions" % i, lambda: known).requests.inc()
    relay_metrics.stats_for(b"/elsewhere", lambda: known).requests.inc()
    after = _requests_by_model()
    assert after["org/Model-7B"] - before.get("org/Model-7B", 0) == 1
    assert after["(other)"] - before.get("(other)", 0) == 301
    assert not any(model.startswith("made-up") for model in after)
    # a model that appears in the config later gets its own label from then on
    known[b"/_m/made-up-7/"] = []
    assert relay_metrics.stats_for(b"/_m/made-up-7/v1/completions", lambda: known) is not \
        relay_metrics.stats_for(b"/_m/made-up-8/v1/completions", lambda: known)


def test_the_metrics_are_a_whole_http_response():
    raw = relay_metrics.response()
    head, body = raw.split(b"\r\n\r\n", 1)
    status, *headers = head.split(b"\r\n")
    fields = dict(line.split(b": ", 1) for line in headers)
    assert status == b"HTTP/1.1 200 OK" and int(fields[b"content-length"]) == len(body)
    assert fields[b"content-type"].startswith(b"text/plain")
    assert b"# TYPE hpcserve_relay_resumed_streams_total counter" in body
