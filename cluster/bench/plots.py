"""PNG plots of a report: latency percentiles and throughput against the swept load.

Targets share axes (one colour each) so the gap between bare and service is read off
directly; percentiles differ by line style. The Agg backend is forced because the bench
runs on login and compute nodes without a display.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (backend must be chosen first)

from cluster.bench.report import LATENCIES, PCTS  # noqa: E402

_STYLES = {50: "-", 90: "--", 99: ":"}
_TITLES = {"ttft_ms": "TTFT (ms)", "itl_ms": "inter-token latency (ms)", "e2e_ms": "end-to-end latency (ms)"}
_XLABEL = {"concurrency": "concurrent users", "qps": "offered load (requests/s, Poisson)"}
_RATIO_KEYS = ("ttft_ms.p50", "ttft_ms.p90", "e2e_ms.p50", "e2e_ms.p90", "output_tokens_per_s")


def _series(report: dict[str, Any], kind: str) -> tuple[list[float], list[dict[str, Any]]]:
    steps = sorted((s for s in report["steps"] if s["kind"] == kind), key=lambda s: s["value"])
    return [s["value"] for s in steps], steps


def _x_axis(ax: Any, xs: list[float], kind: str) -> None:
    ax.set_xlabel(_XLABEL[kind])
    # Sweeps like 1,16,64,128 crowd the low end on a linear axis.
    if len(xs) > 1 and min(xs) > 0 and max(xs) / min(xs) >= 8:
        ax.set_xscale("log", base=2)
    ax.set_xticks(xs)
    ax.set_xticklabels([f"{x:g}" for x in xs])
    ax.grid(True, alpha=0.3)


def _nan(v: float | None) -> float:
    return float("nan") if v is None else float(v)


def plot_latency(report: dict[str, Any], kind: str, path: Path) -> None:
    xs, steps = _series(report, kind)
    names = [t["name"] for t in report["targets"]]
    fig, axes = plt.subplots(1, len(LATENCIES), figsize=(5 * len(LATENCIES), 4), constrained_layout=True)
    for ax, lat in zip(axes, LATENCIES):
        for ci, name in enumerate(names):
            for p in PCTS:
                ys = [_nan(s["results"][name][lat][f"p{p}"]) for s in steps]
                ax.plot(xs, ys, _STYLES[p], marker="o", color=f"C{ci}", label=f"{name} p{p}")
        ax.set_title(_TITLES[lat])
        ax.set_ylim(bottom=0)
        _x_axis(ax, xs, kind)
    axes[0].legend(fontsize="small")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_throughput(report: dict[str, Any], kind: str, path: Path) -> None:
    xs, steps = _series(report, kind)
    names = [t["name"] for t in report["targets"]]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    for ax, key, title in zip(axes, ("output_tokens_per_s", "requests_per_s"), ("output tokens/s", "completed requests/s")):
        for ci, name in enumerate(names):
            ys = [s["results"][name][key] for s in steps]
            ax.plot(xs, ys, "-", marker="o", color=f"C{ci}", label=name)
        if kind == "qps" and key == "requests_per_s":
            ax.plot(xs, xs, color="grey", lw=0.8, ls="--", label="offered")
        ax.set_title(title)
        ax.set_ylim(bottom=0)
        _x_axis(ax, xs, kind)
        ax.legend(fontsize="small")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_ratio(report: dict[str, Any], kind: str, path: Path) -> None:
    xs, steps = _series(report, kind)
    r0 = steps[0]["ratio"]
    fig, ax = plt.subplots(figsize=(6, 4), constrained_layout=True)
    for key in _RATIO_KEYS:
        ax.plot(xs, [_nan(s["ratio"][key]) for s in steps], marker="o", label=key)
    ax.axhline(1.0, color="black", lw=0.8)
    ax.set_title(f"{r0['numerator']} / {r0['denominator']}")
    _x_axis(ax, xs, kind)
    ax.legend(fontsize="small")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_plots(report: dict[str, Any], out_dir: Path) -> list[Path]:
    """latency_vs_{kind}.png, throughput_vs_{kind}.png and, when comparing,
    ratio_vs_{kind}.png for each swept kind present in the report."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for kind in ("concurrency", "qps"):
        xs, steps = _series(report, kind)
        if not xs:
            continue
        for name, fn in (("latency", plot_latency), ("throughput", plot_throughput)):
            path = out_dir / f"{name}_vs_{kind}.png"
            fn(report, kind, path)
            written.append(path)
        if all(s.get("ratio") for s in steps):
            path = out_dir / f"ratio_vs_{kind}.png"
            plot_ratio(report, kind, path)
            written.append(path)
    return written


_STEP_VALUES = (("E2E P90, ratio to bare", 1.0), ("TTFT P90, difference to bare (ms)", 0.0),
                ("output tokens/s, ratio to bare", 1.0))


def plot_runs(groups: dict[str, dict[str, list[tuple[float | None, ...]]]],
              targets: tuple[float, float, float], path: Path) -> None:
    """Each run's E2E P90 ratio, TTFT P90 difference and throughput ratio per step
    (dots), the median over a group's runs (a bar) and the targets (dashed).

    ``groups`` maps a name (``split``) to step label to one value triple per run, as
    ``targets.step_values`` gives it.  A single sweep moves by more than the targets,
    so a reader needs the spread beside the median; groups sit side by side per step.
    """
    labels = list(dict.fromkeys(label for steps in groups.values() for label in steps))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2), constrained_layout=True)
    width = 0.8 / max(1, len(groups))
    for gi, (name, steps) in enumerate(groups.items()):
        offset = (gi - (len(groups) - 1) / 2) * width
        n_runs = max(len(values) for values in steps.values())
        for column, ax in enumerate(axes):
            legend = f"{name}: median of {n_runs} run{'s' if n_runs > 1 else ''}"
            for xi, label in enumerate(labels):
                ys = [v[column] for v in steps.get(label, []) if v[column] is not None]
                if not ys:
                    continue
                x = xi + offset
                ax.plot([x] * len(ys), ys, ".", color=f"C{gi}", alpha=0.5, ms=5)
                ax.plot([x - width * 0.4, x + width * 0.4], [statistics.median(ys)] * 2,
                        color=f"C{gi}", lw=2.5, label=legend)
                legend = None
    for ax, (title, neutral), target in zip(axes, _STEP_VALUES, targets):
        ax.axhline(neutral, color="black", lw=0.8)
        ax.axhline(target, color="red", lw=1, ls="--", label="target")
        ax.set_title(title)
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels, rotation=30, fontsize="small")
        ax.grid(True, axis="y", alpha=0.3)
    axes[0].legend(fontsize="small")
    fig.savefig(path, dpi=110)
    plt.close(fig)
