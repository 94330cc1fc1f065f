"""Schemathesis checks for hpcserve's OpenAI surface (``SCHEMATHESIS_HOOKS=<this file>``).

Loaded by the ``schemathesis`` CLI in the tools venv (``.venv-tools``), not by pytest
(the name has no ``test_`` prefix).  ``openai_error_shape``: every response that is
not a 2xx is JSON of exactly OpenAI's error shape; every event stream ends with
``[DONE]`` after JSON events, none of them an error (the engine never fails here);
schemathesis reads only the first 20 events of a stream, then ``[DONE]`` is not required.
"""

from __future__ import annotations

import json

import schemathesis

ERROR_KEYS = {"message", "type", "param", "code"}
CHUNK_OBJECTS = {"chat.completion.chunk", "text_completion"}


def _content_type(response) -> str:
    values = response.headers.get("content-type") or [""]
    return values[0].split(";")[0].strip().lower()


@schemathesis.check
def openai_error_shape(ctx, response, case):
    """Non-2xx: ``{"error": {"message": str, "type": str, "param": str|null,
    "code": str|null}}`` and nothing else; 2xx event streams: well-formed, no error."""
    ctype = _content_type(response)
    if 200 <= response.status_code < 300:
        if ctype == "text/event-stream":  # schemathesis reads at most 20 events
            _check_stream(response.content.decode("utf-8"), complete=not response.stream_cut_short)
        return None
    if ctype != "application/json":
        raise AssertionError(f"{response.status_code} with Content-Type {ctype!r}, not JSON")
    try:
        body = json.loads(response.content)
    except ValueError:
        raise AssertionError(f"{response.status_code} body is not JSON: "
                             f"{response.content[:200]!r}") from None
    if not isinstance(body, dict) or set(body) != {"error"} or not isinstance(body["error"], dict):
        raise AssertionError(f"not an OpenAI error body: {body!r}")
    error = body["error"]
    if set(error) != ERROR_KEYS:
        raise AssertionError(f"error keys {sorted(error)} != {sorted(ERROR_KEYS)}")
    if not (isinstance(error["message"], str) and error["message"]
            and isinstance(error["type"], str) and error["type"]):
        raise AssertionError(f"error message/type must be non-empty strings: {error!r}")
    for key in ("param", "code"):
        if error[key] is not None and not isinstance(error[key], str):
            raise AssertionError(f"error.{key} must be a string or null: {error!r}")
    return None


def _check_stream(text: str, complete: bool) -> None:
    events = [e for e in text.replace("\r\n", "\n").split("\n\n") if e.strip()]
    if complete and (not events or events[-1] != "data: [DONE]"):
        raise AssertionError(f"event stream does not end with [DONE]: {text[-200:]!r}")
    if events and events[-1] == "data: [DONE]":
        events.pop()
    for event in events:
        if not event.startswith("data: "):
            raise AssertionError(f"not a data event: {event[:200]!r}")
        try:
            data = json.loads(event[6:])
        except ValueError:
            raise AssertionError(f"event is not JSON: {event[:200]!r}") from None
        if "error" in data:
            raise AssertionError(f"error event in a 200 stream: {data!r}")
        if data.get("object") not in CHUNK_OBJECTS:
            raise AssertionError(f"not a completion chunk: {data!r}")
