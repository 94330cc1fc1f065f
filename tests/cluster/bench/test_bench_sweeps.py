"""cluster.bench.sweeps: several bench-compare sweeps in aggregate, on plain files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cluster.bench.sweeps import cpu_per_request, load, main, misses, table


def _sweep(root: Path, name: str, steps: dict[str, dict[str, tuple]]) -> Path:
    """A sweep directory as bench-compare writes it.  ``steps``: label -> side ->
    (e2e seconds of each request, ttft seconds, output tokens per request, wall s,
    failed)."""
    d = root / name
    d.mkdir()
    report, requests = {"steps": []}, []
    for label, sides in steps.items():
        results = {}
        for side, (e2e, ttft, tokens, wall, failed) in sides.items():
            results[side] = {
                "failed": failed, "output_tokens": tokens * len(e2e), "wall_s": wall,
                "ttft_ms": {"p90": 1000 * sorted(ttft)[int(0.9 * (len(ttft) - 1))]},
                "e2e_ms": {"p90": 1000 * sorted(e2e)[int(0.9 * (len(e2e) - 1))]},
                "output_tokens_per_s": tokens * len(e2e) / wall}
            requests += [{"target": side, "step": label, "ok": True, "e2e_s": e, "ttft_s": t}
                         for e, t in zip(e2e, ttft)]
            requests += [{"target": side, "step": label, "ok": False, "e2e_s": None,
                          "ttft_s": None}] * failed
        s, b = results["service"], results["bare"]
        report["steps"].append({"label": label, "results": results, "ratio": {
            "e2e_ms.p90": s["e2e_ms"]["p90"] / b["e2e_ms"]["p90"],
            "output_tokens_per_s": s["output_tokens_per_s"] / b["output_tokens_per_s"]}})
    (d / "bench.json").write_text(json.dumps(report))
    (d / "requests.jsonl").write_text("".join(json.dumps(r) + "\n" for r in requests))
    return d


def test_median_pooled_and_each_run_are_three_different_views(tmp_path):
    same = ([1.0] * 10, [0.10] * 10, 64, 10.0, 0)
    # run a: the service is 20 % slower at E2E P90 and 20 ms later at TTFT; run b, c: faster
    a = _sweep(tmp_path, "a", {"c=1": {"service": ([1.2] * 10, [0.12] * 10, 64, 10.0, 0),
                                       "bare": same}})
    b = _sweep(tmp_path, "b", {"c=1": {"service": ([0.9] * 10, [0.09] * 10, 64, 10.0, 0),
                                       "bare": same}})
    c = _sweep(tmp_path, "c", {"c=1": {"service": ([0.95] * 10, [0.10] * 10, 64, 9.0, 0),
                                       "bare": same},
                               "qps=4": {"service": ([1.0] * 10, [0.1] * 10, 64, 10.0, 1),
                                         "bare": same}})
    steps = load([a, b, c])
    assert [s.label for s in steps] == ["c=1", "qps=4"]
    c1, qps = steps
    e2e, ttft, thr = c1.median()
    assert e2e == pytest.approx(0.95) and ttft == pytest.approx(0) and thr == pytest.approx(1.0)
    e2e, ttft, thr = c1.pooled()  # the P90 of 30 requests each side: run a's 1.2 s is in it
    assert e2e == pytest.approx(1.2) and ttft == pytest.approx(20) \
        and thr == pytest.approx(30 / 29)
    assert c1.runs_meeting() == (2, 2, 3)
    lines, met = table(steps)
    assert not met  # the pooled E2E of c=1 and qps=4's failed request
    row = {line.split(" | ")[0].strip("| "): line for line in lines[2:]}
    assert row["c=1"].endswith("| met; missed: E2E, TTFT |")
    assert row["qps=4"].endswith("| 1 / 0 | missed: errors; missed: errors |")
    assert len(qps.runs) == 1


def test_misses_names_each_target():
    assert misses(1.03, 10.0, 0.97) == "met"
    assert misses(1.031, 10.1, 0.969, failed=2) == "missed: E2E, TTFT, tok/s, errors"
    assert misses(None, None, None) == "missed: E2E, TTFT, tok/s"


def test_cpu_rows_of_a_summary_and_the_command_line(tmp_path, capsys):
    d = _sweep(tmp_path, "s", {"c=1": {side: ([1.0] * 10, [0.1] * 10, 64, 10.0, 0)
                                       for side in ("service", "bare")}})
    (d / "summary.md").write_text(
        "| process | CPU s | CPU ms per request |\n| --- | ---: | ---: |\n"
        "| bare: api_server (HTTP, detokenize) | 21.6 | 16.6 |\n"
        "| **bare total** (1303 requests) | 163.3 | 125.3 |\n"
        "| hpcserve: HAProxy | 1.6 | 1.1 |\n"
        "| c=1 | 0.940 | 65 → 66 (+1) | 0.998 |\n")
    assert cpu_per_request(d / "summary.md") == {
        "bare: api_server": 16.6, "bare total": 125.3, "hpcserve: HAProxy": 1.1}
    assert main([str(d), "--cpu"]) == 0
    out = capsys.readouterr().out
    assert "| c=1 | 1 | ×1.000 / +0 ms / 1.000 |" in out and "all met" in out
    assert "| hpcserve: HAProxy | 1.1 |" in out
