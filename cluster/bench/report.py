"""Turns measured requests into the numbers people compare: percentiles, rates, ratios.

Percentiles use linear interpolation between order statistics (numpy's default), the
same definition as `vllm bench serve`, so our P99 and theirs are comparable on the same
data. Latency percentiles cover successful requests only; failures are counted by kind
beside them, because a latency of a request that never completed means nothing.
Rates divide by the block's wall time, including the tail of requests still running
after the last arrival: that is the throughput a user can actually get.
"""

from __future__ import annotations

import collections
import platform
import socket
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import orjson

from cluster.bench.client import RequestResult
from cluster.bench.runner import BenchRun, Block

PCTS: tuple[int, ...] = (50, 90, 99)
LATENCIES: tuple[str, ...] = ("ttft_ms", "itl_ms", "e2e_ms")
RATES: tuple[str, ...] = ("output_tokens_per_s", "requests_per_s")


def percentiles(values: Sequence[float], pcts: Sequence[int] = PCTS) -> dict[str, float | None]:
    """{"p50": ..., "p90": ..., "p99": ..., "mean": ...}; all None for no data."""
    out: dict[str, float | None] = {f"p{p}": None for p in pcts}
    out["mean"] = None
    if len(values) == 0:
        return out
    arr = np.asarray(values, dtype=float)
    for p, v in zip(pcts, np.percentile(arr, list(pcts))):
        out[f"p{p}"] = float(v)
    out["mean"] = float(arr.mean())
    return out


# A 5 ms client timer firing this late at P99 means chunk timestamps are that coarse.
CLIENT_LAG_WARN_MS = 10.0


def summarize(
    results: Sequence[RequestResult], wall_s: float, offered: int, loop_lag_s: Sequence[float] = ()
) -> dict[str, Any]:
    """The step summary of one target, from all its blocks' results."""
    ok = [r for r in results if r.ok]
    failures = collections.Counter(r.error or "unknown" for r in results if not r.ok)
    out_tokens = sum(r.output_tokens for r in ok)
    prompt = [r.prompt_tokens for r in ok if r.prompt_tokens is not None]
    sources = collections.Counter(r.tokens_from for r in ok)
    ms = 1000.0
    return {
        "requests": len(results),
        "offered": offered,
        "ok": len(ok),
        "failed": len(results) - len(ok),
        "failures": dict(sorted(failures.items())),
        "wall_s": wall_s,
        "requests_per_s": len(ok) / wall_s if wall_s > 0 else 0.0,
        "output_tokens_per_s": out_tokens / wall_s if wall_s > 0 else 0.0,
        "output_tokens": out_tokens,
        "mean_output_tokens": out_tokens / len(ok) if ok else None,
        "mean_prompt_tokens": float(np.mean(prompt)) if prompt else None,
        "tokens_from": sources.most_common(1)[0][0] if sources else None,
        "ttft_ms": percentiles([r.ttft_s * ms for r in ok if r.ttft_s is not None]),
        "itl_ms": percentiles([x * ms for r in ok for x in r.itl_s]),
        "e2e_ms": percentiles([r.e2e_s * ms for r in ok if r.e2e_s is not None]),
        "client_lag_ms": percentiles([x * ms for x in loop_lag_s]),
    }


def _ratio(num: float | None, den: float | None) -> float | None:
    if num is None or den is None or den == 0:
        return None
    return num / den


def ratio_metrics(num: dict[str, Any], den: dict[str, Any]) -> dict[str, float | None]:
    """num / den for every latency percentile and rate: > 1 on latency means `num` is
    slower, < 1 on a rate means `num` delivers less."""
    out: dict[str, float | None] = {}
    for lat in LATENCIES:
        for p in PCTS:
            out[f"{lat}.p{p}"] = _ratio(num[lat][f"p{p}"], den[lat][f"p{p}"])
    for rate in RATES:
        out[rate] = _ratio(num[rate], den[rate])
    return out


