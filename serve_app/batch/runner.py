"""One batch, from its input file to its output and error files.

``BatchRun`` drives the states: ``validating`` -> ``in_progress`` -> ``finalizing``
-> ``completed`` (or ``failed`` when no line is runnable); a cancel goes through
``cancelling`` to ``cancelled``, the completion window's end to ``expired``.  Lines
run through the same engine deployments and request translation as interactive
requests (``serve_app.api.generation.to_generate``, ``ResponseFramer.whole``).  What
is already written is the record of progress (``serve_app.batch.lines``): a run that
starts again runs exactly the lines without a result.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from typing import Any, Protocol

import orjson
from pydantic import ValidationError
from ray.exceptions import RayError

from serve_app.access.principal import Principal
from serve_app.api.generation import to_generate, whole_answer
from serve_app.batch import protocol
from serve_app.batch.lines import Outcome, Scan, append_line, open_append, scan
from serve_app.batch.protocol import ENDPOINT_KINDS, line_id
from serve_app.errors import APIError, as_engine_error
from serve_app.framing import ResponseFramer
from serve_app.openai_protocol import ChatCompletionRequest, CompletionRequest

log = logging.getLogger("hpcserve.batch")

BODY_MODELS = {"chat": ChatCompletionRequest, "completion": CompletionRequest}
MAX_LISTED_ERRORS = 1000  # in the batch object's ``errors``; the error file has all


# ---- running ----------------------------------------------------------------------
class _Stopped(Exception):
    """A line that the batch's cancel or expiry caught before it reached an engine."""


async def _timed(stream, pace):
    """The engine stream, its time to first token told to ``pace``."""
    sent, first = time.monotonic(), True
    async for item in stream:
        if first:
            pace.observe(time.monotonic() - sent, sent)
            first = False
        yield item


class Service(Protocol):
    """What a run needs from the batch service (``service.BatchServer``)."""

    models: dict[str, Any]
    semaphore: asyncio.Semaphore
    max_retries: int

    def engine(self, model: str) -> Any: ...
    def pace(self, model: str) -> Any: ...
    def save(self, obj: dict[str, Any]) -> None: ...
    def record_usage(self, run: "BatchRun", request_id: str, model: str, prompt: int,
                     completion: int, status: int, latency_ms: float) -> None: ...
    def resend_usage(self, run: "BatchRun") -> None: ...
    def finish_files(self, run: "BatchRun") -> None: ...


