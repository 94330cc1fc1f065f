"""HEAppE provider: worker jobs through the HEAppE middleware (REST via py4heappe v6).

Why HEAppE: centres that give users no login shell, or want per-project
accounting, expose SLURM/PBS through HEAppE, which runs only *command templates*
an admin registered.  So the worker job is one template, defined with its value
encoding in ``heappe_template`` (``command_template()``, docs/heappe.md); this
module submits jobs of it and checks every value is shell-inert before it goes.

The Ray token is a template parameter: it sits in HEAppE's database and in the
generated batch script (readable by the user and the centre's admins).  Use a
token for this deployment only and rotate it, or set ``send_token=False`` and
register a template that exports RAY_AUTH_TOKEN_PATH to a 0600 file instead.

- Sessions, timeouts and error mapping: ``heappe_session``.
- HEAppE has no TIMEOUT state: a job that Failed at its wall-time end is
  TIMEOUT, so the pool does not count a normal end as a failure.
- The job name ends with the wall-time (``.w3600``) so a restarted head that
  re-adopts job ids can still compute wall-time ends.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any

from py4heappe.heappe_v6 import core as hp
from pydantic import BaseModel, ConfigDict, Field, StrictInt, model_validator

from cluster.providers.base import (
    JobInfo,
    JobState,
    Provider,
    ProviderError,
    WorkerSpec,
)

# Re-exported: docs/heappe.md and the tests import these from here.
from cluster.providers.heappe_session import (  # noqa: F401
    HeappeAuthError,
    HeappeNotFound,
    HeappeRejected,
    HeappeSession,
)
from cluster.providers.heappe_template import (  # noqa: F401
    SAFE_VALUE,
    TEMPLATE_PARAMETERS,
    TOKEN_PARAMETER,
    command_template,
    preparation_script,
    template_values,
    unsafe_environment_variable,
    unsafe_template_value,
)

_NAME_CHARS = re.compile(r"[^A-Za-z0-9._-]+")
_WALLTIME_IN_NAME = re.compile(r"\.w(\d+)$")
TIMEOUT_SLACK_S = 90.0   # a Failed job that ended this close to its wall-time end timed out

# HEAppE JobState flags -> ours: Configuring 1, Submitted 2, Queued 4, Running 8, Finished 16,
# Failed 32, Canceled 64, WaitingForServiceAccount 128, Deleted 256.
_STATE_MAP: dict[int, JobState] = {
    1: JobState.PENDING, 2: JobState.PENDING, 4: JobState.PENDING, 128: JobState.PENDING,
    8: JobState.RUNNING, 16: JobState.COMPLETED, 32: JobState.FAILED, 64: JobState.CANCELLED,
    256: JobState.UNKNOWN}


class HeappeConfig(BaseModel):
    """Site settings (a pool's ``provider_options``); ids come from the centre's HEAppE
    (ClusterInformation API).

    Authentication: ``username`` with ``password``/``password_env``, or an
    OpenID access token (``token_kind="openid"``) or LEXIS token
    (``token_kind="lexis"``) from ``access_token``/``_env``/``_file``; env and
    file are re-read at each authentication, so an external refresher works.
    """

    model_config = ConfigDict(extra="forbid")

    base_url: str = Field(description="e.g. https://heappe.example.org (paths start /heappe/)")
    cluster_id: StrictInt = Field(description="HEAppE ClusterId")
    project_id: StrictInt = Field(description="HEAppE ProjectId (accounting)")
    command_template_id: StrictInt = Field(description="the registered worker template")
    cluster_node_type_id: StrictInt = Field(description="HEAppE ClusterNodeTypeId (queue)")
    file_transfer_method_id: StrictInt = Field(description="HEAppE FileTransferMethodId")
    username: str | None = None
    password: str | None = Field(default=None, description="prefer password_env")
    password_env: str | None = Field(default=None, description="env variable with the password")
    access_token: str | None = None
    access_token_env: str | None = None
    access_token_file: str | None = None
    token_kind: str = Field(default="openid", description="'openid' or 'lexis'")
    sub_project: str | None = Field(default=None, description=(
        "SubProjectIdentifier (accounting below the project)"))
    min_cores: int | None = Field(default=None, description="default: the pool's num_cpus")
    max_cores: int | None = None
    job_name_prefix: str = "hpcserve"
    send_token: bool = Field(default=True, description=(
        "False: the template supplies the Ray token itself"))
    extra_template_parameters: dict[str, str] = Field(default_factory=dict)
    connect_timeout_s: float = 10.0
    request_timeout_s: float = 30.0
    verify_ssl: bool = True
    ssl_ca_cert: str | None = None

    @model_validator(mode="after")
    def _check(self) -> "HeappeConfig":
        has_password = bool(self.username and (self.password is not None or self.password_env))
        has_token = bool(self.access_token or self.access_token_env or self.access_token_file)
        problems = [
            (not re.match(r"^https?://", self.base_url or ""), "base_url: an http(s) URL"),
            (has_password == has_token, "username with password/password_env, or one of "
             "access_token/access_token_env/access_token_file (exactly one way)"),
            (self.token_kind not in ("openid", "lexis"), "token_kind: 'openid' or 'lexis'"),
            (bool(self.min_cores and self.max_cores and self.min_cores > self.max_cores),
             "min_cores <= max_cores"),
            (any(len(k) > 20 or not SAFE_VALUE.match(str(v))
                 for k, v in self.extra_template_parameters.items()),
             "extra_template_parameters: identifiers <= 20 chars, values [A-Za-z0-9._:@/+=,-]")]
        wrong = [what for failed, what in problems if failed]
        if wrong:
            raise ValueError("heappe provider options: expected " + "; ".join(wrong))
        return self

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> HeappeConfig:
        """Build from a pool's ``provider_options``; unknown keys are named in the error."""
        known = set(cls.model_fields)
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(f"heappe provider_options: unknown field(s) {unknown}; "
                             f"expected some of {sorted(known)}")
        return cls(**dict(options))


class HeappeProvider(Provider):
    """Creates and submits the worker command template; polls CurrentInfoForJob."""

    name = "heappe"

    def __init__(self, config: HeappeConfig | None = None, **options: Any) -> None:
        if config is not None and options:
            raise TypeError("pass either a HeappeConfig or keyword options, not both")
        self.config = config if config is not None else HeappeConfig.from_options(options)
        self.session = HeappeSession(self.config)
        self._walltimes: dict[str, int] = {}
        self._nodes: dict[str, str] = {}

    @property
    def authentications(self) -> int:
        """How many session codes were obtained (observability)."""
        return self.session.authentications

    # ---- the Provider interface -------------------------------------------------

    def submit(self, spec: WorkerSpec) -> str:
        c = self.config
        task = hp.TaskSpecificationExt(
            name="worker", min_cores=c.min_cores or max(1, spec.num_cpus),
            max_cores=c.max_cores or c.min_cores or max(1, spec.num_cpus),
            walltime_limit=int(spec.walltime_s), cluster_node_type_id=c.cluster_node_type_id,
            command_template_id=c.command_template_id, is_rerunnable=False,
            template_parameter_values=[
                hp.CommandTemplateParameterValueExt(command_parameter_identifier=k,
                                                    parameter_value=v)
                for k, v in self.template_parameters(spec).items()],
            environment_variables=[hp.EnvironmentVariableExt(name=k, value=v)
                                   for k, v in self.environment_variables(spec).items()] or None)
        job = hp.JobSpecificationExt(
            name=self.job_name(spec), project_id=c.project_id, sub_project_identifier=c.sub_project,
            cluster_id=c.cluster_id, file_transfer_method_id=c.file_transfer_method_id,
            tasks=[task])
        created = self.session.jm("create_job_post", hp.CreateJobByProjectModel, job_specification=job)
        if created is None or created.id is None:
            raise ProviderError("CreateJob answered without a job id")
        job_id = str(created.id)
        try:
            self.session.jm("submit_job_put", hp.SubmitJobModel, created_job_info_id=created.id)
        except ProviderError as exc:
            self._recover_submit(job_id, exc)
        self._walltimes[job_id] = int(spec.walltime_s)
        return job_id

    def poll(self, job_ids: list[str]) -> dict[str, JobInfo]:
        result: dict[str, JobInfo] = {}
        for job_id in dict.fromkeys(str(j) for j in job_ids):
            if not job_id.isdigit():
                result[job_id] = JobInfo(job_id, JobState.UNKNOWN, reason="not a HEAppE job id")
                continue
            try:
                info = self.session.jm("current_info_for_job_get", submitted_job_info_id=int(job_id))
            except HeappeRejected as exc:
                if isinstance(exc, HeappeAuthError):
                    raise
                result[job_id] = JobInfo(job_id, JobState.UNKNOWN, reason=f"unknown to HEAppE: {exc}")
                continue
            result[job_id] = self._job_info(job_id, info)
        return result

    def cancel(self, job_id: str) -> None:
        if not str(job_id).isdigit():
            return
        try:
            self.session.jm("cancel_job_put", hp.CancelJobModel, submitted_job_info_id=int(job_id))
        except HeappeRejected as exc:
            if isinstance(exc, HeappeAuthError):
                raise
            state = self.poll([str(job_id)])[str(job_id)]
            if not state.state.terminal:
                raise ProviderError(f"CancelJob {job_id} refused while {state.state.value}: {exc}")

    def describe(self) -> str:
        c = self.config
        return (f"heappe: {c.base_url} cluster={c.cluster_id} project={c.project_id} "
                f"command_template={c.command_template_id} node_type={c.cluster_node_type_id}")

    # ---- building the submission ------------------------------------------------

    def job_name(self, spec: WorkerSpec) -> str:
        """<= 50 chars (HEAppE's limit), ends with the wall-time for re-adoption."""
        raw = _NAME_CHARS.sub("_", f"{self.config.job_name_prefix}-{spec.pool}-{spec.allocation_id}")
        return f"{raw[:40]}.w{min(int(spec.walltime_s), 9_999_999)}"

    def template_parameters(self, spec: WorkerSpec) -> dict[str, str]:
        """The values HEAppE substitutes into the template; all shell-inert."""
        raw = template_values(spec, send_token=self.config.send_token)
        raw.update(self.config.extra_template_parameters)
        problem = unsafe_template_value(raw)
        if problem:
            raise HeappeRejected(problem)
        return raw

    def environment_variables(self, spec: WorkerSpec) -> dict[str, str]:
        """spec.env minus the token (a template parameter), as HEAppE task variables."""
        env = {k: v for k, v in spec.env.items() if k != "RAY_AUTH_TOKEN"}
        problem = unsafe_environment_variable(env)
        if problem:
            raise HeappeRejected(problem)
        return env

    def _recover_submit(self, job_id: str, exc: ProviderError) -> None:
        """SubmitJob failed: keep the job if HEAppE did submit it, else delete the draft."""
        try:
            state = self.session.jm("current_info_for_job_get", submitted_job_info_id=int(job_id)).state
        except ProviderError as poll_exc:
            raise ProviderError(f"SubmitJob for HEAppE job {job_id} failed ({exc}); its state is "
                                f"unknown ({poll_exc}); a never-submitted draft does not run") from exc
        if state is not None and int(state) != 1:
            return        # the submit reached HEAppE; only its answer was lost
        try:
            self.session.jm("delete_job_delete", hp.DeleteJobModel, submitted_job_info_id=int(job_id))
        except ProviderError:
            pass          # best effort: a draft in Configuring never runs
        raise exc

    # ---- reading job info ---------------------------------------------------------

    def _job_info(self, job_id: str, info: Any) -> JobInfo:
        flag = int(info.state) if info.state is not None else -1
        state = _STATE_MAP.get(flag, JobState.UNKNOWN)
        task = info.tasks[0] if info.tasks else None
        reason = (task.error_message or task.reason or "") if task else ""
        if state is JobState.PENDING:
            return JobInfo(job_id, state, reason=reason)
        start = _epoch(info.start_time or (task.start_time if task else None))
        walltime = self._walltimes.get(job_id) or _walltime_from_name(info.name)
        end = start + walltime if start is not None and walltime else None
        if state is JobState.FAILED and end is not None:
            ended = _epoch(info.end_time or (task.end_time if task else None))
            if ended is not None and ended >= end - TIMEOUT_SLACK_S:
                state, reason = JobState.TIMEOUT, reason or "failed at its wall-time end"
        if state is JobState.UNKNOWN:
            reason = reason or f"HEAppE job state {flag}"
        node = self._nodes.get(job_id)
        if node is None and state is JobState.RUNNING and task is not None and task.id is not None:
            node = self._node_of(job_id, task.id)
        return JobInfo(job_id, state, node=node, start_time=start, end_time=end, reason=reason)

    def _node_of(self, job_id: str, task_id: int) -> str | None:
        try:
            ips = self.session.jm("allocated_nodes_ips_get", submitted_task_info_id=task_id)
        except HeappeRejected:
            return None
        if ips:
            self._nodes[job_id] = str(ips[0])
            return str(ips[0])
        return None

def _epoch(value: datetime | None) -> float | None:
    """HEAppE times are UTC; naive datetimes are read as UTC."""
    if value is None:
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=timezone.utc)
    return value.timestamp()


def _walltime_from_name(name: str | None) -> int | None:
    match = _WALLTIME_IN_NAME.search(name or "")
    return int(match.group(1)) if match else None
