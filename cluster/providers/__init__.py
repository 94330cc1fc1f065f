"""Allocation providers: one module per batch system, chosen by a pool's ``provider``.

Each provider has a typed options model (a pool's ``provider_options``), checked
when the config is loaded so a misspelt option names its field at ``hpcserve up``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel

from cluster.providers.base import Provider


def options_model(kind: str) -> type[BaseModel]:
    """The pydantic model of ``kind``'s ``provider_options``."""
    if kind == "local":
        from cluster.providers.local import LocalOptions
        return LocalOptions
    if kind == "slurm":
        from cluster.providers.slurm import SlurmConfig
        return SlurmConfig
    if kind == "heappe":
        from cluster.providers.heappe import HeappeConfig
        return HeappeConfig
    raise ValueError(f"unknown provider {kind!r}")


def make_provider(kind: str, options: dict[str, Any], run_dir: Path, pool: str) -> Provider:
    """Build the provider a pool names; imports lazily so extras stay optional."""
    opts = options_model(kind).model_validate(options)
    if kind == "local":
        from cluster.providers.local import LocalProvider
        fields = opts.model_dump(exclude={"jobs_dir"})
        return LocalProvider(opts.jobs_dir or run_dir / "jobs" / pool, **fields)
    if kind == "slurm":
        from cluster.providers.slurm import SlurmProvider
        return SlurmProvider(opts)
    from cluster.providers.heappe import HeappeProvider
    return HeappeProvider(opts)
