"""A HEAppE-compatible test server whose jobs really run.

Why: no HEAppE can run here, and a mock of py4heappe would only test our
guesses.  This FastAPI app speaks HEAppE v6's wire format by parsing every
request with py4heappe's own request models and building every response with
its response models (serialized the way the client serializes), so the real
client talks HTTP to it.  It implements exactly what HeappeProvider uses:
password / OpenID / LEXIS authentication with expiring session codes (sliding,
as HEAppE does), CreateJob, SubmitJob, CurrentInfoForJob, CancelJob, DeleteJob,
AllocatedNodesIPs, with HEAppE's answers (401 "Session Code Authentication
Problem", ProblemDetails bodies).

Jobs run through a backing Provider (an in-test process provider, the local
provider, or SLURM): the registered worker command template's parameters are
mapped back to a WorkerSpec, the way the template's PreparationScript maps them
to the worker job's environment (heappe_state.py: the site, jobs and that mapping).

Run standalone (e.g. for pool rotation tests by hand):
    python tests/heappe_server/heappe_test_server.py --port 8990 --jobs-dir /tmp/hj
"""

from __future__ import annotations

import socket
import threading
import time
import uuid
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any, Self

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

# tests/heappe_server is on sys.path (tests/cluster/conftest.py, or run as a script);
# the tests import HeappeState and Site from here.
from heappe_state import FINAL_FLAGS, HeappeState, Job, Site, worker_spec
from py4heappe.heappe_v6 import core as hp

from cluster.providers.base import Provider, ProviderError
from cluster.providers.heappe_template import TEMPLATE_PARAMETERS, TOKEN_PARAMETER

_WIRE = hp.ApiClient()        # the client's own serializer


class HeappeError(Exception):
    def __init__(self, status: int, title: str, detail: str) -> None:
        super().__init__(detail)
        self.status, self.title, self.detail = status, title, detail


