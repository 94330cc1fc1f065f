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
                 code: str | None = None, type_: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.headers = headers
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
                        media_type="application/json", headers=self.headers)

    @classmethod
    def from_engine(cls, err: EngineError) -> "APIError":
        return cls(err.status, err.message, param=err.param, code=err.code)

    @classmethod
    def from_validation(cls, err: ValidationError) -> "APIError":
        """Name the first offending field the way OpenAI does (``messages.0.role``).

        A union (``stop``: string or list) fails once per member; the deepest error
        (or, as deep, one that is not a type mismatch) is the member the value was
        meant for (``stop.1``, not "not a string")."""
        errors = err.errors(include_url=False)
        field = errors[0]["loc"][:1]
        first = max((e for e in errors if e["loc"][:1] == field),
                    key=lambda e: (len(e["loc"]), not e["type"].endswith("_type")))
        loc = [p for p in first["loc"] if not _is_union_tag(p)]
        key = None
        if loc and loc[0] in _MAP_PARAMS and len(loc) > 1:
            key, loc = loc[1], loc[:1]  # a map's key is data, not a parameter name
        param = ".".join(str(p) for p in loc) or None
        message = first["msg"]
        if first["type"] == "missing":
            message = f"Missing required parameter: '{param}'."
        elif param:
            where = f" (key {key!r})" if key is not None else ""
            message = f"Invalid value for '{param}'{where}: {message}"
        return cls(400, message, param=param,
                   code="missing_required_parameter" if first["type"] == "missing"
                   else "invalid_value")


_MAP_PARAMS = {"logit_bias", "metadata"}
_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


def _is_union_tag(part: object) -> bool:
    """Pydantic names the union member in error locations (``content.str``); clients
    want the field (``content``)."""
    return isinstance(part, str) and (part in _TYPE_TAGS or "[" in part
                                      or part.startswith("constrained-"))


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