def build_report(run: BenchRun, meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """The JSON document: meta, targets, per-step summaries per target, and in compare
    mode the ratio first-target / second-target per step."""
    by_key: dict[tuple[int, str], list[Block]] = collections.defaultdict(list)
    for b in run.blocks:
        by_key[(b.step_index, b.target)].append(b)
    names = [t.name for t in run.targets]
    steps: list[dict[str, Any]] = []
    for s, step in enumerate(run.config.steps):
        results: dict[str, Any] = {}
        for name in names:
            blocks = by_key.get((s, name), [])
            results[name] = summarize(
                [r for b in blocks for r in b.results],
                wall_s=sum(b.wall_s for b in blocks),
                offered=sum(b.offered for b in blocks),
                loop_lag_s=[x for b in blocks for x in b.loop_lag_s],
            )
        entry: dict[str, Any] = {"kind": step.kind, "value": step.value, "label": step.label, "results": results}
        if len(names) == 2:
            entry["ratio"] = {"numerator": names[0], "denominator": names[1], **ratio_metrics(results[names[0]], results[names[1]])}
        steps.append(entry)
    cfg = run.config
    return {
        "meta": {
            "host": socket.gethostname(),
            "python": platform.python_version(),
            "mode": cfg.mode,
            "prompt_tokens": run.prompt_tokens,
            "output_tokens": run.output_tokens,
            "duration_s": cfg.duration,
            "requests": cfg.requests,
            "rounds": cfg.rounds,
            "ignore_eos": cfg.ignore_eos,
            "max_concurrency": cfg.max_concurrency,
            "warmup": cfg.warmup,
            "seed": cfg.seed,
            **(meta or {}),
        },
        "targets": [{"name": t.name, "url": t.url, "model": t.model} for t in run.targets],
        "steps": steps,
        "order": [list(o) for o in run.order],
    }


def _fmt_ms(v: float | None) -> str:
    if v is None:
        return "–"
    return f"{v:.1f}" if v < 100 else f"{v:.0f}"


def _fmt_pcts(d: dict[str, float | None]) -> str:
    return " / ".join(_fmt_ms(d[f"p{p}"]) for p in PCTS)


def _fmt_ratio(v: float | None) -> str:
    return "–" if v is None else f"{v:.2f}"


def markdown(report: dict[str, Any]) -> str:
    """A results table (one row per step and target), failures by kind, and in compare
    mode a ratio table; ready to paste into an issue or a PR."""
    meta = report["meta"]
    models = ", ".join(f"{t['name']}: `{t['model']}` at {t['url']}" for t in report["targets"])
    bound = f"{meta['duration_s']:g} s" if meta.get("duration_s") else f"{meta['requests']} requests"
    lines = [
        "# hpcserve bench",
        "",
        f"{models}. Mode {meta['mode']}, prompt ~{meta['prompt_tokens']} tokens, "
        f"output {meta['output_tokens']} tokens{' (ignore_eos)' if meta['ignore_eos'] else ''}, "
        f"{bound} per step and target in {meta['rounds']} round(s), seed {meta['seed']}, host {meta['host']}.",
        "",
        "| target | step | ok | failed | req/s | out tok/s | TTFT ms p50/p90/p99 | ITL ms p50/p90/p99 | E2E ms p50/p90/p99 |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    failure_notes: list[str] = []
    lag_notes: list[str] = []
    for step in report["steps"]:
        for name, s in step["results"].items():
            lag = (s.get("client_lag_ms") or {}).get("p99")
            if lag is not None and lag > CLIENT_LAG_WARN_MS:
                lag_notes.append(f"- {name} {step['label']}: client event loop lag p99 {lag:.1f} ms")
            lines.append(
                f"| {name} | {step['label']} | {s['ok']} | {s['failed']} | {s['requests_per_s']:.2f} | "
                f"{s['output_tokens_per_s']:.1f} | {_fmt_pcts(s['ttft_ms'])} | {_fmt_pcts(s['itl_ms'])} | "
                f"{_fmt_pcts(s['e2e_ms'])} |"
            )
            if s["failures"]:
                kinds = ", ".join(f"{k} ×{n}" for k, n in s["failures"].items())
                failure_notes.append(f"- {name} {step['label']}: {kinds}")
    if failure_notes:
        lines += ["", "Failures:", *failure_notes]
    if lag_notes:
        lines += ["", "The benchmark client itself was busy (its latencies include this much of its own delay):", *lag_notes]
    ratios = [st for st in report["steps"] if st.get("ratio")]
    if ratios:
        num, den = ratios[0]["ratio"]["numerator"], ratios[0]["ratio"]["denominator"]
        cols = [f"{lat.split('_')[0].upper()} p{p}" for lat in LATENCIES for p in PCTS] + ["out tok/s", "req/s"]
        keys = [f"{lat}.p{p}" for lat in LATENCIES for p in PCTS] + list(RATES)
        lines += [
            "",
            f"Ratios {num} / {den} (latency > 1: {num} slower; rate < 1: {num} delivers less):",
            "",
            "| step | " + " | ".join(cols) + " |",
            "| --- | " + " | ".join("---:" for _ in cols) + " |",
        ]
        for st in ratios:
            lines.append(f"| {st['label']} | " + " | ".join(_fmt_ratio(st["ratio"][k]) for k in keys) + " |")
    return "\n".join(lines) + "\n"


def write_outputs(run: BenchRun, report: dict[str, Any], out_dir: Path) -> list[Path]:
    """bench.json, bench.md and requests.jsonl (every request, for re-analysis)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path, raw_path = out_dir / "bench.json", out_dir / "bench.md", out_dir / "requests.jsonl"
    json_path.write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY))
    md_path.write_text(markdown(report), encoding="utf-8")
    labels = [s.label for s in run.config.steps]
    with raw_path.open("wb") as f:
        for b in run.blocks:
            for r in b.results:
                rec = {"target": b.target, "step": labels[b.step_index], "round": b.round, **r.as_record()}
                f.write(orjson.dumps(rec) + b"\n")
    return [json_path, md_path, raw_path]
