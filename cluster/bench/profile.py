"""Where a data path's CPU goes: py-spy on the service's replicas while load runs.

``scripts/bench-compare --profile`` samples the ingress and engine replica processes
during its sweep (``py-spy record --nonblocking``: the process is never paused, so
the profile costs it nothing measurable) and reports, for each, the share of its
samples spent in each layer -- hpcserve's code, Ray Serve, gRPC, the HTTP stack,
asyncio, serialization, the engine -- and in the functions that take the most.  The
raw stacks are kept next to the report for a flame graph (``flamegraph.pl`` or
speedscope.app read them as they are).

py-spy comes with the client tools (``.venv-tools``, ``scripts/setup --all``).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

# (layer, file path prefixes py-spy prints, which are relative to sys.path); first match
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("hpcserve", ("serve_app/", "cluster/")),
    ("Ray Serve", ("ray/serve/",)),
    ("gRPC", ("grpc/", "grpc_")),
    ("Ray core", ("ray/",)),
    ("HTTP (Starlette, uvicorn)", ("starlette/", "fastapi/", "uvicorn/", "h11/", "httptools/",
                                   "anyio/")),
    ("serialization", ("pickle", "cloudpickle/", "json/", "msgpack/", "msgspec/", "copyreg")),
    ("pydantic", ("pydantic/", "pydantic_core/")),
    ("asyncio", ("asyncio/", "uvloop/", "selectors", "contextlib", "contextvars")),
    ("ZeroMQ", ("zmq/",)),
    ("engine (vLLM, torch)", ("vllm/", "torch/", "transformers/", "tokenizers/")),
    ("logging", ("logging/",)),
    ("threads (waiting, pools)", ("threading.py", "concurrent/futures/", "queue.py")),
)


def layer_of(frame: str) -> str:
    """``func (path/file.py:12)`` -> its layer; "other" when no prefix matches."""
    path = frame[frame.rfind("(") + 1:].rstrip(")") if "(" in frame else frame
    path = path.rpartition("site-packages/")[2]  # an installed package's own path
    for name, prefixes in LAYERS:
        if path.startswith(prefixes):
            return name
    return "other"


def function_of(frame: str) -> str:
    """``func (path/file.py:12)`` -> ``func (path/file.py)``: lines of one function merged."""
    if "(" not in frame:
        return frame
    name, _, where = frame.rpartition(" (")
    return f"{name} ({where.rsplit(':', 1)[0].rstrip(')')})"


@dataclass
class Profile:
    """Samples of one process, from py-spy's raw (collapsed-stack) output."""

    samples: int = 0
    by_layer: Counter = field(default_factory=Counter)      # by the leaf frame's layer
    by_leaf: Counter = field(default_factory=Counter)       # by the leaf function
    by_ours: Counter = field(default_factory=Counter)       # by the innermost hpcserve frame
    error: list[str] = field(default_factory=list)          # why there are no samples

    @classmethod
    def parse(cls, text: str) -> Profile:
        prof = cls()
        for line in text.splitlines():
            stack, _, count = line.rpartition(" ")
            if not stack or not count.isdigit():
                continue
            n = int(count)
            frames = stack.split(";")
            leaf = frames[-1]
            prof.samples += n
            prof.by_layer[layer_of(leaf)] += n
            prof.by_leaf[function_of(leaf)] += n
            ours = next((f for f in reversed(frames) if layer_of(f) == "hpcserve"), None)
            prof.by_ours[function_of(ours) if ours else "(no hpcserve frame)"] += n
        return prof

    def table(self, title: str, top: int = 8) -> list[str]:
        if not self.samples:
            return [f"**{title}**: no samples ({'; '.join(self.error) or 'idle'})", ""]
        pct = lambda n: f"{100 * n / self.samples:.0f} %"  # noqa: E731
        lines = [f"**{title}** ({self.samples} samples)", "",
                 "| where the samples were (leaf frame) | share |", "| --- | ---: |"]
        lines += [f"| {k} | {pct(n)} |" for k, n in self.by_layer.most_common()]
        lines += ["", "| busiest functions (leaf) | share |", "| --- | ---: |"]
        lines += [f"| `{k}` | {pct(n)} |" for k, n in self.by_leaf.most_common(top)]
        lines += ["", "| under hpcserve's innermost frame | share |", "| --- | ---: |"]
        lines += [f"| `{k}` | {pct(n)} |" for k, n in self.by_ours.most_common(top)]
        return [*lines, ""]


class Profiler:
    """py-spy on each of ``targets`` ({label: pid}) from ``start()`` to ``stop()``."""

    def __init__(self, targets: dict[str, int], out: Path, py_spy: str | None = None,
                 rate: int = 50):
        self.targets, self.out, self.rate = targets, out, rate
        self.py_spy = py_spy or shutil.which("py-spy") or str(
            Path(__file__).resolve().parents[2] / ".venv-tools" / "bin" / "py-spy")
        self.procs: dict[str, subprocess.Popen] = {}

    def available(self) -> bool:
        return os.access(self.py_spy, os.X_OK)

    def _raw(self, label: str) -> Path:
        return self.out / f"{label.replace(' ', '_').replace('/', '_')}.stacks.txt"

    def _log(self, label: str) -> Path:
        return self.out / f"{label.replace(' ', '_').replace('/', '_')}.py-spy.log"

    def start(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        for label, pid in self.targets.items():
            with open(self._log(label), "w") as log:  # the child keeps its own copy
                self.procs[label] = subprocess.Popen(
                    [self.py_spy, "record", "--pid", str(pid), "--format", "raw",
                     "--nonblocking", "--rate", str(self.rate), "-o", str(self._raw(label))],
                    stdout=log, stderr=subprocess.STDOUT)

    def stop(self, timeout: float = 30) -> dict[str, Profile]:
        """Stop sampling (py-spy writes its file on SIGINT); each target's profile."""
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
        deadline = time.monotonic() + timeout
        for proc in self.procs.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        out: dict[str, Profile] = {}
        for label in self.targets:
            if self._raw(label).exists():
                out[label] = Profile.parse(self._raw(label).read_text())
            else:  # py-spy could not attach (permissions) or the process was gone
                out[label] = Profile(error=self._log(label).read_text(errors="replace")
                                     .strip().splitlines()[:1] or ["py-spy wrote nothing"])
        return out


if __name__ == "__main__":  # python -m cluster.bench.profile DIR: the tables again
    import sys
    for raw in sorted(Path(sys.argv[1]).glob("*.stacks.txt")):
        print("\n".join(Profile.parse(raw.read_text()).table(raw.name.split(".")[0])))
