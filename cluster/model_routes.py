"""Routing by model at HAProxy: a model's requests go straight to its own replicas.

Ray Serve's HAProxy routes by path prefix only, one backend per application.  With
each model deployed as an application of its own at ``/_m/<model>`` (its engine
replicas answering HTTP themselves, as with ``ingress: direct``), the rules below
read the request's ``model`` from the JSON body and prefix the path with that
model's route, so OpenAI clients keep calling ``/v1/...`` and every model gets the
one-hop data path.  Anything the rules do not recognise -- a model without an app
of its own (workflows, models that may scale to zero), a body that names
its model after HAProxy's buffer, a GET -- keeps its path and reaches the router application at
``/``, which serves everything.

The map (``model route-prefix`` lines) is written by the control plane at deploy
time, beside Serve's HAProxy config; HAProxy reads it at every (re)start.
"""

from __future__ import annotations

import os
from pathlib import Path

from serve_app.layout import ROUTE_PREFIX as PREFIX
from serve_app.layout import model_route as route_prefix

MAP_FILE = "hpcserve-models.map"
FAILOVER_MAP_FILE = "hpcserve-failover.map"  # models whose requests take the relay
RELAY_BACKEND = "hpcserve_failover_relay"
MODEL_APP_IMPORT_PATH = "serve_app.app:build_model_app"
# the bodies that name a model; others (GET /v1/models, files, batches) go to the router
MODEL_PATHS = "/v1/chat/completions /v1/completions /v1/embeddings"
RULES_MARK = "# hpcserve: a model request whole"


def frontend_rules(map_dir: Path, route: bool = True, relay: bool = False) -> str:
    """Lines for Serve's ``http_frontend``, after its ``bind`` (and the shed rules).

    ``wait-for-body`` holds a model request until its body is in (at most 1 s, at
    most the buffer), for two reasons.  HAProxy can send a request again to another
    replica (``retry-on empty-response``, ``cluster.head.HAPROXY_RETRY_ON``) only if
    it holds the whole request (so a body over the buffer is not retried), and only
    a model request may be (a batch created twice would run twice).  And (``route``:
    some models have applications of their own) ``json_query`` reads the ``model``
    from what is in the buffer, so a model named after the first 16 KiB (Serve's
    ``tune.bufsize``) is not found and the router serves the request.  A path already under ``/_m/`` is left as it is.

    ``relay``: a request for a model in the failover map goes to the failover relay
    (``cluster.failover_relay``) with its model's route already in its path; the
    relay sends it to one of the model's replicas itself, or, with none it can
    reach, back here under ``/_m/``, which these rules leave alone."""
    # path_end: also a model's own route (/_m/<model>/v1/...), as the relay sends it
    cond = f"METH_POST {{ path_end {MODEL_PATHS} }}"
    rules = (f"    {RULES_MARK} before it is sent on (retried if its replica dies)\n"
             f"    http-request wait-for-body time 1s if {cond}\n"
             "    # hpcserve: and only model requests are sent twice (not a batch, a file)\n"
             f"    http-request disable-l7-retry if !METH_GET !{{ path_end {MODEL_PATHS} }}\n")
    if not route:
        return rules
    rules += (
        "    # hpcserve: a request for a model with its own application goes to its replicas\n"
        f"    http-request set-var(txn.hpcserve_model) req.body,json_query('$.model') if {cond}\n"
        "    http-request set-var(txn.hpcserve_route) "
        f"var(txn.hpcserve_model),map({map_dir / MAP_FILE}) if {{ var(txn.hpcserve_model) -m found }}\n")
    if relay:
        rules += (
            "    # hpcserve: ... through the failover relay if the model asks for failover\n"
            "    http-request set-var(txn.hpcserve_relay) var(txn.hpcserve_model),"
            f"map({map_dir / FAILOVER_MAP_FILE}) if {{ var(txn.hpcserve_route) -m found }} "
            f"!{{ path_beg {PREFIX} }}\n")
    return rules + (
        "    http-request set-path %[var(txn.hpcserve_route)]%[path] "
        f"if {{ var(txn.hpcserve_route) -m found }} !{{ path_beg {PREFIX} }}\n")


