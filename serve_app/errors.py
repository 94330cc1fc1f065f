"""OpenAI-shaped errors: every failure a client can cause ends here as a 4xx.

The ingress raises ``APIError`` for anything it rejects; engines raise
``EngineError`` (serve_app.protocol), which may arrive wrapped by Ray.  Both become
``{"error": {"message", "type", "param", "code"}}`` with the right status.
"""

from __future__ import annotations

from typing import Any

import orjson
from pydantic import ValidationError
from starlette.responses import Response

from serve_app.protocol import EngineError

_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable",
}


class APIError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None,
                 code: str | None = None, type_: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type_ or _TYPE_BY_STATUS.get(status, "server_error" if status >= 500
                                                   else "invalid_request_error")

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type,
                          "param": self.param, "code": self.code}}

    def response(self) -> Response:
        return Response(orjson.dumps(self.body()), status_code=self.status,
                        media_type="application/json")

    @classmethod
    def from_engine(cls, err: EngineError) -> "APIError":
        return cls(err.status, err.message, param=err.param, code=err.code)

    @classmethod
    def from_validation(cls, err: ValidationError) -> "APIError":
        """Name the first offending field the way OpenAI does (``messages.0.role``)."""
        first = err.errors(include_url=False)[0]
        param = ".".join(str(p) for p in first["loc"] if not _is_union_tag(p)) or None
        message = first["msg"]
        if first["type"] == "missing":
            message = f"Missing required parameter: '{param}'."
        elif param:
            message = f"Invalid value for '{param}': {message}"
        return cls(400, message, param=param,
                   code="missing_required_parameter" if first["type"] == "missing"
                   else "invalid_value")


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


def _is_union_tag(part: object) -> bool:
    """Pydantic names the union member in error locations (``content.str``); clients
    want the field (``content``)."""
    return isinstance(part, str) and (part in _TYPE_TAGS or "[" in part)


def as_engine_error(exc: BaseException) -> EngineError | None:
    """Unwrap an EngineError that Ray may have wrapped (RayTaskError and friends)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, EngineError):
            return current
        seen.add(id(current))
        current = getattr(current, "cause", None) or current.__cause__
    return None
