"""Waiting for an engine's first answer, the same way for every endpoint.

The server may have no engine replica for a model yet (routed: a model scaled to
zero, its batch job on the way), so the first answer -- a stream's first chunk, an
embedding -- is awaited at most ``cold_start_timeout_s`` (503 ``model_starting``);
a model the control loop marks unavailable is a 503 at once, also while waiting;
an engine failure before anything was sent is a 503 ``engine_unavailable``.  Errors
the client caused (``APIError``) pass through with their 4xx.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from serve_app.errors import APIError

log = logging.getLogger("hpcserve.ingress")

T = TypeVar("T")


def check_available(server: Any, model: str) -> None:
    """503 for a model with no replica that none can come to (checked before the
    engine is asked, so nothing is started for it)."""
    status = server.model_status(model)
    if status and status["state"] == "unavailable":  # no replica, and none can come
        raise APIError(503, f"The model '{model}' is unavailable: "
                       f"{status.get('reason') or 'no allocation can host it'}.",
                       type_="server_error", code="model_unavailable",
                       headers={"Retry-After": "60"})


async def first_answer(server: Any, model: str, call: Awaitable[T], wait_s: float | None,
                       on_timeout: Callable[[], Awaitable[Any]] | None = None) -> T:
    """``await call``, errors mapped as above.  Where the engine may have no replica
    (``COLD_START_WAIT``: the routed ingress) at most ``wait_s``; an engine replica
    serving HTTP itself is the replica, so it skips the timer on every request, and
    ``wait_s`` None (a workflow: its steps wait for their own models) waits as long
    as the call takes."""
    try:
        if server.COLD_START_WAIT and wait_s:
            return await _while_starting(server, model, call, wait_s)
        return await call
    except asyncio.TimeoutError:
        if on_timeout is not None:
            await on_timeout()
        status = server.model_status(model) or {}
        raise APIError(503, f"The model '{model}' is starting "
                       f"({status.get('state', 'no replica yet')}) and did not answer "
                       f"within cold_start_timeout_s={wait_s:g}; retry later.",
                       type_="server_error", code="model_starting",
                       headers={"Retry-After": "30"}) from None
    except APIError:
        raise
    except Exception as exc:
        log.warning("engine for %s unavailable: %r", model, exc)
        raise APIError(503, f"No engine replica for '{model}' could serve the "
                       f"request ({type(exc).__name__}).", type_="server_error",
                       code="engine_unavailable") from None


async def _while_starting(server: Any, model: str, call: Awaitable[T], wait_s: float) -> T:
    """``call``'s result, waiting at most ``wait_s``; a model that turns
    ``unavailable`` meanwhile (its provider refuses, its budget ran out) ends the
    wait at once with that 503 instead of at the timeout."""
    first = asyncio.ensure_future(call)
    deadline = asyncio.get_running_loop().time() + wait_s
    try:
        while True:
            left = deadline - asyncio.get_running_loop().time()
            done, _ = await asyncio.wait({first}, timeout=max(0.0, min(2.0, left)))
            if done:
                return first.result()
            check_available(server, model)
            if left <= 2.0:
                raise asyncio.TimeoutError
    finally:
        if not first.done():  # let the call unwind (a generator before it is closed)
            first.cancel()
            await asyncio.gather(first, return_exceptions=True)
