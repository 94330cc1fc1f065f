"""`hpcserve up` and `hpcserve down`: the whole service's lifecycle on the head.

``up`` starts the Ray head, deploys the Serve config through the dashboard (what
`serve deploy` does, so later `serve deploy`s update it in place), and starts the
control loop detached.  ``down`` stops exactly what ``up`` recorded, by PID:
the control loop, every live allocation (through its provider), then the head's
process group.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import yaml

from cluster import model_routes, model_state
from cluster.batches import set_batch_paths
from cluster.config import (
    APP_IMPORT_PATH,
    HpcserveConfig,
    access_store_of,
    default_config_text,
    load_config,
    load_run_config,
)
from cluster.head import HeadInfo, deploy_serve, serve_status, start_head
from cluster.providers import make_provider
from cluster.state import StateStore
from serve_app.processes import pid_alive, stop_process_group, stop_session


def home_dir(home: str | None) -> Path:
    return Path(home or os.environ.get("HPCSERVE_HOME") or Path.home() / ".hpcserve").resolve()


def run_dir_of(home: Path) -> Path:
    return home / "run"


def _prebuild_models(config: HpcserveConfig) -> None:
    """Build the tiny model once here, not in several replicas at once."""
    for app in config.serve.get("applications", []):
        for model in (app.get("args") or {}).get("models", []):
            args = model.get("engine_args") or {}
            if model.get("engine", "zmq") in ("zmq", "vllm") and not (
                    args.get("model_path") or args.get("model") or args.get("address")):
                from serve_app.tiny_model import ensure_tiny_model
                ensure_tiny_model()
                return


def up(config_path: str | None, home: Path, wait: bool = True, timeout_s: float = 600,
       progress=print) -> HeadInfo:
    # Raises ConfigError naming the field.  Apps taking credentials get the head's
    # access database (managed keys, usage ledger) as access.store.
    config = load_config(config_path, access_store=access_store_of(home))
    set_batch_paths(config, home)  # batch.files_dir and batch.store under the home
    run_dir = run_dir_of(home)
    if (run_dir / "head.json").exists() and pid_alive(HeadInfo.load(run_dir).pid):
        raise RuntimeError(f"hpcserve is already running from {home} (hpcserve down first)")
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    t0 = time.monotonic()
    (run_dir / "config.yaml").write_text(
        Path(config_path).read_text() if config_path else default_config_text())
    progress(f"config: {config.source}")
    for warning in config.warnings():
        progress(f"WARNING: {warning}")
    _prebuild_models(config)
    head = start_head(config, run_dir, home / "auth_token")
    progress(f"ray head up ({time.monotonic() - t0:.1f}s): gcs {head.gcs_address}, "
             f"dashboard {head.dashboard_url}")
    control_pid = start_control(run_dir, head)
    serve_config, relayed = model_routes.publish(  # apps of their own, HAProxy's map
        head, model_routes.with_failover(head, config.serve, config.cluster.pools))
    for note in model_routes.failover_changes([], relayed):
        progress(note)
    (run_dir / "serve.yaml").write_text(yaml.safe_dump(serve_config, sort_keys=False))
    deploy_serve(head, serve_config)
    progress(f"serve config deployed; control loop supervisor pid {control_pid}")
    if wait:
        wait_ready(head, config, timeout_s, progress, t0, run_dir)
    return head


def start_control(run_dir: Path, head: HeadInfo) -> int:
    """Start the control loop under its supervisor, detached; the loop re-adopts
    whatever state.db records.  Returns the supervisor's pid."""
    pid_file = run_dir / "supervisor.pid"
    if pid_file.exists() and pid_alive(int(pid_file.read_text())):
        raise RuntimeError(f"control loop already supervised (pid {pid_file.read_text()})")
    log = open(run_dir / "logs" / "supervisor.log", "ab")
    supervisor = subprocess.Popen([sys.executable, "-m", "cluster.supervisor", str(run_dir)],
                                  env=head.process_env(), stdout=log, stderr=log,
                                  stdin=subprocess.DEVNULL, start_new_session=True)
    pid_file.write_text(str(supervisor.pid))
    return supervisor.pid


class StartBlocked(RuntimeError):
    """A model cannot start: its pool may not or cannot add a node (budget spent,
    provider refusing).  The service stays up and the pool keeps trying."""


# How long a model stays unavailable before `up` gives up waiting for it: the pool
# retries a refused submit 4, 12, 28 and 60 s after the first refusal, so a
# refusal that is a hiccup passes.
BLOCKED_GRACE_S = 60.0