class BatchRun:
    def __init__(self, service: Service, obj: dict[str, Any], internal: dict[str, Any],
                 owner: str, cancel_grace_s: float):
        self.service, self.obj, self.internal, self.owner = service, obj, internal, owner
        self.cancel_grace_s = cancel_grace_s
        caller = internal.get("caller")
        self.caller = None if caller is None else Principal(
            key=caller["key"], project=caller["project"], user=caller.get("user", ""),
            models=tuple(caller["models"]), project_models=tuple(caller["project_models"]))
        self.kind = ENDPOINT_KINDS[obj["endpoint"]]
        self.stop_reason: str | None = None   # "cancelled" / "expired"
        self.dirty = False
        self.outcome = Outcome()
        self.inflight: set[asyncio.Task] = set()
        self.engine_requests = 0              # lines sent to an engine by this run
        self.runnable: list[tuple[int, int, int]] | None = None
        self._loaded = False
        self._fds: dict[str, int] = {}

    @property
    def id(self) -> str:
        return self.obj["id"]

    # ---- control ------------------------------------------------------------------
    def stop(self, reason: str) -> None:
        if self.stop_reason is None:
            self.stop_reason = reason

    def _now(self) -> int:
        return int(time.time())

    def _set(self, status: str, **times: int) -> None:
        self.obj["status"] = status
        self.obj.update(times)
        self.service.save(self.obj)
        self.dirty = False

    # ---- the states ---------------------------------------------------------------
    async def run(self) -> None:
        try:
            if self.obj["status"] != "validating":  # resumed: what is written counts
                await self._load()
                self.service.resend_usage(self)
            if self.obj["status"] == "validating":
                self._validated(await asyncio.to_thread(self._validate))
            if self.obj["status"] in ("in_progress", "cancelling"):
                await self._execute()
            if self.obj["status"] in ("finalizing", "cancelling"):
                await asyncio.to_thread(self._sync_files)
                self._finalize()
        finally:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()

    def _validate(self) -> Scan:
        """(In a thread.)  Scan the input, write the bad lines to the error file."""
        paths = self.internal
        checked = scan(paths["input_path"], self.obj["endpoint"])
        for path in (paths["output_path"], paths["error_path"]):
            with open(path, "wb"):
                pass  # a validation cut short starts over
        fd = self._fd("error_path")
        for e in checked.errors:
            append_line(fd, orjson.dumps({
                "id": line_id(self.id, e["line"]), "custom_id": e["custom_id"],
                "response": None, "error": {"code": e["code"], "message": e["message"],
                                            "line": e["line"]}}) + b"\n")
        os.fsync(fd)
        return checked

    def _validated(self, checked: Scan) -> None:
        self.obj["request_counts"] = {"total": checked.total, "completed": 0,
                                      "failed": len(checked.errors)}
        if checked.errors:
            self.obj["errors"] = {"object": "list", "data": [
                {k: e[k] for k in ("code", "message", "param", "line")}
                for e in checked.errors[:MAX_LISTED_ERRORS]]}
        limit = self.internal["max_lines"]
        if checked.total > limit or not checked.runnable:
            message = (f"The input file has {checked.total} requests; a batch may have at "
                       f"most {limit} (batch.max_lines)." if checked.total > limit else
                       "The input file has no valid request." if checked.total else
                       "The input file is empty.")
            errors = (self.obj.get("errors") or {}).get("data") or []
            self.obj["errors"] = {"object": "list", "data": [
                {"code": "too_many_requests" if checked.total > limit else "empty_batch",
                 "message": message, "param": None, "line": None}, *errors]}
            self.service.finish_files(self)
            self._set("failed", failed_at=self._now())
            return
        self.runnable = checked.runnable
        # a cancel that came while validating stands
        self._set("cancelling" if self.stop_reason else "in_progress",
                  in_progress_at=self._now())

    async def _load(self) -> None:
        self.outcome = await asyncio.to_thread(
            Outcome.load, self.internal["output_path"], self.internal["error_path"])
        self._loaded = True
        self._update_counts()

    async def _execute(self) -> None:
        paths = self.internal
        if not self._loaded:
            await self._load()
        if self.runnable is None:  # resumed: the same scan finds the same lines
            self.runnable = (await asyncio.to_thread(
                scan, paths["input_path"], self.obj["endpoint"])).runnable
        if self.obj["status"] == "cancelling":
            self.stop("cancelled")
        remaining = self.obj["expires_at"] - time.time()
        expiry = asyncio.get_running_loop().call_later(max(0.0, remaining), self.stop,
                                                       "expired")
        try:
            with open(paths["input_path"], "rb") as source:
                for item in self.runnable:
                    if item[0] in self.outcome.done:
                        continue
                    if not await self._acquire():
                        break
                    task = asyncio.get_running_loop().create_task(self._line(source, item))
                    self.inflight.add(task)
                    task.add_done_callback(self.inflight.discard)
                await self._settle()
        finally:
            expiry.cancel()
        if self.stop_reason is not None:
            self._unfinished(self.stop_reason)
        if self.stop_reason == "expired":
            self.service.finish_files(self)
            self._update_counts()
            self._set("expired", expired_at=self._now())
        elif self.stop_reason == "cancelled":
            if self.obj["status"] != "cancelling":
                self.obj["cancelling_at"] = self._now()
            self._set("cancelling")
        else:
            self._set("finalizing", finalizing_at=self._now())

    async def _acquire(self) -> bool:
        """A slot of the service's concurrency, or False once the batch stops."""
        while self.stop_reason is None:
            try:
                async with asyncio.timeout(0.5):  # not wait_for: it can swallow a cancel
                    await self.service.semaphore.acquire()
                if self.stop_reason is None:
                    return True
                self.service.semaphore.release()
            except asyncio.TimeoutError:
                continue
        return False

    async def _settle(self) -> None:
        """Wait for the lines in flight: all of them normally; after a cancel at most
        ``cancel_grace_s``; at expiry none (they are abandoned, as OpenAI does)."""
        while self.inflight:
            if self.stop_reason == "expired":
                break
            timeout = self.cancel_grace_s if self.stop_reason == "cancelled" else 0.5
            done, _ = await asyncio.wait(set(self.inflight), timeout=timeout)
            if self.stop_reason == "cancelled" and not done:
                break
        abandoned = list(self.inflight)
        for task in abandoned:
            task.cancel()
        if abandoned:
            log.info("batch %s: %d running lines abandoned (%s)", self.id, len(abandoned),
                     self.stop_reason)
            await asyncio.gather(*abandoned, return_exceptions=True)

    def _unfinished(self, reason: str) -> None:
        """Every runnable line without a result gets an error line (``batch_cancelled``
        or ``batch_expired``), so each input line has exactly one result."""
        code, why = (("batch_expired", "This request could not be executed before the "
                      "completion window expired.") if reason == "expired" else
                     ("batch_cancelled", "This request was not executed: the batch was "
                      "cancelled."))
        fd = self._fd("error_path")
        with open(self.internal["input_path"], "rb") as source:
            for number, offset, length in self.runnable:
                if number in self.outcome.done:
                    continue
                source.seek(offset)
                custom_id = orjson.loads(source.read(length)).get("custom_id")
                self._write(fd, {"id": line_id(self.id, number), "custom_id": custom_id,
                                 "response": None, "error": {"code": code, "message": why}})

    def _sync_files(self) -> None:
        for name in ("output_path", "error_path"):
            os.fsync(self._fd(name))

    def _finalize(self) -> None:
        self.service.finish_files(self)
        self._update_counts()
        if self.obj["status"] == "cancelling":
            self._set("cancelled", cancelled_at=self._now())
        else:
            self._set("completed", completed_at=self._now())

    # ---- one line -----------------------------------------------------------------
    async def _line(self, source, item: tuple[int, int, int]) -> None:
        number, offset, length = item
        try:
            source.seek(offset)
            line = orjson.loads(source.read(length))
            rid = line_id(self.id, number)
            started = time.monotonic()
            try:
                status, body, model, usage = 200, *await self._call(line["body"], rid)
            except _Stopped:
                return  # no result: the cancel or expiry gives it its error line
            except APIError as err:
                status, body, model, usage = err.status, orjson.dumps(err.body()), \
                    line["body"].get("model"), None
            except Exception as exc:  # a bug of ours: the line still gets its result
                log.exception("batch %s line %d failed", self.id, number)
                err = APIError(500, f"internal error: {type(exc).__name__}",
                               type_="server_error")
                status, body, model, usage = 500, orjson.dumps(err.body()), None, None
            record = (b'{"id":' + orjson.dumps(rid) + b',"custom_id":'
                      + orjson.dumps(line["custom_id"]) + b',"response":{"status_code":'
                      + str(status).encode() + b',"request_id":' + orjson.dumps(rid)
                      + b',"body":' + body + b'},"error":null}\n')
            append_line(self._fd("output_path" if status == 200 else "error_path"), record)
            self.outcome.add({"id": rid, "response": {
                "status_code": status, "body": {"model": model, "usage": usage and {
                    "prompt_tokens": usage.prompt_tokens,
                    "completion_tokens": usage.completion_tokens}}}})
            self._update_counts()
            self.service.record_usage(self, rid, model if isinstance(model, str) else "",
                                      usage.prompt_tokens if usage else 0,
                                      usage.completion_tokens if usage else 0, status,
                                      (time.monotonic() - started) * 1000)
        finally:
            self.service.semaphore.release()

    async def _call(self, raw_body: dict[str, Any], rid: str):
        """(JSON body, model, usage) of a line's completion, or the ``APIError`` an
        interactive request with this body would get."""
        try:
            body = BODY_MODELS[self.kind].model_validate(raw_body)
        except ValidationError as err:
            raise APIError.from_validation(err) from None
        cfg = self.service.models.get(body.model)
        if cfg is None or (self.caller is not None and not self.caller.may_use(body.model)):
            visible = sorted(m for m in self.service.models
                             if self.caller is None or self.caller.may_use(m))
            raise APIError(404, f"The model '{body.model}' does not exist. Available: "
                           f"{visible}.", param="model", code="model_not_found")
        if body.stream:
            raise APIError(400, "'stream' is not supported in a batch.", param="stream",
                           code="unsupported_parameter")
        req = to_generate(self.kind, body, cfg, rid)
        framer = ResponseFramer(self.kind, body.model)
        pace = self.service.pace(body.model)
        await pace.acquire()
        try:
            if self.stop_reason is not None:  # stopped while waiting: no engine work
                raise _Stopped
            text, finish, usage, entries = await self._generate(req, pace)
        finally:
            pace.release()
        logprobs = framer.logprobs(entries) if req.extras.get("logprobs") else None
        return framer.whole(text, finish, usage, logprobs), body.model, usage

    async def _generate(self, req, pace):
        """The engine's whole answer; a replica that dies mid-line is retried from the
        start on another (nothing of the line was written yet)."""
        handle = self.service.engine(req.model)
        attempt = 0
        while True:
            attempt_req = req.model_copy(update={
                "request_id": f"{req.request_id}-{uuid.uuid4().hex[:8]}"})
            try:
                self.engine_requests += 1
                stream = _timed(handle.generate.remote(attempt_req), pace)
                return (await whole_answer(stream))[:4]  # no workflow extension: models only
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                engine_error = as_engine_error(exc)
                if engine_error is not None:
                    raise APIError.from_engine(engine_error) from None
                if not isinstance(exc, RayError) or attempt >= self.service.max_retries:
                    log.warning("batch line %s failed: %r", req.request_id, exc)
                    raise APIError(503, f"No engine replica for '{req.model}' could serve "
                                   f"the request ({type(exc).__name__}).",
                                   type_="server_error", code="engine_unavailable") from None
                attempt += 1
                await asyncio.sleep(min(2.0 ** attempt, 10.0))

    # ---- files and counts -----------------------------------------------------------
    def _fd(self, name: str) -> int:
        if name not in self._fds:
            self._fds[name] = open_append(self.internal[name])
        return self._fds[name]

    def _write(self, fd: int, record: dict[str, Any]) -> None:
        append_line(fd, orjson.dumps(record) + b"\n")
        self.outcome.add(record)

    def _update_counts(self) -> None:
        o = self.outcome
        self.obj["request_counts"] = {"total": self.obj["request_counts"]["total"],
                                      "completed": o.completed, "failed": o.failed}
        self.obj["usage"] = protocol.usage_object(o.prompt_tokens, o.completion_tokens)
        self.obj["model"] = self.obj.get("model") or o.model
        self.dirty = True


