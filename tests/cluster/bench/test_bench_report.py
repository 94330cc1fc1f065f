"""Percentiles, failure accounting and ratios: the numbers people will quote."""

from __future__ import annotations

import numpy as np
import pytest

from cluster.bench.client import RequestResult
from cluster.bench.report import markdown, percentiles, ratio_metrics, summarize


def test_percentiles_match_numpy_and_hand_values() -> None:
    data = np.random.default_rng(1).lognormal(size=1001)
    got = percentiles(data.tolist())
    for p in (50, 90, 99):
        assert got[f"p{p}"] == pytest.approx(np.percentile(data, p))
    assert got["mean"] == pytest.approx(data.mean())
    # Linear interpolation on 1..100, the definition vllm bench serve uses.
    hand = percentiles(list(range(1, 101)))
    assert (hand["p50"], hand["p90"], hand["p99"]) == pytest.approx((50.5, 90.1, 99.01))
    assert percentiles([]) == {"p50": None, "p90": None, "p99": None, "mean": None}


def _ok(i: int, ttft: float, e2e: float, tokens: int) -> RequestResult:
    return RequestResult(index=i, start_s=0.0, ok=True, ttft_s=ttft, e2e_s=e2e, output_tokens=tokens,
                         itl_s=[0.01] * (tokens - 1), tokens_from="usage")


def test_summary_counts_failures_and_excludes_them_from_latency() -> None:
    results = [_ok(i, 0.1 * (i + 1), 1.0 + i, 10) for i in range(4)]
    results += [
        RequestResult(index=10, start_s=0, error="http 500", e2e_s=0.001),
        RequestResult(index=11, start_s=0, error="http 500", e2e_s=0.001),
        RequestResult(index=12, start_s=0, error="broken stream", ttft_s=0.0001, e2e_s=50.0),
    ]
    s = summarize(results, wall_s=2.0, offered=7)
    assert (s["requests"], s["ok"], s["failed"]) == (7, 4, 3)
    assert s["failures"] == {"broken stream": 1, "http 500": 2}
    assert s["output_tokens"] == 40 and s["output_tokens_per_s"] == pytest.approx(20.0)
    assert s["requests_per_s"] == pytest.approx(2.0)
    assert s["ttft_ms"]["p50"] == pytest.approx(250.0)  # median of 100,200,300,400: failures left out
    assert s["e2e_ms"]["p99"] < 4001
    assert s["itl_ms"]["p50"] == pytest.approx(10.0)


def _summary(ttft: float, e2e: float, tps: float) -> dict:
    pct = lambda v: {"p50": v, "p90": 2 * v, "p99": 3 * v, "mean": v}  # noqa: E731
    return {"ttft_ms": pct(ttft), "itl_ms": pct(1.0), "e2e_ms": pct(e2e), "output_tokens_per_s": tps, "requests_per_s": 0.0}


def test_ratio_is_numerator_over_denominator() -> None:
    r = ratio_metrics(_summary(30.0, 1100.0, 900.0), _summary(10.0, 1000.0, 1000.0))
    assert r["ttft_ms.p50"] == pytest.approx(3.0) and r["ttft_ms.p99"] == pytest.approx(3.0)
    assert r["e2e_ms.p90"] == pytest.approx(1.1)
    assert r["output_tokens_per_s"] == pytest.approx(0.9)
    assert r["requests_per_s"] is None  # 0 / 0 is no ratio, not a crash


def test_markdown_has_results_failures_and_ratios() -> None:
    a = summarize([_ok(0, 0.02, 0.5, 8), RequestResult(index=1, start_s=0, error="timeout")], 1.0, 2)
    b = summarize([_ok(0, 0.01, 0.4, 8)], 1.0, 1)
    report = {
        "meta": {"mode": "chat", "prompt_tokens": 128, "output_tokens": 8, "ignore_eos": True, "duration_s": None,
                 "requests": 2, "rounds": 2, "seed": 0, "host": "h"},
        "targets": [{"name": "service", "url": "u1", "model": "m"}, {"name": "bare", "url": "u2", "model": "m"}],
        "steps": [{"kind": "concurrency", "value": 4.0, "label": "c=4", "results": {"service": a, "bare": b},
                   "ratio": {"numerator": "service", "denominator": "bare", **ratio_metrics(a, b)}}],
    }
    md = markdown(report)
    assert "| service | c=4 | 1 | 1 | 1.00 | 8.0 | 20.0 / 20.0 / 20.0 |" in md
    assert "- service c=4: timeout ×1" in md
    assert "Ratios service / bare" in md
    assert "| c=4 | 2.00 | 2.00 | 2.00 |" in md
