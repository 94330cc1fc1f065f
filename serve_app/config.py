"""The arguments of ``serve_app.app:build_app``: what `serve deploy` changes in place.

Validated with pydantic so a bad config fails at deploy time with the field named
(``models.0.autoscaling.max_replicas: ...``) instead of as a replica crash later.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

from serve_app.access.config import AccessConfig
from serve_app.batch.config import BatchConfig
from serve_app.engines.base import ENGINES, check_model
from serve_app.workflows import WorkflowSpec

EngineKind = Literal["zmq", "vllm", "triton"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AutoscalingConfig(_Strict):
    """Passed through to Serve's ``autoscaling_config`` (same names)."""

    min_replicas: int = Field(default=1, ge=0)
    max_replicas: int = Field(default=1, ge=1)
    initial_replicas: int | None = Field(default=None, ge=0)
    target_ongoing_requests: float = Field(default=16, gt=0)
    upscale_delay_s: float = Field(default=5.0, ge=0)
    downscale_delay_s: float = Field(default=60.0, ge=0)
    metrics_interval_s: float = Field(default=2.0, gt=0)
    look_back_period_s: float = Field(default=10.0, gt=0)

    @model_validator(mode="after")
    def _bounds(self) -> "AutoscalingConfig":
        if self.max_replicas < self.min_replicas:
            raise ValueError("max_replicas must be >= min_replicas")
        return self


class ModelConfig(_Strict):
    name: str = Field(min_length=1, description="the `model` clients ask for")
    engine: EngineKind = "zmq"
    task: Literal["generate", "embed"] = Field("generate", description=(
        "generate: chat and completions; embed: /v1/embeddings (engines zmq and vllm; "
        "docs/embeddings.md). A request to the other kind of endpoint is a 400"))
    engine_args: dict[str, Any] = Field(default_factory=dict, description=(
        "the engine's own arguments; their names depend on `engine` (below) and a "
        "misspelt one is an error naming it"))
    num_replicas: int = Field(default=1, ge=0)
    autoscaling: AutoscalingConfig | None = None
    max_ongoing_requests: int = Field(default=256, ge=1)
    resources: dict[str, float] = Field(default_factory=lambda: {"hpc_slot": 1.0})
    num_cpus: float = Field(default=0.0, ge=0)
    num_gpus: float = Field(default=0.0, ge=0)
    max_model_len: int | None = Field(default=None, gt=0,
                                      description="shown in /v1/models; engines enforce it")
    stream_interval_ms: float = Field(
        default=20.0, ge=0, description="hold streamed text at most this long to send it in "
        "fewer chunks (first and last chunk never wait); 0: every engine output at once")
    cold_start_timeout_s: float = Field(default=600.0, gt=0, description=(
        "how long a request waits for a model with no replica (scaled to zero, its "
        "batch job queued) before a 503 model_starting with Retry-After; enforced by "
        "the routed ingress (`auto` picks it for a model with autoscaling.min_replicas "
        "0; `direct` is refused for such a model)"))
    failover: bool | Literal["auto"] = Field(default="auto", description=(
        "a stream whose engine replica dies mid-stream continues on another replica "
        "from the text already sent: on `ingress: direct` (or `auto`) through the head's "
        "failover relay (the model gets an application of its own and HAProxy sends its "
        "requests through the relay; needs the Ray auth token, the default), on "
        "`routed` through the ingress. auto: on for an always-on generation model of an app "
        "at `/` on `direct` where no pool shares the head's cores (pools.shares_head_cores: SLURM and HEAppE pools "
        "by default), off where one does (the local provider); `hpcserve up`/`deploy` "
        "decide it, and a config deployed with `serve deploy` alone reads it as off"))
    health_check_period_s: float = Field(default=2.0, gt=0)
    health_check_timeout_s: float = Field(default=10.0, gt=0)
    graceful_shutdown_timeout_s: float = Field(default=20.0, ge=0)

    @model_validator(mode="after")
    def _engine_args(self) -> "ModelConfig":
        check_model(self.engine, self.task, self.engine_args)
        return self

    def deployment_options(self) -> dict[str, Any]:
        options: dict[str, Any] = {
            "name": f"engine-{self.name}",
            "max_ongoing_requests": self.max_ongoing_requests,
            "ray_actor_options": {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus,
                                  "resources": dict(self.resources)},
            "health_check_period_s": self.health_check_period_s,
            "health_check_timeout_s": self.health_check_timeout_s,
            "graceful_shutdown_timeout_s": self.graceful_shutdown_timeout_s,
            "graceful_shutdown_wait_loop_s": 1.0,
        }
        if self.autoscaling is not None:
            options["autoscaling_config"] = self.autoscaling.model_dump(exclude_none=True)
        else:
            options["num_replicas"] = self.num_replicas
        return options


