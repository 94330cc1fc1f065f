"""Several sweeps of ``scripts/bench-compare`` in aggregate, against the targets.

One sweep's E2E P90 ratio moves by more than the 3 % target between sweeps of the
same code on a shared 2-core box (its blocks swing by ±30 %), so a claim about a
data path rests on several sweeps, read three ways per step:

- **median of runs**: the median over sweeps of each sweep's ratio (or difference);
- **pooled**: percentiles over every request of every sweep, each side's own, and
  throughput as all tokens over all wall time;
- **each run**: how many sweeps met each target on their own.

A step is the same step across sweeps only if its label is (``c=16``, ``qps=18.69``):
QPS sweeps meant to be pooled are run at the same rates (``--qps``).  The per-process
CPU per request comes from each sweep's ``summary.md`` (``cluster.bench.cpu``).

    python -m cluster.bench.sweeps bench-results/split5 bench-results/split6 ...
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import orjson

TARGET_E2E_P90 = 1.03
TARGET_TTFT_P90_MS = 10.0
TARGET_THROUGHPUT = 0.97
SIDES = ("service", "bare")


def step_values(step: dict) -> tuple[float | None, float | None, float | None]:
    """A step's E2E P90 ratio, TTFT P90 difference (ms) and throughput ratio, service vs bare."""
    t_s, t_b = (step["results"][t]["ttft_ms"]["p90"] for t in SIDES)
    return (step["ratio"]["e2e_ms.p90"], None if t_s is None or t_b is None else t_s - t_b,
            step["ratio"]["output_tokens_per_s"])


def missed(e2e: float | None, ttft_diff: float | None, thr: float | None,
           failed: int = 0) -> list[str]:
    """Which targets these values miss (none: all met)."""
    return [name for name, miss in (
        ("E2E", e2e is None or e2e > TARGET_E2E_P90),
        ("TTFT", ttft_diff is None or ttft_diff > TARGET_TTFT_P90_MS),
        ("tok/s", thr is None or thr < TARGET_THROUGHPUT),
        ("errors", failed > 0)) if miss]


def misses(e2e: float | None, ttft_diff: float | None, thr: float | None, failed: int = 0) -> str:
    """'met', or which targets these values miss."""
    out = missed(e2e, ttft_diff, thr, failed)
    return "met" if not out else "missed: " + ", ".join(out)


@dataclass
class Step:
    """One step label over several sweeps."""
    label: str
    runs: list[tuple[float | None, float | None, float | None]] = field(default_factory=list)
    failed: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SIDES, 0))
    e2e_s: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    ttft_s: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    tokens: dict[str, float] = field(default_factory=lambda: dict.fromkeys(SIDES, 0.0))
    wall_s: dict[str, float] = field(default_factory=lambda: dict.fromkeys(SIDES, 0.0))

    def median(self) -> tuple[float | None, ...]:
        return tuple(_median([run[i] for run in self.runs]) for i in range(3))

    def pooled(self) -> tuple[float | None, float | None, float | None]:
        def p90(values: list[float]) -> float | None:
            return float(np.percentile(values, 90)) if values else None
        e2e = [p90(self.e2e_s[side]) for side in SIDES]
        ttft = [p90(self.ttft_s[side]) for side in SIDES]
        rate = [self.tokens[side] / self.wall_s[side] if self.wall_s[side] else None
                for side in SIDES]
        return (_ratio(*e2e), None if None in ttft else 1000 * (ttft[0] - ttft[1]),
                _ratio(*rate))

    def runs_meeting(self) -> tuple[int, int, int]:
        return tuple(sum(1 for run in self.runs if name not in missed(*run))
                     for name in ("E2E", "TTFT", "tok/s"))


