"""``BatchService``: one Serve replica on the head that owns files and batches.

The HTTP endpoints (``serve_app.api.files``, ``serve_app.api.batches``) run in the
ingress replicas -- on the head (``routed``) or on the workers (``direct``) -- and
call this deployment through its handle; it keeps the files under ``files_dir``
(uploads arrive in 1 MiB parts, downloads leave as a stream of them: a 200 MB file
never travels as one message) and their metadata and every batch's state in
``store``.

Each batch runs here as a ``runner.BatchRun`` task.  Its lines go to the model's
engine deployment (``engine-<model>``, found by name in the app: the routed
engine deployment, or with ``direct`` the replica that also answers HTTP) through
``generate``, at most ``max_concurrency`` lines at once over all batches and, per
model, as many as its engines start promptly (``pace``).  Serve
restarts a replica that dies; the new one resumes every unfinished batch from its
files (``runner``).  Usage goes to the access ledger like interactive requests'
(endpoint ``batch``), resent after a restart (the ledger keeps a request id once).

Methods answer ``{"status": 200, "body": ...}`` or an error's status and
OpenAI error body, which the endpoint turns into the response.  They are all
``async``: Serve runs a sync method in a thread, and the runs' state lives on the
replica's event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
import uuid
from pathlib import Path
from typing import Any

from ray import serve

from serve_app.access.client import AccessClient
from serve_app.batch import protocol, store
from serve_app.batch.pace import Pace
from serve_app.batch.protocol import ACTIVE, CHUNK, BatchCreateRequest, file_too_large
from serve_app.batch.lines import append_line
from serve_app.batch.runner import BatchRun
from serve_app.config import AppConfig, ConfigError
from serve_app.errors import APIError

log = logging.getLogger("hpcserve.batch")

_PROGRESS_S = 1.0          # batch objects saved this often while they change
_SWEEP_S = 600.0           # expired files deleted this often


def ok(body: Any) -> dict[str, Any]:
    return {"status": 200, "body": body}


def fail(err: APIError) -> dict[str, Any]:
    return {"status": err.status, "body": err.body()}


def _not_found(kind: str, object_id: str) -> dict[str, Any]:
    return fail(APIError(404, f"No such {kind}: '{object_id}'.", code="not_found"))


class BatchServer:
    def __init__(self, config: dict[str, Any], ledger: Any = None,
                 model_apps: dict[str, str] | None = None):
        """``model_apps``: model -> the application of its own it is served by."""
        self.config = AppConfig.model_validate(config)
        self.model_apps = model_apps or {}
        self.cfg = self.config.batch
        missing = self.cfg.paths_missing()
        if missing:
            raise ConfigError(f"batch: {', '.join(missing)} must be set (hpcserve up sets "
                              "them under its home; with `serve deploy`, give the paths)")
        self.models = {m.name: m for m in self.config.models}
        self.max_retries = self.config.max_retries
        self.files_dir = Path(self.cfg.files_dir)
        self.files_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        for stale in self.files_dir.glob(".upload-*"):  # uploads cut off by a restart
            stale.unlink(missing_ok=True)
        self.conn = store.connect(self.cfg.store)
        self.semaphore = asyncio.Semaphore(self.cfg.max_concurrency)
        self.runs: dict[str, BatchRun] = {}
        self.uploads: dict[str, dict[str, Any]] = {}
        self._engines: dict[str, Any] = {}
        self.paces: dict[str, Pace] = {}
        self._tasks: set[asyncio.Task] = set()
        self._started = False
        self.access = None
        if ledger is not None and self.config.ledger_on:
            self.access = AccessClient(ledger, self.config.access.sync_interval_s)
        try:
            self.app_name = serve.get_replica_context().app_name
        except Exception:  # outside Serve (unit tests)
            self.app_name = None
        with contextlib.suppress(RuntimeError):
            asyncio.get_running_loop()
            self._start()

    # ---- lifecycle ------------------------------------------------------------------
    def _start(self) -> None:
        """Resume unfinished batches and start the background work, once, on the
        replica's event loop (every method and the health check call it)."""
        if self._started:
            return
        self._started = True
        if self.access is not None:
            self.access.start()
        self._spawn(self._background())
        for row in store.batches_with_status(self.conn, ACTIVE):
            log.info("resuming batch %s (%s)", row["object"]["id"], row["object"]["status"])
            self._launch(row["object"], row["internal"], row["owner"])

    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _launch(self, obj: dict[str, Any], internal: dict[str, Any], owner: str) -> None:
        run = BatchRun(self, obj, internal, owner, self.cfg.cancel_grace_s)
        self.runs[run.id] = run

        async def go() -> None:
            try:
                await run.run()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("batch %s stopped by an error; it resumes when the "
                              "service restarts", run.id)
            finally:
                self.save(run.obj)
                self.runs.pop(run.id, None)
        self._spawn(go())

    async def _background(self) -> None:
        last_sweep = 0.0
        while True:
            await asyncio.sleep(_PROGRESS_S)
            for run in list(self.runs.values()):
                if run.dirty:
                    run.dirty = False
                    self.save(run.obj)
            if time.monotonic() - last_sweep > _SWEEP_S:
                last_sweep = time.monotonic()
                self._sweep()

    def _sweep(self) -> None:
        for row in store.expired_files(self.conn, time.time()):
            if store.file_in_use(self.conn, row["id"], ACTIVE):
                continue
            store.delete_file(self.conn, row["id"])
            Path(row["path"]).unlink(missing_ok=True)
            log.info("file %s expired", row["id"])

    async def check_health(self) -> None:
        self._start()

    # ---- what runs call -------------------------------------------------------------
    def engine(self, model: str) -> Any:
        handle = self._engines.get(model)
        if handle is None:
            name = self.models[model].deployment_options()["name"]
            app = self.model_apps.get(model, self.app_name)
            handle = serve.get_deployment_handle(name, app, _check_exists=False
                                                 ).options(stream=True)
            self._engines[model] = handle
        return handle

    def pace(self, model: str) -> Pace:
        pace = self.paces.get(model)
        if pace is None:
            pace = self.paces[model] = Pace(self.cfg.max_concurrency,
                                            self.cfg.adaptive_concurrency)
        return pace

    def save(self, obj: dict[str, Any]) -> None:
        try:
            store.save_batch(self.conn, obj)
        except Exception:  # the next save carries the same state
            log.exception("saving batch %s failed", obj["id"])

    def record_usage(self, run: BatchRun, request_id: str, model: str, prompt: int,
                     completion: int, status: int, latency_ms: float) -> None:
        if self.access is None or run.caller is None:
            return
        self.access.record({
            "request_id": request_id, "ts": time.time(), "key": run.caller.key,
            "project": run.caller.project, "user": run.caller.user, "model": model,
            "endpoint": "batch", "prompt_tokens": prompt, "completion_tokens": completion,
            "status": status, "latency_ms": latency_ms})

    def resend_usage(self, run: BatchRun) -> None:
        """Rows a killed replica may not have sent; the ledger skips known ids."""
        for request_id, model, prompt, completion, status in run.outcome.usage_rows:
            self.record_usage(run, request_id, model, prompt, completion, status, 0.0)

    def finish_files(self, run: BatchRun) -> None:
        """Register the output and error files (those with lines) as the batch's."""
        internal, now = run.internal, int(time.time())
        for kind in ("output", "error"):
            path = internal[f"{kind}_path"]
            size = os.path.getsize(path) if os.path.exists(path) else 0
            if not size:
                continue
            file_id = internal[f"{kind}_file_id"]
            store.add_file(self.conn, {
                "id": file_id, "owner": run.owner, "purpose": "batch_output",
                "filename": f"{run.id}_{kind}.jsonl", "bytes": size, "created_at": now,
                "expires_at": now + internal["output_expires_s"], "path": path})
            run.obj[f"{kind}_file_id"] = file_id

    # ---- files ------------------------------------------------------------------------
    async def file_begin(self, owner: str, filename: str, purpose: str,
                   expires_s: int | None) -> dict[str, Any]:
        self._start()
        if purpose not in protocol.FILE_PURPOSES:
            return fail(APIError(400, f"Invalid value for 'purpose': only "
                                 f"{list(protocol.FILE_PURPOSES)} is supported.",
                                 param="purpose", code="invalid_value"))
        token = uuid.uuid4().hex
        path = self.files_dir / f".upload-{token}"
        self.uploads[token] = {"owner": owner, "filename": filename, "purpose": purpose,
                               "expires_s": expires_s or self.cfg.file_expiry_s,
                               "path": path, "size": 0,
                               "fd": os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL,
                                             0o600)}
        return ok(token)

    async def file_part(self, token: str, data: bytes) -> dict[str, Any]:
        upload = self.uploads.get(token)
        if upload is None:
            return fail(APIError(503, "The upload was interrupted (the batch service "
                                 "restarted); upload the file again.", type_="server_error"))
        upload["size"] += len(data)
        if upload["size"] > self.cfg.max_file_bytes:
            await self.file_abort(token)
            return fail(file_too_large(self.cfg.max_file_bytes))
        append_line(upload["fd"], data)
        return ok(None)

    async def file_end(self, token: str) -> dict[str, Any]:
        upload = self.uploads.pop(token, None)
        if upload is None:
            return fail(APIError(503, "The upload was interrupted (the batch service "
                                 "restarted); upload the file again.", type_="server_error"))
        os.fsync(upload["fd"])
        os.close(upload["fd"])
        file_id = protocol.new_file_id()
        path = self.files_dir / f"{file_id}.jsonl"
        os.replace(upload["path"], path)
        now = int(time.time())
        row = {"id": file_id, "owner": upload["owner"], "purpose": upload["purpose"],
               "filename": upload["filename"], "bytes": upload["size"], "created_at": now,
               "expires_at": now + upload["expires_s"], "path": str(path)}
        store.add_file(self.conn, row)
        return ok(protocol.file_object(row))

    async def file_abort(self, token: str) -> None:
        upload = self.uploads.pop(token, None)
        if upload is not None:
            os.close(upload["fd"])
            Path(upload["path"]).unlink(missing_ok=True)

    async def file_get(self, owner: str, file_id: str) -> dict[str, Any]:
        self._start()
        row = store.get_file(self.conn, owner, file_id)
        return _not_found("file", file_id) if row is None else ok(protocol.file_object(row))

    async def file_list(self, owner: str, purpose: str | None, after: str | None, limit: int,
                  order: str) -> dict[str, Any]:
        self._start()
        rows, more = store.list_files(self.conn, owner, purpose=purpose, after=after,
                                      limit=limit, order=order)
        return ok(protocol.page([protocol.file_object(r) for r in rows], more))

    async def file_delete(self, owner: str, file_id: str) -> dict[str, Any]:
        self._start()
        row = store.get_file(self.conn, owner, file_id)
        if row is None:
            return _not_found("file", file_id)
        user = store.file_in_use(self.conn, file_id, ACTIVE)
        if user is not None:
            return fail(APIError(409, f"The file '{file_id}' is the input of batch "
                                 f"'{user}', which has not finished; cancel it first.",
                                 code="file_in_use"))
        store.delete_file(self.conn, file_id)
        Path(row["path"]).unlink(missing_ok=True)
        return ok({"id": file_id, "object": "file", "deleted": True})

    async def file_content(self, owner: str, file_id: str):
        """The file's bytes in chunks (a streaming method: call with stream=True)."""
        row = store.get_file(self.conn, owner, file_id)
        if row is None:
            return
        with open(row["path"], "rb") as f:
            while chunk := f.read(CHUNK):
                yield chunk

    # ---- batches ------------------------------------------------------------------------
    async def batch_create(self, owner: str, caller: dict[str, Any] | None,
                     body: dict[str, Any]) -> dict[str, Any]:
        self._start()
        request = BatchCreateRequest.model_validate(body)
        row = store.get_file(self.conn, owner, request.input_file_id)
        if row is None:
            return _not_found("file", request.input_file_id)
        if row["purpose"] != "batch":
            return fail(APIError(400, f"The file '{request.input_file_id}' has purpose "
                                 f"'{row['purpose']}'; a batch's input must have purpose "
                                 "'batch'.", param="input_file_id", code="invalid_value"))
        batch_id = protocol.new_batch_id()
        obj = protocol.new_batch(batch_id, request, int(time.time()))
        output_id, error_id = protocol.new_file_id(), protocol.new_file_id()
        expires = (request.output_expires_after.seconds if request.output_expires_after
                   else self.cfg.file_expiry_s)
        internal = {"caller": caller, "input_path": row["path"],
                    "output_file_id": output_id, "error_file_id": error_id,
                    "output_path": str(self.files_dir / f"{output_id}.jsonl"),
                    "error_path": str(self.files_dir / f"{error_id}.jsonl"),
                    "max_lines": self.cfg.max_lines, "output_expires_s": expires}
        store.add_batch(self.conn, obj, owner, internal)
        self._launch(obj, internal, owner)
        return ok(obj)

    def _batch(self, owner: str, batch_id: str) -> dict[str, Any] | None:
        run = self.runs.get(batch_id)
        if run is not None and run.owner == owner:
            return run.obj  # live counts
        row = store.get_batch(self.conn, owner, batch_id)
        return None if row is None else row["object"]

    async def batch_get(self, owner: str, batch_id: str) -> dict[str, Any]:
        self._start()
        obj = self._batch(owner, batch_id)
        return _not_found("batch", batch_id) if obj is None else ok(obj)

    async def batch_list(self, owner: str, after: str | None, limit: int) -> dict[str, Any]:
        self._start()
        objs, more = store.list_batches(self.conn, owner, after=after, limit=limit)
        live = [self.runs[o["id"]].obj if o["id"] in self.runs else o for o in objs]
        return ok(protocol.page(live, more))

    async def batch_cancel(self, owner: str, batch_id: str) -> dict[str, Any]:
        self._start()
        obj = self._batch(owner, batch_id)
        if obj is None:
            return _not_found("batch", batch_id)
        if obj["status"] in ("cancelling", "cancelled"):
            return ok(obj)
        if obj["status"] not in ("validating", "in_progress"):
            return fail(APIError(409, f"Cannot cancel a batch with status "
                                 f"'{obj['status']}'.", code="invalid_state"))
        obj["status"], obj["cancelling_at"] = "cancelling", int(time.time())
        self.save(obj)
        run = self.runs.get(batch_id)
        if run is not None:
            run.stop("cancelled")
        return ok(obj)

    async def stats(self) -> dict[str, Any]:
        """For tests and operators: what each running batch has in flight."""
        return {"batches": {run.id: {"status": run.obj["status"],
                                     "inflight": len(run.inflight),
                                     "engine_requests": run.engine_requests}
                            for run in self.runs.values()},
                "models": {model: pace.state() for model, pace in self.paces.items()}}


BatchService = serve.deployment(name="batch", num_replicas=1, max_ongoing_requests=1000,
                                health_check_period_s=2, graceful_shutdown_timeout_s=5
                                )(BatchServer)


def batch_service(config: AppConfig, ledger: Any, on_head: dict[str, Any],
                  model_apps: dict[str, str] | None = None):
    """The bound deployment for ``build_app``, or None when ``batch.enabled`` is off."""
    if not config.batch.enabled:
        return None
    missing = config.batch.paths_missing()
    if missing:
        raise ConfigError(f"args.batch: {', '.join(missing)} must be set (`hpcserve up` "
                          "sets them under its home; with `serve deploy`, give the paths)")
    return BatchService.options(ray_actor_options=on_head).bind(config.model_dump(), ledger,
                                                               model_apps)