class AppConfig(_Strict):
    models: list[ModelConfig] = Field(min_length=1)
    workflows: list[WorkflowSpec] = Field(default_factory=list, description=(
        "model names served by several calls of the models above, e.g. a tribunal "
        "(docs/workflows.md); they run in the routed ingress"))
    api_keys: list[str] = Field(default_factory=list,
                                description="accepted bearer tokens; empty: no auth")
    api_keys_file: str | None = Field(default=None, description="one key per line")
    max_request_bytes: int = Field(default=4 * 1024 * 1024, gt=0)
    max_retries: int = Field(default=3, ge=0,
                             description="routed ingress only: engine calls retried on "
                             "another replica (direct does not retry)")
    ingress_resources: dict[str, float] = Field(default_factory=lambda: {"serve_head": 0.001})
    access: AccessConfig = Field(default_factory=AccessConfig, description=(
        "managed keys, OIDC tokens, projects and their limits, the usage ledger "
        "(docs/access.md)"))
    batch: BatchConfig = Field(default_factory=BatchConfig, description=(
        "the Files and Batches API: batch inference on the app's engines (docs/batch.md)"))
    ingress: Literal["auto", "routed", "direct"] = Field(
        default="auto", description="routed: one ingress replica on the head routes to the "
        "engines and retries a failed stream on another replica; direct: the engine replicas "
        "answer HTTP themselves (one hop less; mid-stream failover only for models with "
        "failover on, through the head's relay; with several models, workflows or "
        "failover each always-on model gets an application of its own that HAProxy "
        "routes to by the request's model, and the app itself serves the rest); auto: "
        "direct while some model is always-on, routed otherwise")

    @model_validator(mode="after")
    def _unique_names(self) -> "AppConfig":
        names = [m.name for m in self.models]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"model names must be unique, repeated: {dupes}")
        return self

    @field_validator("workflows")
    @classmethod
    def _workflows_call_models(cls, value: list, info: ValidationInfo) -> list:
        """Each workflow has a name of its own and calls models of this app, never
        another workflow (so there are no cycles to look for)."""
        if "models" not in info.data:
            return value  # the models' own errors are reported
        models = [m.name for m in info.data["models"]]
        embedders = {m.name for m in info.data["models"] if m.task != "generate"}
        workflows = [w.name for w in value]
        problems: list[InitErrorDetails] = []

        def problem(loc: tuple, message: str, given: object) -> None:
            error = PydanticCustomError("workflow", "{message}", {"message": message})
            problems.append(InitErrorDetails(type=error, loc=loc, input=given))

        for i, workflow in enumerate(value):
            if workflow.name in models:
                problem((i, "name"), f"'{workflow.name}' is also a model's name; a "
                        "workflow needs a name of its own", workflow.name)
            elif workflows.index(workflow.name) != i:
                problem((i, "name"), f"workflow names must be unique, '{workflow.name}' "
                        "is repeated", workflow.name)
            for loc, model in workflow.model_fields_used():
                if model in embedders:
                    problem((i, *loc), f"'{model}' is an embedding model (task: embed); "
                            "a workflow's steps generate text", model)
                    continue
                if model in models:
                    continue
                if model in workflows:
                    problem((i, *loc), f"'{model}' is a workflow; a workflow calls models "
                            "only, not other workflows", model)
                else:
                    problem((i, *loc), f"unknown model '{model}'; the models are "
                            f"{models}", model)
        if problems:
            # expanded field by field into the config error (describe_validation_error)
            raise ValidationError.from_exception_data("workflows", problems)
        return value

    @model_validator(mode="after")
    def _store_for_managed_keys(self) -> "AppConfig":
        if self.access.managed_keys and not self.access.store:
            raise ValueError("access.store: managed_keys needs the head's access database "
                             "(`hpcserve up` sets it; with `serve deploy`, give its path)")
        return self

    @property
    def authenticated(self) -> bool:
        """Whether every request must present a credential."""
        return bool(self.api_keys or self.api_keys_file or self.access.managed_keys
                    or self.access.oidc)

    @property
    def ledger_on(self) -> bool:
        return self.authenticated and self.access.ledger and bool(self.access.store)

    @field_validator("ingress")
    @classmethod
    def _direct_model_that_may_go_cold(cls, value: str, info: ValidationInfo) -> str:
        models = info.data.get("models") or []
        if value == "direct" and len(models) == 1 and _may_go_cold(models) \
                and not info.data.get("workflows"):
            raise ValueError(
                "a model that scales to zero (models.0.autoscaling.min_replicas: 0) needs "
                "the routed ingress, which holds a request for it up to "
                "cold_start_timeout_s and then answers 503 model_starting; on 'direct' "
                "Serve's proxy holds it with no limit, and /v1/models with it.  Use "
                "'routed' or 'auto'")
        return value

    @property
    def ingress_mode(self) -> Literal["routed", "direct"]:
        """What ``auto`` stands for: ``direct`` while some model can have it.

        The routed ingress is a second Python process and a gRPC hop on every
        token's path: E2E P90 x1.07-1.23 of bare vLLM at 1-128 streams where
        ``direct`` is at parity (docs/benchmarks.md).  With several models (or
        workflows) ``direct`` gives each always-on model an application of its own
        and keeps the router for the rest, at the same cost as one model.  Only
        what needs the router takes it: a model that may scale to zero (with no
        replica, only the head's ingress can answer ``/v1/models`` with the model's
        state and bound a cold request's wait by ``cold_start_timeout_s``; an
        explicit ``direct`` is refused for it as the only model) and workflows (they
        call several models); a model with failover on gets an application
        of its own too, behind the failover relay; ``ingress: routed`` puts every
        model on the router.
        """
        if self.ingress != "auto":
            return self.ingress
        return "direct" if self._splittable() else "routed"

    def _splittable(self) -> list[str]:
        return [m.name for m in self.models if not _may_go_cold([m])]

    @property
    def own_app_models(self) -> list[str]:
        """The models served by an application of their own (``serve_app.layout``):
        with ``direct`` and several models, workflows or a model asking for
        failover (the relay reaches it at its route), every model that cannot scale
        to zero (the router holds a cold model's requests, bounded)."""
        if self.ingress_mode != "direct" or (len(self.models) == 1 and not self.workflows
                                              and self.models[0].failover is not True):
            return []
        return self._splittable()

    @property
    def failover_models(self) -> list[str]:
        """The models of an application of their own whose requests HAProxy sends
        through the failover relay (``cluster.failover_relay``)."""
        failover = {m.name for m in self.models if m.failover is True}  # "auto": decided
        return [m for m in self.own_app_models if m in failover]

    def load_api_keys(self) -> list[str]:
        keys = list(self.api_keys)
        if self.api_keys_file:
            with open(self.api_keys_file, encoding="utf-8") as f:
                keys += [line.strip() for line in f if line.strip()]
        return keys


