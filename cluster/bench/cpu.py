"""CPU a benchmark's processes used, by component, and the machine's load meanwhile.

``scripts/bench-compare`` runs bare vLLM and an hpcserve stack side by side on one
machine; what each side's processes burned per completed request (the benchmark
client excluded) is the cost the latency figures do not show.  Read from /proc:
user + system time of every process of each side, before and after the sweep.
"""

from __future__ import annotations

import json
import os
import re
import threading
from pathlib import Path
from typing import Self


class LoadSampler:
    """1-minute load average every 5 s while the benchmark runs (others share the box)."""

    def __init__(self) -> None:
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append(os.getloadavg()[0])
            self._stop.wait(5)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=6)

    def summary(self) -> str:
        s = self.samples or [os.getloadavg()[0]]
        return f"min {min(s):.2f} / mean {sum(s) / len(s):.2f} / max {max(s):.2f} ({len(s)} samples)"


CLK_TCK = os.sysconf("SC_CLK_TCK")


def proc_snapshot() -> dict[int, tuple[int, float, str]]:
    """pid -> (ppid, CPU seconds user+system, command line) of every process."""
    out: dict[int, tuple[int, float, str]] = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        comm = stat[stat.index("(") + 1:stat.rindex(")")]
        out[int(pid)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / CLK_TCK,
                         cmd.strip() or f"[{comm}]")
    return out


def with_descendants(snap: dict[int, tuple[int, float, str]], marked: dict[int, bool]) -> dict[int, bool]:
    """``marked`` and every descendant of its processes, each with its ancestor's mark."""
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in snap.items():
        children.setdefault(ppid, []).append(pid)
    out = dict(marked)
    todo = list(out)
    while todo:
        pid = todo.pop()
        for c in children.get(pid, ()):
            if c not in out:
                out[c] = out[pid]
                todo.append(c)
    return out


# an engine replica's process title: in the app, or in a model's own app (`hpcserve.m.X`)
ENGINE_REPLICA = re.compile(r"ServeReplica:hpcserve(\.m\.[^:]+)?:engine-")


def component(cmd: str, in_engine_replica: bool, bare_side: bool) -> str:
    if bare_side:
        return ("bare: api_server (HTTP, detokenize)" if "vllm.entrypoints" in cmd
                else "bare: vLLM EngineCore + worker")
    if in_engine_replica and "ray::" not in cmd:
        return "hpcserve: vLLM EngineCore + worker"  # children of the engine replica
    if ENGINE_REPLICA.search(cmd):
        return "hpcserve: engine replica (AsyncLLM, Serve)"
    for key, name in (("ServeReplica:hpcserve:Ingress", "hpcserve: ingress replica"),
                      ("cluster.failover_relay", "hpcserve: failover relay"),
                      ("haproxy", "hpcserve: HAProxy"), ("ProxyActor", "hpcserve: Serve proxy actors"),
                      ("HAProxyManager", "hpcserve: Serve proxy actors"),
                      ("ServeController", "hpcserve: Serve controller")):
        if key in cmd:
            return name
    return "hpcserve: Ray system: " + system_name(cmd)


def system_name(cmd: str) -> str:
    """A short name for a Ray or hpcserve control process."""
    argv = cmd.split()
    if not argv:
        return "?"
    if argv[0].startswith("ray::"):
        return argv[0]
    for a in argv[:3]:
        base = os.path.basename(a)
        if base in ("gcs_server", "raylet", "dashboard.py", "log_monitor.py", "monitor.py", "agent.py"):
            return base
    if "ray start" in cmd or argv[1:2] == ["start"] or (len(argv) > 1 and argv[1].endswith("/ray")):
        return "ray start (node launcher)"
    if "-m" in argv:
        return argv[argv.index("-m") + 1] if argv.index("-m") + 1 < len(argv) else "python -m"
    return os.path.basename(argv[0])


class CpuAccount:
    """CPU seconds each of our processes used between start() and stop(), by component:
    the processes of bare vLLM's group, and those of our hpcserve stack (descendants of
    its head and its jobs, and anything naming its Ray temp dir, e.g. HAProxy)."""

    def __init__(self, bare_pid: int, home: Path) -> None:
        self.bare_pid, self.home = bare_pid, home
        self.before: dict[int, tuple[int, float, str]] = {}
        self.used: dict[str, float] = {}

    def ours(self, snap) -> dict[int, bool]:
        head = json.loads((self.home / "run" / "head.json").read_text())
        roots = {self.bare_pid: True, int(head["pid"]): False}
        pid_files = list(self.home.rglob("*.pid"))
        if head.get("private_dir"):  # the failover relay's, beside HAProxy's config
            pid_files += Path(head["private_dir"]).rglob("relay.pid")
        for f in pid_files:
            try:
                roots[int(f.read_text().strip())] = False
            except (OSError, ValueError):
                pass
        marks = [str(head.get("temp_dir") or "\0"), str(head.get("gcs_address") or "\0")]
        ours = {pid: side for pid, side in roots.items() if pid in snap}
        ours.update({pid: False for pid, (_, _, cmd) in snap.items() if any(m in cmd for m in marks)})
        return with_descendants(snap, ours)

    def start(self) -> None:
        self.before = proc_snapshot()

    def stop(self) -> None:
        after = proc_snapshot()
        for pid, bare_side in self.ours(after).items():
            ppid, cpu, cmd = after[pid]
            prev = self.before.get(pid)
            used = cpu - (prev[1] if prev and prev[2] == cmd else 0.0)
            anc, in_replica = ppid, False
            for _ in range(8):  # is an engine replica among its ancestors?
                if anc not in after:
                    break
                if ENGINE_REPLICA.search(after[anc][2]):
                    in_replica = True
                    break
                anc = after[anc][0]
            name = component(cmd, in_replica, bare_side)
            self.used[name] = self.used.get(name, 0.0) + used

    def table(self, report: dict) -> list[str]:
        totals = {side: sum(s["results"][side]["ok"] for s in report["steps"]) for side in ("service", "bare")}
        lines = ["| process | CPU s | CPU ms per request |", "| --- | ---: | ---: |"]
        for side, prefix in (("bare", "bare:"), ("service", "hpcserve:")):
            names = sorted((n for n in self.used if n.startswith(prefix)), key=lambda n: -self.used[n])
            small = [n for n in names if ": Ray system: " in n and self.used[n] < 0.5]
            names = [n for n in names if n not in small]
            for n in names:
                lines.append(f"| {n} | {self.used[n]:.1f} | {1000 * self.used[n] / max(1, totals[side]):.1f} |")
            if small:
                rest = sum(self.used[n] for n in small)
                lines.append(f"| hpcserve: Ray system: {len(small)} other processes | {rest:.1f} | "
                             f"{1000 * rest / max(1, totals[side]):.1f} |")
            tot = sum(self.used[n] for n in names) + sum(self.used[n] for n in small)
            lines.append(f"| **{prefix[:-1]} total** ({totals[side]} requests) | {tot:.1f} | "
                         f"{1000 * tot / max(1, totals[side]):.1f} |")
        return lines