def _median(values: list[float | None]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def load(dirs: list[Path]) -> list[Step]:
    """The steps of these sweeps (``bench.json`` and ``requests.jsonl`` in each), in the
    order they first appear."""
    steps: dict[str, Step] = {}
    for d in dirs:
        report = orjson.loads((d / "bench.json").read_bytes())
        for st in report["steps"]:
            step = steps.setdefault(st["label"], Step(st["label"]))
            step.runs.append(step_values(st))
            for side in SIDES:
                res = st["results"][side]
                step.failed[side] += res["failed"]
                step.tokens[side] += res["output_tokens"]
                step.wall_s[side] += res["wall_s"]
        with (d / "requests.jsonl").open("rb") as f:
            for line in f:
                r = orjson.loads(line)
                if r["ok"] and r["step"] in steps and r["target"] in SIDES:
                    steps[r["step"]].e2e_s[r["target"]].append(r["e2e_s"])
                    if r["ttft_s"] is not None:
                        steps[r["step"]].ttft_s[r["target"]].append(r["ttft_s"])
    return list(steps.values())


_CPU_ROW = re.compile(r"^\| (\*\*)?(?P<name>(bare|hpcserve)[^|]*?)(\*\*)? \| [\d.]+ \| "
                      r"(?P<ms>[\d.]+) \|$")


def cpu_per_request(summary: Path) -> dict[str, float]:
    """ms of CPU per completed request by process, from a sweep's ``summary.md``."""
    out = {}
    for line in summary.read_text().splitlines():
        m = _CPU_ROW.match(line)
        if m:
            out[m["name"].split(" (")[0].strip("* ")] = float(m["ms"])
    return out


def _f(v: float | None, spec: str) -> str:
    return "–" if v is None else format(v, spec)


def _values(v: tuple[float | None, ...]) -> str:
    return f"×{_f(v[0], '.3f')} / {_f(v[1], '+.0f')} ms / {_f(v[2], '.3f')}"


def table(steps: list[Step]) -> tuple[list[str], bool]:
    """Markdown, a row per step; and whether the median and pooled views meet every
    target at every step."""
    lines = ["| step | runs | median of runs: E2E P90 / TTFT P90 diff / tok/s | "
             "pooled: E2E P90 / TTFT P90 diff / tok/s | runs meeting E2E / TTFT / tok/s | "
             "failed (hpcserve / bare) | targets (median, pooled) |",
             "| --- | ---: | --- | --- | --- | ---: | --- |"]
    all_met = True
    for st in steps:
        med, pooled = st.median(), st.pooled()
        verdicts = [misses(*med, st.failed["service"]), misses(*pooled, st.failed["service"])]
        all_met &= verdicts == ["met", "met"]
        n = len(st.runs)
        meeting = " / ".join(f"{k} of {n}" for k in st.runs_meeting())
        lines.append(f"| {st.label} | {n} | {_values(med)} | {_values(pooled)} | {meeting} | "
                     f"{st.failed['service']} / {st.failed['bare']} | "
                     f"{verdicts[0]}; {verdicts[1]} |")
    return lines, all_met


def cpu_table(dirs: list[Path]) -> list[str]:
    """Markdown: CPU ms per request by process, one column per sweep."""
    per = [cpu_per_request(d / "summary.md") for d in dirs]
    names = list(dict.fromkeys(name for p in per for name in p))
    lines = ["| process | " + " | ".join(d.name for d in dirs) + " |",
             "| --- |" + " ---: |" * len(dirs)]
    for name in names:
        lines.append(f"| {name} | " + " | ".join(_f(p.get(name), ".1f") for p in per) + " |")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dirs", nargs="+", type=Path, help="bench-compare output directories")
    ap.add_argument("--cpu", action="store_true", help="also the CPU per request by process")
    args = ap.parse_args(argv)
    lines, met = table(load(args.dirs))
    print("\n".join(lines))
    print(f"\nTargets: E2E P90 ≤ ×{TARGET_E2E_P90}, TTFT P90 ≤ +{TARGET_TTFT_P90_MS:.0f} ms, "
          f"tok/s ≥ {TARGET_THROUGHPUT}, no errors; in both aggregate views: "
          f"{'all met' if met else 'NOT all met'}.")
    if args.cpu:
        print("\n" + "\n".join(cpu_table(args.dirs)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
