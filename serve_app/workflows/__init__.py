"""Workflows: a model name served by several model calls (composed over the internal
protocol, ``GenerateRequest`` -> stream of ``list[GenerateDelta]``).

A kind is one module: a ``Workflow`` subclass with its pydantic ``Config`` (a
``WorkflowConfig`` with ``kind: Literal[...]``), registered in ``KINDS`` below.  The
app's ``workflows:`` list is validated against the union of the kinds' configs, and
the routed ingress runs them next to its engine handles (``serve_app.ingress``).
"""

from __future__ import annotations

from typing import Annotated, Union

from pydantic import Field

from serve_app.workflows.base import StepCall, Workflow, WorkflowConfig
from serve_app.workflows.tribunal import Tribunal

KINDS: dict[str, type[Workflow]] = {cls.kind: cls for cls in (Tribunal,)}

_configs = tuple(cls.Config for cls in KINDS.values())
# `kind` picks the config model (a single kind needs no discriminator).
WorkflowSpec = (Annotated[Union[_configs], Field(discriminator="kind")]  # noqa: UP007
                if len(_configs) > 1 else _configs[0])


def build_workflow(config: WorkflowConfig, call: StepCall, models: dict) -> Workflow:
    return KINDS[config.kind](config, call, models)


__all__ = ["KINDS", "Workflow", "WorkflowConfig", "WorkflowSpec", "build_workflow"]