def _may_go_cold(models: list[ModelConfig]) -> bool:
    return any(m.autoscaling is not None and m.autoscaling.min_replicas == 0 for m in models)


class ConfigError(ValueError):
    """A config problem, with the dotted path of the offending field."""


def _error_lines(err: ValidationError, prefix: tuple) -> list[str]:
    lines = []
    for e in err.errors(include_url=False):
        loc = (*prefix, *e["loc"])
        nested = (e.get("ctx") or {}).get("error")
        if isinstance(nested, ValidationError):  # a validator that validated a sub-model
            lines += _error_lines(nested, loc)
            continue
        where = ".".join(str(p) for p in loc if p != "")
        lines.append(f"{where or '<root>'}: {e['msg']}")
    return lines


def describe_validation_error(err: ValidationError, prefix: str = "") -> str:
    """One line per problem, each starting with the dotted path of its field
    (a sub-model a validator checked, e.g. provider options, included)."""
    return "invalid config:\n  " + "\n  ".join(_error_lines(err, (prefix,)))


def parse_app_config(args: dict[str, Any], prefix: str = "args") -> AppConfig:
    try:
        return AppConfig.model_validate(args or {})
    except ValidationError as err:
        raise ConfigError(describe_validation_error(err, prefix)) from None


assert set(ENGINES) == {"zmq", "vllm", "triton"}  # EngineKind mirrors the registry
