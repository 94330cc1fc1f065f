"""`hpcserve bench`: a load generator for OpenAI-compatible streaming endpoints.

It measures what a user of the endpoint feels (TTFT, inter-token and end-to-end
latency, throughput, failures) under a concurrency or Poisson-QPS sweep, and in compare
mode measures the cost of hpcserve itself: the same engine bare and behind the service,
interleaved in one run so machine noise hits both alike.
"""

from cluster.bench.runner import (
    BenchConfig,
    BenchError,
    BenchRun,
    Step,
    Target,
    run_bench,
)
from cluster.bench.workload import PromptFactory, poisson_arrivals

__all__ = [
    "BenchConfig",
    "BenchError",
    "BenchRun",
    "PromptFactory",
    "Step",
    "Target",
    "poisson_arrivals",
    "run_bench",
]
