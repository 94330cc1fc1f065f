"""Who a request is from, once authenticated: what the pipeline's later steps ask."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

from serve_app.access.config import Limits


@dataclass(frozen=True)
class LimitScope:
    """One set of limits and who shares it: ``key:NAME`` or ``project:NAME``."""

    id: str
    limits: Limits


@dataclass(frozen=True)
class Principal:
    key: str                          # the key's name, or "oidc:<user>"; never a secret
    project: str
    user: str = ""
    models: tuple[str, ...] = ("*",)  # the key's globs
    project_models: tuple[str, ...] = ("*",)
    scopes: tuple[LimitScope, ...] = field(default=())  # key first, then project

    def may_use(self, model: str) -> bool:
        return (any(fnmatch.fnmatchcase(model, g) for g in self.models)
                and any(fnmatch.fnmatchcase(model, g) for g in self.project_models))
