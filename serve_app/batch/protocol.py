"""OpenAI's file and batch objects, and the request bodies of the batch endpoints.

Shapes follow OpenAI's API reference (and the official client's models): a file is
``{"id", "object": "file", "bytes", "created_at", "expires_at", "filename",
"purpose", "status", "status_details"}``; a batch carries every ``*_at`` timestamp,
``request_counts``, ``usage``, ``errors`` and the output and error file ids.  An
input line is ``{"custom_id", "method", "url", "body"}``; an output line
``{"id", "custom_id", "response": {"status_code", "request_id", "body"}, "error"}``.
"""

from __future__ import annotations

import re
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, field_validator

from serve_app.errors import APIError

# The batch endpoint -> the kind of generation (serve_app.api.generation).
ENDPOINT_KINDS = {"/v1/chat/completions": "chat", "/v1/completions": "completion"}
STATUSES = ("validating", "failed", "in_progress", "finalizing", "completed", "expired",
            "cancelling", "cancelled")
ACTIVE = ("validating", "in_progress", "finalizing", "cancelling")
FILE_PURPOSES = ("batch",)
# Upload parts and download chunks between ingress and service: each is one gRPC
# message between replicas, which Serve caps at 4 MiB
# (RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH).
CHUNK = 1024 * 1024
_WINDOW = re.compile(r"^([1-9][0-9]*)([smhd])$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def new_file_id() -> str:
    return "file-" + uuid.uuid4().hex[:24]


def new_batch_id() -> str:
    return "batch_" + uuid.uuid4().hex[:24]


def line_id(batch_id: str, line: int) -> str:
    """The output line's ``id`` (and its request id): the batch's and the input line's
    number, so a restarted runner knows from its own output which lines are done."""
    return f"batch_req_{batch_id.removeprefix('batch_')}_{line}"


def line_of(request_id: str) -> int:
    return int(request_id.rpartition("_")[2])


def window_seconds(window: str) -> int:
    """``"24h"`` (OpenAI's only value) or another duration: ``90s``, ``30m``, ``2d``."""
    match = _WINDOW.match(window)
    if not match:
        raise ValueError("expected a duration like '24h' (also s, m, d)")
    return int(match.group(1)) * _UNIT_S[match.group(2)]


class ExpiresAfter(BaseModel):
    model_config = ConfigDict(extra="forbid")
    anchor: Literal["created_at"]
    seconds: StrictInt = Field(ge=3600, le=2_592_000)


class BatchCreateRequest(BaseModel):
    """``POST /v1/batches``."""

    model_config = ConfigDict(extra="forbid")
    input_file_id: StrictStr = Field(min_length=1)
    endpoint: Literal["/v1/chat/completions", "/v1/completions"]
    completion_window: StrictStr
    metadata: dict[StrictStr, StrictStr] | None = Field(default=None, max_length=16)
    output_expires_after: ExpiresAfter | None = None

    @field_validator("completion_window")
    @classmethod
    def _window(cls, value: str) -> str:
        window_seconds(value)
        return value

    @field_validator("metadata")
    @classmethod
    def _metadata(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        for k, v in (value or {}).items():
            if len(k) > 64 or len(v) > 512:
                raise ValueError("keys are at most 64 characters, values at most 512")
        return value


def file_too_large(limit: int) -> APIError:
    return APIError(413, f"The file exceeds {limit} bytes (batch.max_file_bytes).",
                    code="file_too_large")


def file_object(row: Any) -> dict[str, Any]:
    return {"id": row["id"], "object": "file", "bytes": row["bytes"],
            "created_at": row["created_at"], "expires_at": row["expires_at"],
            "filename": row["filename"], "purpose": row["purpose"], "status": "processed",
            "status_details": None}


def new_batch(batch_id: str, body: BatchCreateRequest, now: int) -> dict[str, Any]:
    return {
        "id": batch_id, "object": "batch", "endpoint": body.endpoint, "model": None,
        "errors": None, "input_file_id": body.input_file_id,
        "completion_window": body.completion_window, "status": "validating",
        "output_file_id": None, "error_file_id": None, "created_at": now,
        "in_progress_at": None, "expires_at": now + window_seconds(body.completion_window),
        "finalizing_at": None, "completed_at": None, "failed_at": None, "expired_at": None,
        "cancelling_at": None, "cancelled_at": None,
        "request_counts": {"total": 0, "completed": 0, "failed": 0},
        "usage": usage_object(0, 0), "metadata": body.metadata}


def usage_object(prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    return {"input_tokens": prompt_tokens, "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": completion_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": prompt_tokens + completion_tokens}


def page(data: list[dict[str, Any]], has_more: bool) -> dict[str, Any]:
    return {"object": "list", "data": data,
            "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None, "has_more": has_more}
