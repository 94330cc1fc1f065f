"""The targets a ``scripts/bench-compare`` sweep is held to, per step, and the tables
that show them: one sweep (``ratio_table``; ``scripts/bench-pool`` prints it for
several sweeps pooled), and the CPU per request of every process over sweeps.

Targets: hpcserve against bare vLLM on the same machine in the same run, E2E P90
at most x1.03, TTFT P90 at most 10 ms later, output throughput at least 0.97 of
bare's, and no failed request.
"""

from __future__ import annotations

import re
from pathlib import Path

TARGET_E2E_P90 = 1.03
TARGET_TTFT_P90_MS = 10.0
TARGET_THROUGHPUT = 0.97


def fmt(v: float | None, spec: str) -> str:
    return "–" if v is None else format(v, spec)


def step_values(step: dict) -> tuple[float | None, float | None, float | None]:
    """A step's E2E P90 ratio, TTFT P90 difference (ms) and throughput ratio, service vs bare."""
    t_s, t_b = (step["results"][t]["ttft_ms"]["p90"] for t in ("service", "bare"))
    return (step["ratio"]["e2e_ms.p90"], None if t_s is None or t_b is None else t_s - t_b,
            step["ratio"]["output_tokens_per_s"])


def misses(e2e: float | None, ttft_diff: float | None, thr: float | None, failed: int = 0) -> str:
    """'met', or which targets these values miss."""
    missed = [name for name, miss in (
        ("E2E", e2e is None or e2e > TARGET_E2E_P90),
        ("TTFT", ttft_diff is None or ttft_diff > TARGET_TTFT_P90_MS),
        ("tok/s", thr is None or thr < TARGET_THROUGHPUT),
        ("errors", failed > 0)) if miss]
    return "met" if not missed else "missed: " + ", ".join(missed)


def ratio_table(report: dict) -> tuple[list[str], bool]:
    """Markdown: per step E2E P90 ratio, TTFT P90 difference, throughput ratio, failures;
    and whether every step met the targets."""
    lines = [("| step | E2E P90 ratio | TTFT P90 ms (bare → hpcserve, diff) | out tok/s ratio "
             "| out tok/s (bare / hpcserve) | failed (hpcserve / bare) | targets |"),
             "| --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    all_met = True
    for st in report["steps"]:
        svc, bare = st["results"]["service"], st["results"]["bare"]
        e2e, diff, thr = step_values(st)
        verdict = misses(e2e, diff, thr, svc["failed"])
        all_met &= verdict == "met"
        lines.append(
            f"| {st['label']} | {fmt(e2e, '.3f')} | {fmt(bare['ttft_ms']['p90'], '.0f')} → "
            f"{fmt(svc['ttft_ms']['p90'], '.0f')} ({fmt(diff, '+.0f')}) | {fmt(thr, '.3f')} | "
            f"{bare['output_tokens_per_s']:.0f} / {svc['output_tokens_per_s']:.0f} | "
            f"{svc['failed']} / {bare['failed']} | {verdict} |")
    return lines, all_met


# a row of summary.md's CPU table (cluster.bench.cpu): | process | CPU s | ms per request |
_CPU_ROW = re.compile(r"^\| (?P<name>(\*\*)?(bare|hpcserve)[^|]*?) \| [\d.]+ \| (?P<ms>[\d.]+) \|$")


def cpu_per_request(summary: Path) -> dict[str, float]:
    """ms of CPU per completed request by process, from a sweep's ``summary.md``."""
    out = {}
    for line in summary.read_text().splitlines():
        m = _CPU_ROW.match(line)
        if m:
            out[m["name"].split(" (")[0].strip("* ")] = float(m["ms"])
    return out


def cpu_table(runs: list[Path]) -> list[str]:
    """Markdown: CPU ms per request by process, a column per sweep and their median."""
    import statistics

    per = [cpu_per_request(run / "summary.md") for run in runs]
    names = list(dict.fromkeys(name for p in per for name in p))
    lines = ["| process | " + " | ".join(run.name for run in runs) + " | median |",
             "| --- |" + " ---: |" * (len(runs) + 1)]
    for name in names:
        values = [p.get(name) for p in per]
        known = [v for v in values if v is not None]
        lines.append(f"| {name} | " + " | ".join(fmt(v, ".1f") for v in values)
                     + f" | {fmt(statistics.median(known) if known else None, '.1f')} |")
    return lines