RELAY_USE_BACKEND = (f"    # hpcserve: failover models' requests take the relay\n"
                     f"    use_backend {RELAY_BACKEND} if {{ var(txn.hpcserve_relay) -m found }}\n")


def relay_backend(port: int) -> str:
    """The backend HAProxy sends failover models' requests to (appended to the config)."""
    return (f"\n# hpcserve: the failover relay (cluster.failover_relay)\nbackend {RELAY_BACKEND}\n"
            "    # its connections are kept for any client's next request, as Serve's backends'\n"
            "    http-reuse always\n"
            f"    server relay 127.0.0.1:{port}\n")


def write_map(map_dir: Path, models: list[str], failover: list[str] = ()) -> Path:
    """The maps of the models that have their own application and of those among
    them that take the failover relay (atomically)."""
    _write(map_dir / FAILOVER_MAP_FILE, "".join(f"{m} 1\n" for m in failover if " " not in m))
    path = map_dir / MAP_FILE
    _write(path, "".join(f"{m} {route_prefix(m)}\n" for m in models if " " not in m))
    return path


def _write(path: Path, text: str) -> None:
    if not path.exists() or path.read_text() != text:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(text)
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)


def split_apps(serve_config: dict, relay: bool = True) -> tuple[dict, list[str], list[str]]:
    """Serve's config with each hpcserve app at ``/`` whose models get applications of
    their own (``AppConfig.own_app_models``) split into those and the router; and
    the models HAProxy is to route by and those it sends through the failover relay
    (for ``write_map``).  Without a ``relay`` (no Ray auth token to sign with, or a
    head started without one), models with ``failover`` stay on the router, whose
    routed ingress fails over itself.

    Generated applications carry the user's app settings (``runtime_env`` and the
    like) and args, plus ``serve_app.layout.LAYOUT_ARG`` telling each what it is."""
    from cluster.config import APP_IMPORT_PATH
    from serve_app.config import parse_app_config
    from serve_app.layout import LAYOUT_ARG, model_app

    out = {**serve_config, "applications": []}
    routed: list[str] = []
    failover: list[str] = []
    for app in serve_config.get("applications") or []:
        own: list[str] = []
        if app.get("import_path") == APP_IMPORT_PATH and app.get("route_prefix", "/") == "/":
            parsed = parse_app_config(app.get("args") or {})
            own = [m for m in parsed.own_app_models
                   if relay or m not in parsed.failover_models]
            failover += [m for m in parsed.failover_models if relay]
        if not own:
            out["applications"].append(app)
            continue
        name = app.get("name", "default")
        apps = {m: model_app(name, m) for m in own}
        out["applications"].append(
            {**app, "args": {**app["args"], LAYOUT_ARG: {"model_apps": apps}}})
        for model, app_name in apps.items():
            out["applications"].append({
                **app, "name": app_name, "route_prefix": route_prefix(model),
                "import_path": MODEL_APP_IMPORT_PATH,
                "args": {**app["args"], LAYOUT_ARG: {"model": model, "router_app": name}}})
        routed += own
    return out, routed, failover


def failover_by_default(pools, relay: bool) -> bool:
    """What ``failover: auto`` stands for: on where the relay can sign continuations and
    no pool's engines share the head's cores (``PoolConfig.shares_head_cores``).

    Why by layout: the relay costs the head's CPU, ~0.7 ms per request.  With the
    head on cores of its own (a service node; the engines on compute nodes) the
    relay path met every target against bare vLLM at every step; where the head
    shares the engine's two cores it took that CPU from decoding and missed 4 of 7
    steps (docs/benchmarks.md, "Mid-stream failover through the relay")."""
    return relay and not any(pool.shares_head_cores for pool in pools)


