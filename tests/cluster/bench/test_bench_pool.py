"""scripts/bench-pool: pooled percentiles over runs, and each run's own ratio with the median.

The runs are written here the way `hpcserve bench` writes them (`bench.json` with
`summarize`d results and `ratio_metrics`, `requests.jsonl` with one record per
request), from latencies drawn for a fast host and a slow one.
"""

from __future__ import annotations

import json
import runpy
import types
from pathlib import Path

import numpy as np
import pytest

from cluster.bench import targets
from cluster.bench.client import RequestResult
from cluster.bench.report import ratio_metrics, summarize

REPO = Path(__file__).resolve().parents[3]


def _load_bench_pool() -> types.SimpleNamespace:
    return types.SimpleNamespace(**runpy.run_path(str(REPO / "scripts" / "bench-pool")))


def _write_run(run: Path, e2e: dict[str, list[float]], wall_s: float = 10.0) -> None:
    """One step `c=4`: e2e latencies (s) per target, TTFT a tenth of each, 8 tokens each."""
    run.mkdir()
    results = {}
    with open(run / "requests.jsonl", "w") as f:
        for target, values in e2e.items():
            done = [RequestResult(index=i, start_s=0.0, ok=True, ttft_s=v / 10, e2e_s=v,
                                  output_tokens=8, tokens_from="usage") for i, v in enumerate(values)]
            for r in done:
                f.write(json.dumps({"target": target, "step": "c=4", "round": 0, **r.as_record()}) + "\n")
            results[target] = summarize(done, wall_s, offered=len(done))
    step = {"label": "c=4", "results": results,
            "ratio": ratio_metrics(results["service"], results["bare"])}
    (run / "bench.json").write_text(json.dumps({"steps": [step]}))


@pytest.fixture
def runs(tmp_path: Path) -> tuple[list[Path], dict[str, list[float]]]:
    rng = np.random.default_rng(7)
    fast = {"service": rng.uniform(0.9, 1.1, 200).tolist(), "bare": rng.uniform(1.0, 1.2, 200).tolist()}
    slow = {t: [2 * v for v in vs] for t, vs in fast.items()}   # same ratio, host twice as slow
    odd = {"service": rng.uniform(1.2, 1.4, 100).tolist(), "bare": rng.uniform(1.0, 1.2, 100).tolist()}
    paths = [tmp_path / "fast", tmp_path / "slow", tmp_path / "odd"]
    for path, e2e in zip(paths, (fast, slow, odd)):
        _write_run(path, e2e)
    pooled = {t: fast[t] + slow[t] + odd[t] for t in fast}
    return paths, pooled


def test_pooled_percentiles_are_over_every_runs_requests(runs) -> None:
    paths, pooled = runs
    report, n_runs = _load_bench_pool().pooled_report(paths)
    (step,) = report["steps"]
    assert n_runs == {"c=4": 3}
    for target in ("service", "bare"):
        got = step["results"][target]
        assert got["e2e_ms"]["p90"] == pytest.approx(np.percentile(pooled[target], 90) * 1000)
        # all tokens over all wall time: 3 runs of 10 s
        assert got["output_tokens_per_s"] == pytest.approx(8 * len(pooled[target]) / 30.0)
    assert step["ratio"]["e2e_ms.p90"] == pytest.approx(
        np.percentile(pooled["service"], 90) / np.percentile(pooled["bare"], 90))


def test_per_run_table_gives_each_runs_ratio_and_their_median(runs) -> None:
    paths, _ = runs
    pool = _load_bench_pool()
    lines = pool.per_run_table(paths, targets)
    assert len(lines) == 3 and lines[2].startswith("| c=4 | 3 |")
    cells = [c.strip() for c in lines[2].split("|")[1:-1]]
    each = [float(part.split(" / ")[0]) for part in cells[6].split("; ")]
    ratios = [json.loads((p / "bench.json").read_text())["steps"][0]["ratio"]["e2e_ms.p90"] for p in paths]
    assert each == pytest.approx(ratios, abs=5e-4)
    # the fast and the slow run have the same ratio: the median is theirs, not the odd run's
    assert ratios[0] == pytest.approx(ratios[1]) and ratios[2] > 1.1
    assert float(cells[2]) == pytest.approx(ratios[0], abs=5e-4)
    # the medians are the fast/slow runs': E2E P90 ~0.92, TTFT P90 ~10 ms better, equal
    # tokens per second, so they meet every target although the odd run does not
    assert cells[5] == "met"


def test_paired_table_compares_each_request_with_its_twin(tmp_path: Path) -> None:
    """Service request i took 1.05x as long as bare request i (TTFT and decode alike):
    the paired medians say so, although the two sides' latencies overlap widely."""
    bare = np.random.default_rng(3).uniform(0.5, 2.0, 101).tolist()
    _write_run(tmp_path / "run", {"service": [1.05 * v for v in bare], "bare": bare})
    pool = _load_bench_pool()
    lines = pool.paired_table([tmp_path / "run"], targets)
    assert len(lines) == 3
    cells = [c.strip() for c in lines[2].split("|")[1:-1]]
    assert cells[:4] == ["c=4", "101", "1.050", "1.050"]
    # TTFT is a tenth of E2E: the twin's is 0.005 * its E2E shorter
    assert float(cells[4]) == pytest.approx(5 * np.median(bare), abs=0.05)


def test_paired_table_pairs_within_a_round_and_skips_failures(tmp_path: Path) -> None:
    """Twins share step, round and index; a pair with a failed side or no twin is out."""
    run = tmp_path / "run"
    run.mkdir()
    records = []
    for rnd, (service, bare) in enumerate([(2.0, 1.0), (3.0, 3.0)]):  # ratios 2.0, 1.0
        for target, e2e in (("service", service), ("bare", bare)):
            for i in range(3):
                records.append({"target": target, "step": "qps=1", "round": rnd, "index": i,
                                "ok": True, "ttft_s": e2e / 10, "e2e_s": e2e})
    records[0]["ok"] = False                           # service round 0, index 0: failed
    records.append({**records[1], "index": 7})         # service with no twin at bare
    with open(run / "requests.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    pool = _load_bench_pool()
    cells = [c.strip() for c in pool.paired_table([run], targets)[2].split("|")[1:-1]]
    # 2 pairs at ratio 2.0 (round 0) and 3 at 1.0 (round 1): median 1.0, not a round mix-up
    assert cells[:4] == ["qps=1", "5", "1.000", "1.000"]


def test_plot_groups_runs_by_name_less_its_number(tmp_path: Path) -> None:
    """`--plot`: split1 and split2 are one group, direct1 another; each run's own
    values are kept per step, in the order given, and the figure is written."""
    rng = np.random.default_rng(5)
    e2e = {"service": rng.uniform(0.9, 1.1, 50).tolist(), "bare": rng.uniform(1.0, 1.2, 50).tolist()}
    for name, scale in (("split1", 1.0), ("split2", 1.5), ("direct1", 2.0)):
        _write_run(tmp_path / name, {"service": [scale * v for v in e2e["service"]], "bare": e2e["bare"]})
    runs = [tmp_path / n for n in ("split1", "split2", "direct1")]
    pool = _load_bench_pool()
    groups = pool.run_groups(runs, targets)
    assert list(groups) == ["split", "direct"]
    ratios = [e for e, _, _ in groups["split"]["c=4"]]
    assert len(ratios) == 2 and ratios[1] == pytest.approx(1.5 * ratios[0], rel=1e-6)
    assert len(groups["direct"]["c=4"]) == 1
    out = tmp_path / "runs.png"
    assert pool.main([*map(str, runs), "--plot", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
