"""The pipeline's access steps: authenticate -> (body) -> authorize model -> admit,
and after the engine: release and account.

``access_steps`` builds only the steps a config needs, so an app without
credentials runs none of them.  Every step reads replica-local state
(``serve_app.access.client``); none calls the head on the request path.
"""

from __future__ import annotations

import hmac
from typing import Any

from serve_app.access.principal import Principal
from serve_app.api.pipeline import RequestContext
from serve_app.config import AppConfig
from serve_app.errors import APIError

STATIC_PROJECT = "default"


def unauthorized(message: str) -> APIError:
    return APIError(401, message, code="invalid_api_key")


class StaticKeys:
    """``api_keys`` / ``api_keys_file``: keys of the default project, no limits."""

    def __init__(self, keys: list[str]):
        self.keys = [(f"api_keys[{i}]", k.encode()) for i, k in enumerate(keys)]

    def find(self, token: str) -> Principal | None:
        found = None
        for name, key in self.keys:  # every comparison runs: no early exit to time
            if hmac.compare_digest(token.encode(), key):
                found = name
        return None if found is None else Principal(key=found, project=STATIC_PROJECT)


class Authenticate:
    def __init__(self, static: StaticKeys):
        self.static = static

    async def before(self, ctx: RequestContext) -> None:
        header = ctx.request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise unauthorized("Missing API key. Send 'Authorization: Bearer <key>'.")
        principal = self.static.find(token)
        if principal is None:
            raise unauthorized("Incorrect API key provided.")
        ctx.principal = principal

    def after(self, ctx: RequestContext) -> None:
        pass


class AuthorizeModel:
    """A model the caller may not use is a 404, exactly as one that does not exist."""

    def __init__(self, model_config: Any):
        self.model_config = model_config  # OpenAIServer.model_config: raises the 404

    async def before(self, ctx: RequestContext) -> None:
        if ctx.model is not None:
            self.model_config(ctx.model, ctx.principal)

    def after(self, ctx: RequestContext) -> None:
        pass


def access_steps(config: AppConfig, ledger: Any = None) -> tuple[list, list]:
    """(steps before the body is read, steps after it) for ``config``."""
    if not config.authenticated:
        return [], []
    return [Authenticate(StaticKeys(config.load_api_keys()))], []
