"""Allocation providers: one module per batch system, chosen by a pool's ``provider``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cluster.providers.base import Provider


def make_provider(kind: str, options: dict[str, Any], run_dir: Path, pool: str) -> Provider:
    """Build the provider a pool names; imports lazily so extras stay optional."""
    if kind == "local":
        from cluster.providers.local import LocalProvider
        return LocalProvider(options.pop("jobs_dir", run_dir / "jobs" / pool), **options)
    if kind == "slurm":
        from cluster.providers.slurm import SlurmConfig, SlurmProvider
        job_script = options.pop("job_script", None)
        return SlurmProvider(SlurmConfig(**options), job_script=job_script)
    if kind == "heappe":
        from cluster.providers.heappe import HeappeProvider
        return HeappeProvider(**options)
    raise ValueError(f"unknown provider {kind!r}")
