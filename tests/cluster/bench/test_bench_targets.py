"""cluster.bench.targets: the per-step verdict, and the CPU table over sweeps, on plain
files as bench-compare writes them."""

from __future__ import annotations

from pathlib import Path

from cluster.bench.targets import cpu_per_request, cpu_table, misses, ratio_table

SUMMARY = """| step | E2E P90 ratio | TTFT P90 ms (bare → hpcserve, diff) | out tok/s ratio | x |
| c=1 | 0.940 | 65 → 66 (+1) | 0.998 | 196 / 195 | 0 / 0 | met |

| process | CPU s | CPU ms per request |
| --- | ---: | ---: |
| bare: api_server (HTTP, detokenize) | 21.6 | {api} |
| **bare total** (1303 requests) | 163.3 | 125.3 |
| hpcserve: HAProxy | 1.6 | {haproxy} |
"""


def test_misses_names_each_target_at_its_bound():
    assert misses(1.03, 10.0, 0.97) == "met"
    assert misses(1.031, 10.1, 0.969, failed=2) == "missed: E2E, TTFT, tok/s, errors"
    assert misses(None, None, None) == "missed: E2E, TTFT, tok/s"


def test_ratio_table_gives_each_step_its_verdict():
    def step(label, e2e, ttft, thr, failed=0):
        side = {"ttft_ms": {"p90": 50.0}, "output_tokens_per_s": 100.0, "failed": 0}
        return {"label": label, "ratio": {"e2e_ms.p90": e2e, "output_tokens_per_s": thr},
                "results": {"bare": side, "service": {**side, "failed": failed,
                                                      "ttft_ms": {"p90": 50.0 + ttft}}}}
    lines, met = ratio_table({"steps": [step("c=1", 0.99, 2, 1.0)]})
    assert met and lines[2].endswith("| 0 / 0 | met |")
    lines, met = ratio_table({"steps": [step("c=1", 0.99, 2, 1.0), step("c=16", 1.1, 11, 1.0, 1)]})
    assert not met and lines[3].endswith("| 1 / 0 | missed: E2E, TTFT, errors |")


def test_cpu_rows_of_each_summary_side_by_side_with_their_median(tmp_path: Path):
    runs = []
    for name, api, haproxy in (("a", 16.6, 1.1), ("b", 15.0, 0.9), ("c", 17.0, None)):
        run = tmp_path / name
        run.mkdir()
        text = SUMMARY.format(api=api, haproxy=haproxy)
        (run / "summary.md").write_text("\n".join(
            line for line in text.splitlines() if "None" not in line))
        runs.append(run)
    assert cpu_per_request(runs[0] / "summary.md") == {
        "bare: api_server": 16.6, "bare total": 125.3, "hpcserve: HAProxy": 1.1}
    lines = cpu_table(runs)
    assert lines[0] == "| process | a | b | c | median |"
    rows = {line.split(" | ")[0].strip("| "): line for line in lines[2:]}
    assert rows["bare: api_server"] == "| bare: api_server | 16.6 | 15.0 | 17.0 | 16.6 |"
    assert rows["hpcserve: HAProxy"] == "| hpcserve: HAProxy | 1.1 | 0.9 | – | 1.0 |"