def wait_ready(head: HeadInfo, config: HpcserveConfig, timeout_s: float, progress,
               t0: float, run_dir: Path) -> None:
    """Until every app is RUNNING and each model answers one token; StartBlocked
    as soon as a model has stayed unavailable for BLOCKED_GRACE_S."""
    deadline = time.monotonic() + timeout_s
    last = ""
    unavailable_since: dict[str, float] = {}
    while time.monotonic() < deadline:
        try:
            apps = serve_status(head).get("applications") or {}
            states = {name: a.get("status") for name, a in apps.items()}
        except httpx.HTTPError:
            states = {}
        line = ", ".join(f"{k}={v}" for k, v in states.items()) or "waiting for Serve"
        if line != last:
            progress(f"  [{time.monotonic() - t0:5.1f}s] {line}")
            last = line
        if states and all(s == "RUNNING" for s in states.values()):
            break
        if any(s == "DEPLOY_FAILED" for s in states.values()):
            raise RuntimeError(f"deploy failed: {json.dumps(apps)[:3000]}")
        states_now = model_state.read_local(  # fresh: written within 3 ticks
            run_dir, time.time(), max(60.0, 3 * config.cluster.control_idle_interval_s))
        if blocked := model_state.blocked_models(states_now, unavailable_since,
                                                 time.monotonic(), BLOCKED_GRACE_S):
            raise StartBlocked("; ".join(f"model {m} cannot start: {why}"
                                         for m, why in sorted(blocked.items())))
        time.sleep(1)
    else:
        raise TimeoutError(f"not ready after {timeout_s}s; see hpcserve status and logs")
    tasks: set[str] = set()
    for app in config.serve["applications"]:
        models = []
        for m in (app.get("args") or {}).get("models", []):
            if ((m.get("autoscaling") or {}).get("min_replicas", 1)) == 0:
                progress(f"  {m['name']}: may scale to zero; its first request starts it")
            else:
                models.append((m["name"], m.get("task", "generate")))
        if models:
            with _first_request_key(app) as headers:
                prefix = (app.get("route_prefix") or "/").rstrip("/")
                for model, task in models:
                    _first_request(f"{head.http_url}{prefix}", model, headers, progress, task)
                    tasks.add(task)
    first = "embedding" if tasks == {"embed"} else "token"
    progress(f"ready: first {first} served {time.monotonic() - t0:.1f}s after start; "
             f"OpenAI endpoint {head.http_url}/v1")


# The managed key `up` makes for its first requests, then deletes.  `keys create`
# refuses names starting with "_", so it is never an operator's key.
UP_KEY, UP_PROJECT = "_hpcserve-up", "_hpcserve"


def _first_request(base_url: str, model: str, headers: dict[str, str] | None,
                   progress, task: str = "generate") -> None:
    """One token (an embedding, for ``task: embed``) from ``model``.  ``headers``
    None: the app takes OIDC tokens only, and its 401 shows that it answers."""
    if task == "embed":
        path, body = "embeddings", {"model": model, "input": "hello"}
    else:
        path, body = "completions", {"model": model, "prompt": "hello", "max_tokens": 1}
    deadline = time.monotonic() + 15  # a new managed key reaches the replicas within 5 s
    while True:
        r = httpx.post(f"{base_url}/v1/{path}", timeout=120, json=body,
                       headers=headers or {})
        if headers is None and r.status_code == 401:
            progress(f"  {model}: answers (401: it takes OIDC tokens only, and `up` has none)")
            return
        if r.status_code != 401 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    if r.status_code != 200:
        raise RuntimeError(f"model {model} failed its first request: {r.text[:500]}")


@contextlib.contextmanager
def _first_request_key(app: dict):
    """Headers for ``up``'s first requests to an app: none where it takes no
    credentials, its first static key, else a managed key made for them (deleted
    after; it expires in 10 min should ``up`` be killed), else None (OIDC only)."""
    from serve_app.access import store as access_store
    from serve_app.config import parse_app_config
    if app.get("import_path") != APP_IMPORT_PATH:
        yield {}
        return
    args = parse_app_config(app.get("args") or {})
    static = args.load_api_keys() if (args.api_keys or args.api_keys_file) else []
    if not args.authenticated or static:
        yield {"Authorization": f"Bearer {static[0]}"} if static else {}
        return
    if not args.access.managed_keys:
        yield None
        return
    conn = access_store.connect(args.access.store)
    with contextlib.suppress(access_store.StoreError):
        access_store.delete_key(conn, UP_KEY)  # left by an `up` that was killed
    secret = access_store.create_key(conn, UP_KEY, UP_PROJECT, expires_at=time.time() + 600)
    try:
        yield {"Authorization": f"Bearer {secret}"}
    finally:
        access_store.delete_key(conn, UP_KEY)
        conn.close()


def down(home: Path, progress=print) -> None:
    run_dir = run_dir_of(home)
    if not (run_dir / "head.json").exists():
        progress("nothing running")
        return
    head = HeadInfo.load(run_dir)
    for name in ("supervisor.pid", "control.pid"):  # the supervisor's group holds the loop
        pid = int((run_dir / name).read_text()) if (run_dir / name).exists() else 0
        if pid and pid_alive(pid):
            stop_process_group(pid, grace_s=10)
            progress(f"control loop {'supervisor ' if name == 'supervisor.pid' else ''}"
                     f"{pid} stopped")
    if (run_dir / "state.db").exists():
        _cancel_allocations(run_dir, progress)
    stop_session(head.pid)  # the head's group and strays like Serve's HAProxy
    shutil.rmtree(head.private_dir or head.temp_dir, ignore_errors=True)
    (run_dir / "head.json").rename(run_dir / "head.stopped.json")
    progress(f"ray head {head.pid} stopped")


def _cancel_allocations(run_dir: Path, progress) -> None:
    config = load_run_config(run_dir)
    store = StateStore(run_dir / "state.db")
    pools = {p.name: p for p in config.cluster.pools}
    live = store.allocations(live_only=True)
    providers = {}
    for a in live:
        pc = pools.get(a.pool)
        if pc is None:
            continue
        if a.pool not in providers:
            providers[a.pool] = make_provider(pc.provider, dict(pc.provider_options),
                                              run_dir, pc.name)
        providers[a.pool].cancel(a.job_id)
        a.phase, a.reason, a.retired_time = "RETIRED", "hpcserve down", time.time()
        store.save(a)
        progress(f"cancelled {a.id} (job {a.job_id})")
    deadline = time.monotonic() + 30  # wait for jobs to end, as `down` promises
    pending = {a.pool: [] for a in live}
    for a in live:
        pending[a.pool].append(a.job_id)
    while time.monotonic() < deadline and any(pending.values()):
        for pool, ids in pending.items():
            if ids and pool in providers:
                infos = providers[pool].poll(ids)
                pending[pool] = [i for i in ids if not infos[i].state.terminal]
        time.sleep(0.5)
