"""The failover relay's counters (``cluster.relay_metrics``), in this process."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from cluster import relay_metrics


def _models() -> set[str]:
    body = relay_metrics.response().split(b"\r\n\r\n", 1)[1].decode()
    return {s.labels["model"] for f in text_string_to_metric_families(body) for s in f.samples
            if s.name == "hpcserve_relay_requests_total"}


def test_each_model_is_labelled_by_its_name_and_the_labels_are_bounded():
    relay_metrics.stats_for(b"/_m/org_2fModel-7B/v1/chat/completions").requests.inc()
    assert relay_metrics.stats_for(b"/_m/org_2fModel-7B/v1/completions") is \
        relay_metrics.stats_for(b"/_m/org_2fModel-7B/v1/chat/completions")
    assert "org/Model-7B" in _models()
    # a local user posting to made-up routes cannot grow the labels without bound
    for i in range(relay_metrics.MAX_MODELS + 50):
        relay_metrics.stats_for(b"/_m/made-up-%d/v1/completions" % i).requests.inc()
    models = _models()
    assert len(models) <= relay_metrics.MAX_MODELS and "(other)" in models
    assert "org/Model-7B" in models  # the models seen first keep their own


def test_the_metrics_are_a_whole_http_response():
    raw = relay_metrics.response()
    head, body = raw.split(b"\r\n\r\n", 1)
    status, *headers = head.split(b"\r\n")
    fields = dict(line.split(b": ", 1) for line in headers)
    assert status == b"HTTP/1.1 200 OK" and int(fields[b"content-length"]) == len(body)
    assert fields[b"content-type"].startswith(b"text/plain")
    assert b"# TYPE hpcserve_relay_resumed_streams_total counter" in body