def decide_failover(serve_config: dict, on: bool) -> dict:
    """Serve's config with each hpcserve app's ``failover: auto`` (the default) written
    as ``on`` for the models the relay would serve (generation models that get an
    application of their own: ``split_apps``), and as off for the rest: embedding
    models; models the router serves, which fails over itself (``ingress: routed``,
    models that may scale to zero, several models in an app not at ``/``); and one
    model in an app not at ``/``, which keeps the direct path without it."""
    from cluster.config import APP_IMPORT_PATH
    from serve_app.config import parse_app_config

    out = {**serve_config, "applications": []}
    for app in serve_config.get("applications") or []:  # validated (load_config)
        args = app.get("args") or {}
        models = args.get("models")
        if app.get("import_path") != APP_IMPORT_PATH or not isinstance(models, list):
            out["applications"].append(app)
            continue
        auto = {i for i, m in enumerate(models)
                if isinstance(m, dict) and m.get("failover", "auto") == "auto"}
        decided = [{**m, "failover": on and m.get("task", "generate") == "generate"}
                   if i in auto else m for i, m in enumerate(models)]
        if on and auto:  # only those the relay would reach keep it
            relayed = set(parse_app_config({**args, "models": decided}).failover_models) \
                if app.get("route_prefix", "/") == "/" else set()
            decided = [{**m, "failover": m["failover"] and m.get("name") in relayed}
                       if i in auto else m for i, m in enumerate(decided)]
        out["applications"].append({**app, "args": {**args, "models": decided}})
    return out


def failover_changes(before: list[str], after: list[str]) -> list[str]:
    """What a deploy did to mid-stream failover: models the relay took or gave back."""
    on = [m for m in after if m not in before]
    off = [m for m in before if m not in after]
    notes = []
    if on:
        notes.append(f"mid-stream failover on for {', '.join(on)}, through the head's relay")
    if off:
        notes.append(f"mid-stream failover off for {', '.join(off)}")
    return notes


def relay_enabled(head) -> bool:
    """Whether ``head`` runs the failover relay and the relay can sign (Ray's token)."""
    return head.env.get("RAY_AUTH_MODE") == "token" and "HPCSERVE_RELAY_PORT" in head.env


def with_failover(head, serve_config: dict, pools) -> dict:
    """``decide_failover`` for ``serve_config`` deployed on ``head``, whose service
    runs ``pools`` (those of its ``up``: a deploy does not change them)."""
    return decide_failover(serve_config, failover_by_default(pools, relay_enabled(head)))


def haproxy_dir(head) -> Path:
    """Where Serve writes HAProxy's config on this head (the guard reads the map there)."""
    return Path(head.env["RAY_SERVE_HAPROXY_CONFIG_FILE_LOC"]).parent


def saved_maps(head) -> dict[Path, str | None]:
    """The routing maps as they are, for ``restore_maps`` if a deploy fails."""
    d = haproxy_dir(head)
    return {d / name: (d / name).read_text() if (d / name).exists() else None
            for name in (MAP_FILE, FAILOVER_MAP_FILE)}


def restore_maps(saved: dict[Path, str | None]) -> None:
    for path, text in saved.items():
        if text is None:
            path.unlink(missing_ok=True)
        else:
            _write(path, text)


def relayed_models(head) -> list[str]:
    """The models HAProxy on ``head`` sends through the failover relay now (its map)."""
    try:
        text = (haproxy_dir(head) / FAILOVER_MAP_FILE).read_text()
    except (OSError, KeyError):
        return []
    return [line.split(" ", 1)[0] for line in text.splitlines() if line.strip()]


def publish(head, serve_config: dict) -> tuple[dict, list[str]]:
    """``split_apps`` for a deploy to ``head``, with the model map written first so
    the HAProxy that the deploy (re)starts routes by it; the config to deploy, and
    the models it sends through the failover relay."""
    split, models, failover = split_apps(serve_config, relay_enabled(head))
    write_map(haproxy_dir(head), models, failover)
    return split, failover
