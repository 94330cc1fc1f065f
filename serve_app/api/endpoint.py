"""What an endpoint module declares: its route and its handler.

Adding an endpoint is one module that defines an ``Endpoint`` and one line in
``server.ENDPOINTS``; the pipeline (authentication, body, model access, limits,
accounting) comes with it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Awaitable, Callable

from pydantic import BaseModel
from starlette.responses import Response

if TYPE_CHECKING:
    from serve_app.api.pipeline import RequestContext
    from serve_app.api.server import OpenAIServer


@dataclass(frozen=True)
class Endpoint:
    name: str                                  # the ledger's "endpoint" column
    path: str
    method: str
    handle: Callable[["OpenAIServer", "RequestContext"], Awaitable[Response]]
    body: type[BaseModel] | None = None        # the JSON body, validated by the pipeline
    generates: bool = False                    # runs an engine: limits and usage apply
