"""A batch's files, line by line: the input checked, the results read back, appends
that survive a crash.

``scan`` validates the input file (every bad line becomes an error line naming its
line number; the rest are the batch's runnable lines, kept as byte offsets, not
parsed requests, so a 200 MB file costs little memory).  ``Outcome.load`` reads back
what a batch has already written: the output and error files are the record of
progress, one line per finished input line, appended and flushed line by line, and
each line's ``id`` carries its input line number (``protocol.line_id``).  So a
runner that starts again -- the replica killed, the head restarted -- skips exactly
the lines that have a result and runs the others: no line lost, none twice.  A torn
last line (a write cut short) is cut off first (``repair_tail``).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

import orjson

from serve_app.batch.protocol import line_of

log = logging.getLogger("hpcserve.batch")


# ---- validation -----------------------------------------------------------------
@dataclass
class Scan:
    runnable: list[tuple[int, int, int]] = field(default_factory=list)  # line, offset, len
    errors: list[dict[str, Any]] = field(default_factory=list)  # line, custom_id, code...
    total: int = 0  # non-blank lines


def _bad(scan: Scan, line: int, code: str, message: str, custom_id: Any = None,
         param: str | None = None) -> None:
    scan.errors.append({"line": line, "custom_id": custom_id if isinstance(custom_id, str)
                        else None, "code": code, "param": param,
                        "message": f"Line {line}: {message}"})


def scan(path: str, endpoint: str) -> Scan:
    """The runnable lines and the bad ones (bad JSON, missing or duplicate
    ``custom_id``, a method other than POST, a ``url`` other than the batch's
    endpoint, a missing ``body``).  Blank lines are skipped; lines count from 1."""
    result = Scan()
    seen: dict[str, int] = {}
    offset = 0
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            start, offset = offset, offset + len(raw)
            if not raw.strip():
                continue
            result.total += 1
            try:
                item = orjson.loads(raw)
            except orjson.JSONDecodeError as err:
                _bad(result, number, "invalid_json", f"not valid JSON ({err})")
                continue
            if not isinstance(item, dict):
                _bad(result, number, "invalid_json", "a line must be a JSON object")
                continue
            custom_id = item.get("custom_id")
            if not isinstance(custom_id, str) or not custom_id:
                _bad(result, number, "missing_custom_id",
                     "'custom_id' must be a non-empty string", param="custom_id")
                continue
            if custom_id in seen:
                _bad(result, number, "duplicate_custom_id", f"custom_id {custom_id!r} "
                     f"is already used on line {seen[custom_id]}", custom_id, "custom_id")
                continue
            if item.get("method") != "POST":
                _bad(result, number, "invalid_method", f"'method' must be 'POST', not "
                     f"{item.get('method')!r}", custom_id, "method")
            elif item.get("url") != endpoint:
                _bad(result, number, "invalid_url", f"'url' {item.get('url')!r} is not "
                     f"the batch's endpoint {endpoint!r}", custom_id, "url")
            elif "body" not in item:
                _bad(result, number, "missing_body", "'body' is missing", custom_id, "body")
            elif not isinstance(item["body"], dict):
                _bad(result, number, "invalid_body", "'body' must be a JSON object",
                     custom_id, "body")
            else:
                seen[custom_id] = number
                result.runnable.append((number, start, len(raw)))
                continue
            seen.setdefault(custom_id, number)  # a bad line's custom_id is taken too
    return result


# ---- what is written already ----------------------------------------------------
def repair_tail(path: str) -> None:
    """Cut a torn last line (no newline, or not JSON) off ``path``."""
    try:
        size = os.path.getsize(path)
    except FileNotFoundError:
        return
    if size == 0:
        return
    with open(path, "rb+") as f:
        f.seek(max(0, size - 1))
        if f.read(1) == b"\n":
            return
        f.seek(0)
        data = f.read()
        keep = data.rfind(b"\n") + 1
        f.truncate(keep)
        log.warning("%s: cut a torn last line (%d bytes)", path, size - keep)


@dataclass
class Outcome:
    done: set[int] = field(default_factory=set)   # input line numbers with a result
    completed: int = 0
    failed: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    model: str | None = None
    usage_rows: list[tuple[str, str, int, int, int]] = field(default_factory=list)

    def add(self, record: dict[str, Any]) -> None:
        """Count one written line (``{"id", "custom_id", "response", "error"}``)."""
        self.done.add(line_of(record["id"]))
        response = record.get("response")
        if response is not None and response.get("status_code") == 200:
            self.completed += 1
            body = response.get("body") or {}
            usage = body.get("usage") or {}
            prompt, completion = usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0)
            self.prompt_tokens += prompt
            self.completion_tokens += completion
            self.model = self.model or body.get("model")
            self.usage_rows.append((record["id"], body.get("model") or "", prompt,
                                    completion, 200))
        else:
            self.failed += 1
            if response is not None:
                self.usage_rows.append((record["id"], "", 0, 0, response.get("status_code", 0)))

    @classmethod
    def load(cls, *paths: str) -> "Outcome":
        outcome = cls()
        for path in paths:
            repair_tail(path)
            if not os.path.exists(path):
                continue
            with open(path, "rb") as f:
                for raw in f:
                    if raw.strip():
                        outcome.add(orjson.loads(raw))
        return outcome


def append_line(fd: int, data: bytes) -> None:
    """One whole line per write (O_APPEND): a reader, or a runner after a crash, sees
    whole lines, or one torn last line that ``repair_tail`` cuts."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def open_append(path: str) -> int:
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