def create_app(state: HeappeState) -> FastAPI:
    app = FastAPI(title="HEAppE test server")
    site = state.site

    def answer(endpoint: str, work: Callable[[], Any]) -> JSONResponse:
        fault = state.faults.pop(endpoint, None)
        status, body = 200, None
        try:
            if fault and not fault[1]:
                raise HeappeError(fault[0], "Injected fault", f"{endpoint} failed (test)")
            with state.lock:
                body = _WIRE.sanitize_for_serialization(work())
            if fault:
                raise HeappeError(fault[0], "Injected fault", f"{endpoint} lost its answer (test)")
        except HeappeError as exc:
            status = exc.status
            body = _WIRE.sanitize_for_serialization(hp.ProblemDetails(
                title=exc.title, status=exc.status, detail=exc.detail))
        state.log.append((endpoint, status))
        return JSONResponse(status_code=status, content=body)

    async def parse(request: Request, model: Any) -> Any:
        try:
            return model.from_dict(await request.json())
        except Exception as exc:   # noqa: BLE001 - any malformed body is a 400, as in HEAppE
            raise HeappeError(400, "Bad Request", f"invalid {model.__name__}: {exc}") from exc

    def session(code: str | None) -> None:
        now = time.time()
        last = state.sessions.get(code or "")
        if last is None or now - last > site.session_ttl_s:
            state.sessions.pop(code or "", None)
            raise HeappeError(401, "Session Code Authentication Problem",
                              f'Session code "{code}" is not valid or expired.')
        state.sessions[code or ""] = now

    def new_session(ok: bool) -> str:
        if not ok:
            raise HeappeError(401, "Authentication Problem", "Invalid credentials.")
        code = str(uuid.uuid4())
        state.sessions[code] = time.time()
        state.auth_count += 1
        return code

    def job_of(job_id: int | None) -> Job:
        job = state.jobs.get(job_id or -1)
        if job is None:
            raise HeappeError(404, "Not Found", f"Job {job_id} does not exist.")
        return job

    @app.post("/heappe/UserAndLimitationManagement/AuthenticateUserPassword")
    async def auth_password(request: Request) -> JSONResponse:
        return await handle(request, "AuthenticateUserPassword", hp.AuthenticateUserPasswordModel,
                            lambda m: new_session(m.credentials is not None and site.users.get(
                                m.credentials.username or "") == m.credentials.password), False)

    @app.post("/heappe/UserAndLimitationManagement/AuthenticateUserOpenId")
    async def auth_openid(request: Request) -> JSONResponse:
        return await handle(request, "AuthenticateUserOpenId", hp.AuthenticateUserOpenIdModel,
                            lambda m: new_session(m.credentials is not None and
                                                  m.credentials.open_id_access_token
                                                  in site.openid_tokens), False)

    @app.post("/heappe/UserAndLimitationManagement/AuthenticateLexisToken")
    async def auth_lexis(request: Request) -> JSONResponse:
        return await handle(request, "AuthenticateLexisToken", hp.AuthenticateLexisTokenModel,
                            lambda m: new_session(m.credentials is not None and
                                                  m.credentials.open_id_access_token
                                                  in site.lexis_tokens), False)

    @app.post("/heappe/JobManagement/CreateJob")
    async def create_job(request: Request) -> JSONResponse:
        return await handle(request, "CreateJob", hp.CreateJobByProjectModel, _create)

    @app.put("/heappe/JobManagement/SubmitJob")
    async def submit_job(request: Request) -> JSONResponse:
        return await handle(request, "SubmitJob", hp.SubmitJobModel, _submit)

    @app.put("/heappe/JobManagement/CancelJob")
    async def cancel_job(request: Request) -> JSONResponse:
        return await handle(request, "CancelJob", hp.CancelJobModel, _cancel)

    @app.delete("/heappe/JobManagement/DeleteJob")
    async def delete_job(request: Request) -> JSONResponse:
        return await handle(request, "DeleteJob", hp.DeleteJobModel, _delete)

    @app.get("/heappe/JobManagement/CurrentInfoForJob")
    def current_info(SessionCode: str | None = None,  # noqa: N803 - HEAppE's query names
                     SubmittedJobInfoId: int | None = None) -> JSONResponse:
        def work() -> Any:
            session(SessionCode)
            job = job_of(SubmittedJobInfoId)
            state.refresh(job)
            return _info(job)
        return answer("CurrentInfoForJob", work)

    @app.get("/heappe/JobManagement/AllocatedNodesIPs")
    def nodes_ips(SessionCode: str | None = None,  # noqa: N803
                  SubmittedTaskInfoId: int | None = None) -> JSONResponse:
        def work() -> list[str]:
            session(SessionCode)
            job = next((j for j in state.jobs.values() if j.task_id == SubmittedTaskInfoId), None)
            if job is None:
                raise HeappeError(404, "Not Found", f"Task {SubmittedTaskInfoId} does not exist.")
            state.refresh(job)
            return [_ip(job.node)] if job.state == 8 and job.node else []
        return answer("AllocatedNodesIPs", work)

    async def handle(request: Request, endpoint: str, model: Any,
                     work: Callable[[Any], Any], with_session: bool = True) -> JSONResponse:
        try:
            m = await parse(request, model)
        except HeappeError as exc:
            error = exc  # ``exc`` is unbound once the except block ends
            return answer(endpoint, lambda: _raise(error))

        def run() -> Any:
            if with_session:
                session(m.session_code)
            return work(m)
        return answer(endpoint, run)

    def _create(m: Any) -> Any:
        spec = m.job_specification
        if spec is None or not spec.tasks or len(spec.tasks) != 1:
            raise HeappeError(400, "Bad Request", "exactly one task expected")
        task = spec.tasks[0]
        checks = {"ClusterId": (spec.cluster_id, site.cluster_id),
                  "ProjectId": (spec.project_id, site.project_id),
                  "FileTransferMethodId": (spec.file_transfer_method_id,
                                           site.file_transfer_method_id),
                  "CommandTemplateId": (task.command_template_id, site.command_template_id),
                  "ClusterNodeTypeId": (task.cluster_node_type_id, site.cluster_node_type_id)}
        for name, (got, want) in checks.items():
            if got != want:
                raise HeappeError(400, "Bad Request", f"{name} {got} is not available")
        if not task.walltime_limit or not 0 < task.walltime_limit <= site.max_walltime_s:
            raise HeappeError(400, "Bad Request", f"WalltimeLimit {task.walltime_limit} exceeds "
                                                  f"the node type's {site.max_walltime_s} s")
        if not task.min_cores or (task.max_cores or 0) < task.min_cores:
            raise HeappeError(400, "Bad Request", "MinCores/MaxCores invalid")
        given = {v.command_parameter_identifier for v in task.template_parameter_values or []}
        known = {p.identifier for p in TEMPLATE_PARAMETERS}
        missing, unknown = known - given - {TOKEN_PARAMETER}, given - known
        if missing or unknown:
            raise HeappeError(400, "Bad Request", f"template parameters missing {sorted(missing)} "
                                                  f"unknown {sorted(unknown)}")
        job = Job(next(state.ids), next(state.ids), spec)
        state.jobs[job.id] = job
        return _info(job)

    def _submit(m: Any) -> Any:
        job = job_of(m.created_job_info_id)
        if job.state != 1:
            raise HeappeError(400, "Bad Request", f"Job {job.id} was already submitted")
        job.submitted = time.time()
        try:
            job.backing_id = state.backing.submit(worker_spec(job.spec))
            job.state = 2
        except (ProviderError, ValueError) as exc:
            job.state, job.error, job.end = 32, f"submission failed: {exc}", time.time()
        return _info(job)

    def _cancel(m: Any) -> Any:
        job = job_of(m.submitted_job_info_id)
        state.refresh(job)
        if job.state not in FINAL_FLAGS:
            if job.backing_id is not None:
                state.backing.cancel(job.backing_id)
            job.state, job.end = 64, time.time()
        return _info(job)

    def _delete(m: Any) -> str:
        job = job_of(m.submitted_job_info_id)
        state.refresh(job)
        if job.state in (2, 4, 8):
            raise HeappeError(400, "Bad Request", f"Job {job.id} is running; cancel it first")
        job.state = 256
        return f"Job {job.id} was deleted"

    return app


