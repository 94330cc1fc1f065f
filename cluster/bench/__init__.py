"""`hpcserve bench`: a load generator for OpenAI-compatible streaming endpoints.

It measures what a user of the endpoint feels (TTFT, inter-token and end-to-end
latency, throughput, failures) under a concurrency or Poisson-QPS sweep, and in compare
mode measures the cost of hpcserve itself: the same engine bare and behind the service,
interleaved in one run so machine noise hits both alike.
"""

import importlib

_EXPORTS = {"BenchConfig": "runner", "BenchError": "runner", "BenchRun": "runner",
            "Step": "runner", "Target": "runner", "run_bench": "runner",
            "PromptFactory": "workload", "poisson_arrivals": "workload"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    """Imported on first use: the runner takes seconds to import (numpy, the client),
    and every `hpcserve` command imports this package for its parser."""
    if name not in _EXPORTS:
        raise AttributeError(f"module 'cluster.bench' has no attribute {name!r}")
    return getattr(importlib.import_module(f"cluster.bench.{_EXPORTS[name]}"), name)
