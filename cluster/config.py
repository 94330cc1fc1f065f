"""hpcserve's config file: Ray Serve's own config plus an ``hpcserve:`` section.

One YAML so operators edit one file: everything but ``hpcserve:`` is passed to
Serve unchanged (``serve deploy`` semantics), ``hpcserve:`` holds the head and the
allocation pools.  Errors name the field (``hpcserve.pools.0.walltime_s: ...``).
"""

from __future__ import annotations

import copy
import ipaddress
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from cluster.providers import options_model
from serve_app.config import ConfigError, describe_validation_error, parse_app_config
from serve_app.layout import LAYOUT_ARG

ProviderKind = Literal["local", "slurm", "heappe"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class HeadConfig(_Strict):
    node_ip: str = Field(default="127.0.0.2", description="address workers reach the head at")
    gcs_port: int | None = Field(default=None, ge=1, le=65535, description="None: a free port")
    dashboard_port: int | None = Field(default=None, ge=1, le=65535)
    metrics_export_port: int | None = Field(default=None, ge=1, le=65535)
    auth: Literal["token", "none"] = "token"
    token_path: str | None = Field(default=None, description="default: RUN_DIR/../auth_token")
    env: dict[str, str] = Field(default_factory=dict, description="extra env for ray start")


class PoolConfig(_Strict):
    name: str = Field(min_length=1)
    provider: ProviderKind = "local"
    min_allocations: int = Field(default=1, ge=0, description=(
        "allocations kept serving whatever the demand (the hot floor); 0: the pool may "
        "go to zero"))
    max_allocations: int | None = Field(default=None, ge=1, description=(
        "cap on serving allocations when Serve wants more replicas than fit (default "
        "max(min_allocations, 1)); successors and draining jobs of a rotation come on top"))
    max_node_hours_per_day: float | None = Field(default=None, gt=0, description=(
        "node-hours this pool may use in any 24 h: used ones plus what running and "
        "queued jobs may still use (their wall-time); at the limit nothing more is "
        "submitted, not even a rotation's successor, and what runs is kept"))
    idle_release_s: float = Field(default=300, ge=0, description=(
        "an allocation above the floor whose node has had no replica this long is "
        "drained and its job cancelled"))
    walltime_s: int = Field(default=3600, ge=30)
    lead_time_s: float = Field(default=120, ge=0, description="initial successor lead time")
    lead_time_margin_s: float = Field(default=15, ge=0)
    warning_s: int = Field(default=60, ge=5, description="scheduler warning before wall-time")
    drain_deadline_s: int = Field(default=60, ge=1, description=(
        "DrainNode deadline; Serve stops the old replicas at deadline minus their "
        "graceful_shutdown_timeout_s, so it must cover a replica's start-up"))
    queue_timeout_s: float = Field(default=900, gt=0, description="replace jobs queued longer")
    num_cpus: int = Field(default=1, ge=0)
    num_gpus: int = Field(default=0, ge=0)
    resources: dict[str, float] = Field(default_factory=lambda: {"hpc_slot": 1.0})
    provider_options: dict[str, Any] = Field(default_factory=dict, description=(
        "the provider's own settings, typed per provider (docs/configuration.md)"))
    shares_head_cores: bool | None = Field(default=None, description=(
        "whether this pool's allocations run on the cores the head runs on; default: "
        "yes for the local provider (its jobs run on the head's machine), no for slurm "
        "and heappe (their jobs run on compute nodes; say yes for a cluster whose nodes "
        "include the head's). Where no pool does, `failover: auto` turns mid-stream "
        "failover on: the relay's CPU is then the head's own"))
    worker_env: dict[str, str] = Field(default_factory=dict, description=(
        "extra environment for the worker job (e.g. HPCSERVE_NODE_IP: auto-loopback "
        "when several jobs share one machine)"))

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, data: Any) -> Any:
        if isinstance(data, dict) and "allocations" in data:
            raise PydanticCustomError(
                "renamed", "'allocations' is now 'min_allocations' (the hot floor); "
                "'max_allocations' caps what demand may add")
        return data

    @model_validator(mode="after")
    def _check(self) -> "PoolConfig":
        if self.max_allocations is None:
            self.max_allocations = max(self.min_allocations, 1)
        if self.shares_head_cores is None:
            self.shares_head_cores = self.provider == "local"
        if self.max_allocations < self.min_allocations:
            raise ValueError("max_allocations must be >= min_allocations")
        if self.warning_s >= self.walltime_s:
            raise ValueError("warning_s must be shorter than walltime_s")
        return self

    @field_validator("provider_options")
    @classmethod
    def _typed_options(cls, value: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        """Checked now, so ``partion: gpu`` fails at ``hpcserve up`` naming the field,
        not later inside the detached control loop.  The dict is kept as written."""
        if "provider" not in info.data:
            return value
        # A ValidationError raised here is expanded, field by field, into the
        # config error's lines (serve_app.config.describe_validation_error).
        options_model(info.data["provider"]).model_validate(value)
        return value


class ClusterConfig(_Strict):
    head: HeadConfig = Field(default_factory=HeadConfig)
    allow_unauthenticated: bool = Field(default=False, description=(
        "serve beyond loopback with no credentials (`up` warns); without it a non-loopback "
        "http_options.host needs api_keys, api_keys_file, access.managed_keys or "
        "access.oidc in every app's args"))
    pools: list[PoolConfig] = Field(default_factory=lambda: [PoolConfig(name="local")])
    control_interval_s: float = Field(default=1.0, gt=0, description="control loop period "
                                      "while any allocation starts, drains or nears rotation")
    control_idle_interval_s: float = Field(
        default=5.0, gt=0, description="period while every allocation is serving and far "
        "from its rotation: the loop's Ray and Serve queries cost CPU the engines could use")

    @model_validator(mode="after")
    def _unique(self) -> "ClusterConfig":
        names = [p.name for p in self.pools]
        if len(set(names)) != len(names):
            raise ValueError(f"pool names must be unique: {names}")
        return self


APP_IMPORT_PATH = "serve_app.app:build_app"
ALL_INTERFACES = "0.0.0.0"
LOOPBACK = "127.0.0.1"


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


class HpcserveConfig:
    """The parsed file: ``cluster`` (validated) and ``serve`` (Serve's config dict).

    Safe by default: with no credentials, everything Serve opens binds loopback and a
    non-loopback ``http_options.host`` is refused (``load_config``), unless the
    operator sets ``hpcserve.allow_unauthenticated``.
    """

    def __init__(self, cluster: ClusterConfig, serve: dict[str, Any], source: str,
                 authenticated: bool):
        self.cluster = cluster
        self.source = source
        self.authenticated = authenticated
        http = dict(serve.get("http_options") or {})
        self.http_host = str(http.get("host", LOOPBACK))
        # Serve's HAProxy on the head sends requests to each ingress replica's own
        # port at its node address, and replicas (and Serve's fallback proxy) bind
        # `http_options.host`.  Replicas on other hosts are reachable only if that is
        # all interfaces, which is allowed only where every replica checks API keys
        # (or the operator opted out).  Otherwise loopback: HAProxy reaches replicas on
        # this machine's other loopback addresses at 127.0.0.1 (cluster.haproxy_guard),
        # and HAProxy's client frontend is moved to the configured host either way.
        open_binds = authenticated or cluster.allow_unauthenticated
        self.serve_bind_host = ALL_INTERFACES if open_binds else LOOPBACK
        # The port hpcserve reports is the one Serve gets (Serve's own default is 8000).
        self.http_port = int(http.get("port", 8100))
        self.serve = {**serve, "http_options": {**http, "host": self.serve_bind_host,
                                                "port": self.http_port}}

    def warnings(self) -> list[str]:
        """What ``up`` must say out loud."""
        if self.cluster.allow_unauthenticated and not self.authenticated:
            return [f"allow_unauthenticated: the API on {self.http_host}:{self.http_port} "
                    "and Serve's replica ports on every interface answer anyone who can "
                    "reach them, with no API key or token"]
        return []


def default_config_text() -> str:
    return resources.files("serve_app").joinpath("default_config.yaml").read_text()


def access_store_of(home: Path) -> Path:
    """The head's access database (managed keys, usage ledger) of the service at ``home``."""
    return home / "access.db"


def load_run_config(run_dir: Path) -> HpcserveConfig:
    """The config ``up`` recorded in ``run_dir`` (``<home>/run``), as ``up`` deployed it."""
    return load_config(run_dir / "config.yaml", access_store=access_store_of(run_dir.parent))


def load_config(path: str | Path | None = None,
                access_store: str | Path | None = None) -> HpcserveConfig:
    """Parse and validate a config file (the embedded default when ``path`` is None).

    ``access_store``: set as ``access.store`` in the args of every app that takes
    credentials and names no store of its own (``up`` and ``deploy`` give
    ``<home>/access.db``).
    """
    source = str(path) if path else "<embedded default>"
    text = Path(path).read_text() if path else default_config_text()
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{source}: not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping")
    data = copy.deepcopy(data)
    section = data.pop("hpcserve", None) or {}
    try:
        cluster = ClusterConfig.model_validate(section)
    except ValidationError as err:
        raise ConfigError(f"{source}: " + describe_validation_error(err, "hpcserve")) from None
    apps = data.get("applications")
    if not isinstance(apps, list) or not apps:
        raise ConfigError(f"{source}: applications: a non-empty list is required")
    authenticated = True
    for i, app in enumerate(apps):
        if not isinstance(app, dict) or "import_path" not in app:
            raise ConfigError(f"{source}: applications.{i}.import_path: field required")
        if app["import_path"] != APP_IMPORT_PATH:
            authenticated = False  # an app of someone else's: we cannot tell
            continue
        try:
            args = _parse_args(app, access_store, prefix=f"applications.{i}.args")
        except ConfigError as err:
            raise ConfigError(f"{source}: {err}") from None
        authenticated &= args.authenticated
        _check_models_fit(cluster, args, f"applications.{i}.args", source)
        if args.ingress == "direct" and args.own_app_models \
                and app.get("route_prefix", "/") != "/":
            raise ConfigError(
                f"{source}: applications.{i}.route_prefix: 'direct' with several models or "
                "workflows needs the app at '/' (HAProxy routes each request to its model's "
                "application by the model it names); use 'auto' or 'routed' elsewhere")
    http = data.get("http_options") or {}
    if not isinstance(http, dict):
        raise ConfigError(f"{source}: http_options: a mapping is expected")
    host = str(http.get("host", LOOPBACK))
    if not (is_loopback(host) or authenticated or cluster.allow_unauthenticated):
        raise ConfigError(
            f"{source}: http_options.host: {host!r} serves beyond this machine, and no "
            "credentials are configured: set applications[].args.api_keys, api_keys_file, "
            "access.managed_keys or access.oidc in every app, or "
            "hpcserve.allow_unauthenticated: true to serve without them")
    return HpcserveConfig(cluster, data, source, authenticated)


def _parse_args(app: dict[str, Any], access_store: str | Path | None, prefix: str):
    """The app's args validated; with ``access_store`` given where the app takes
    credentials and has no store, ``app["args"]`` gets ``access.store`` set."""
    args = app.get("args") or {}
    access = args.get("access") if isinstance(args, dict) else None
    if access_store is None or not isinstance(access or {}, dict) or (access or {}).get("store"):
        return parse_app_config(args, prefix=prefix)
    with_store = {**args, "access": {**(access or {}), "store": str(access_store)}}
    parsed = parse_app_config(with_store, prefix=prefix)
    if parsed.authenticated:
        app["args"] = with_store
    return parsed


def _check_models_fit(cluster: ClusterConfig, args, prefix: str, source: str) -> None:
    """A model whose replica fits no pool's node would wait forever: say so now."""
    from cluster.policy import host_pool, node_resources, replica_bundle
    for j, model in enumerate(args.models):
        bundle = replica_bundle(model.model_dump())
        if host_pool(bundle, cluster.pools) is None:
            shown = {k: v for k, v in bundle.items() if v}
            raise ConfigError(
                f"{source}: {prefix}.models.{j}.resources: a replica needs {shown}, which "
                f"fits no pool's node ({', '.join(p.name for p in cluster.pools)}: "
                f"{[node_resources(p) for p in cluster.pools]})")


def ingress_modes(apps: list[dict[str, Any]], running: bool = False) -> dict[str, str]:
    """Each hpcserve app's ingress mode as ``auto`` resolves it, by app name.

    Takes Serve app configs: a config file's ``applications``, or (``running``) the
    ``deployed_app_config`` entries of Serve's status (same schema), where an app
    that was not split (deployed by an hpcserve whose ``auto`` kept several models
    on the router) is routed whatever its args say.  An app whose args do not
    validate (deployed by an older hpcserve) is left out: the mode is only compared
    for a note, which must not stand in the way of a deploy.
    """
    modes = {}
    for app in apps:
        if app.get("import_path") != APP_IMPORT_PATH:
            continue
        raw = dict(app.get("args") or {})
        layout = raw.pop(LAYOUT_ARG, None)  # a running app that hpcserve split (model_routes)
        try:
            args = parse_app_config(raw)
        except ConfigError:
            continue
        split_here = layout is not None if running \
            else app.get("route_prefix", "/") == "/"  # as model_routes.split_apps
        modes[app.get("name", "default")] = "routed" if args.own_app_models and not split_here \
            else args.ingress_mode
    return modes


def ingress_mode_changes(serve_status: dict[str, Any], serve_config: dict[str, Any]) -> list[str]:
    """Why: under ``auto`` a deploy that gives every model failover (or
    takes it away; or the first deploy by an hpcserve whose ``auto`` splits several
    models) switches the data path, and with it the overhead and whether a crash
    mid-stream fails over.
    Serve applies it like any other change; the operator should hear of it."""
    running = ingress_modes([app["deployed_app_config"]
                             for app in (serve_status.get("applications") or {}).values()
                             if app.get("deployed_app_config")], running=True)
    return [f"app {name!r}: ingress {running[name]} -> {mode}"
            + (" (mid-stream failover on replica crashes is off but for models with "
               "failover on)" if mode == "direct"
               else " (one hop more per token; failover on replica crashes)")
            for name, mode in ingress_modes(serve_config.get("applications") or []).items()
            if name in running and running[name] != mode]