def _info(job: Job) -> Any:
    """The job as HEAppE's SubmittedJobInfoExt (times in UTC)."""
    def dt(t: float | None) -> datetime | None:
        return datetime.fromtimestamp(t, tz=timezone.utc) if t is not None else None
    task = hp.SubmittedTaskInfoExt(
        id=job.task_id, name=job.spec.tasks[0].name, state=hp.TaskStateExt(job.state),
        start_time=dt(job.start), end_time=dt(job.end), error_message=job.error or None,
        node_type=hp.ClusterNodeTypeForTaskExt(id=job.spec.tasks[0].cluster_node_type_id,
                                               name="test-node-type"))
    return hp.SubmittedJobInfoExt(
        id=job.id, name=job.spec.name, state=hp.JobStateExt(job.state),
        creation_time=dt(job.created), submit_time=dt(job.submitted), start_time=dt(job.start),
        end_time=dt(job.end), tasks=[task])


def _ip(node: str) -> str:
    try:
        return socket.gethostbyname(node)
    except OSError:
        return node


def _raise(exc: Exception) -> Any:
    raise exc


class HeappeServer:
    """Runs the app with uvicorn in a thread; stop() and start() again keep the state."""

    def __init__(self, state: HeappeState, port: int, host: str = "127.0.0.1") -> None:
        self.state, self.host, self.port = state, host, port
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def provider_options(self, **overrides: Any) -> dict[str, Any]:
        """HeappeProvider options (a pool's ``provider_options``) for this site's first user."""
        site = self.state.site
        username, password = next(iter(site.users.items()))
        return {"base_url": self.url, "username": username, "password": password,
                "cluster_id": site.cluster_id, "project_id": site.project_id,
                "command_template_id": site.command_template_id,
                "cluster_node_type_id": site.cluster_node_type_id,
                "file_transfer_method_id": site.file_transfer_method_id, **overrides}

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, timeout: float = 15.0) -> None:
        config = uvicorn.Config(create_app(self.state), host=self.host, port=self.port,
                                log_level="warning", lifespan="off", access_log=False)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name="heappe-test-server",
                                        daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"HEAppE test server did not start on {self.url}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self._server is not None and self._thread is not None:
            self._server.should_exit = True
            self._thread.join(timeout=15)
        self._server = self._thread = None


def main() -> None:
    import argparse
    from pathlib import Path

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, default=8990)
    parser.add_argument("--jobs-dir", required=True)
    parser.add_argument("--job-script", default=str(Path(__file__).parents[2] / "cluster"
                                                    / "worker_job.sh"))
    parser.add_argument("--backing", choices=("process", "local"), default="process")
    parser.add_argument("--session-ttl", type=float, default=900.0)
    args = parser.parse_args()
    if args.backing == "local":
        from cluster.providers.local import LocalProvider  # type: ignore[import-not-found]
        backing: Provider = LocalProvider(args.jobs_dir)
    else:
        from process_provider import ProcessProvider
        backing = ProcessProvider(args.jobs_dir, args.job_script)
    server = HeappeServer(HeappeState(backing, Site(session_ttl_s=args.session_ttl)), args.port)
    server.start()
    print(f"HEAppE test server on {server.url}; Ctrl-C stops it", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        server.stop()
        backing.close() if hasattr(backing, "close") else None


if __name__ == "__main__":
    main()
