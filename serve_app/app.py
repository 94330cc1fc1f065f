"""Entry point for `serve deploy`: ``import_path: serve_app.app:build_app``.

``ingress: routed``: one engine deployment per configured model
(``serve_app.engines.deployment``, the same class for every engine kind) and the
ingress that routes to them.  The ingress is pinned to the head (``serve_head``
resource) because workers come and go with their batch jobs; engine replicas ask
for ``hpc_slot`` (or what the model config says), which only workers advertise.

``ingress: direct``: the one model's engine replica is the app's ingress
(``serve_app.engine_ingress``); HAProxy on the head sends requests straight to it.

``ingress: direct`` with several models, workflows or a model with failover on:
``hpcserve up``/``deploy`` split the app (``serve_app.layout``):
``build_model_app`` builds each always-on model's own application, ``build_app``
the router, which reaches those engines by name.

``ingress: auto`` (default) is ``direct`` while some model is always-on,
``routed`` otherwise (``AppConfig.ingress_mode``).
"""

from __future__ import annotations

from typing import Any

from ray.serve import Application

from serve_app.access.ledger import Ledger
from serve_app.batch.service import batch_service
from serve_app.config import parse_app_config
from serve_app.engine_ingress import engine_ingress
from serve_app.engines.deployment import engine_deployment
from serve_app.ingress import Ingress
from serve_app.layout import LAYOUT_ARG, engine_deployment_name


def build_app(args: dict[str, Any]) -> Application:
    args = dict(args)
    layout = args.pop(LAYOUT_ARG, None) or {}  # {"model_apps": {model: app}} when split
    config = parse_app_config(args)
    on_head = {"num_cpus": 0, "resources": dict(config.ingress_resources)}
    ledger = None
    if config.ledger_on:  # access.store on the head: keys, limits, usage
        ledger = Ledger.options(ray_actor_options=on_head).bind(config.access.model_dump())
    model_apps: dict[str, str] = layout.get("model_apps") or {}
    batch = batch_service(config, ledger, on_head, model_apps)  # None unless batch.enabled
    if config.ingress_mode == "direct" and len(config.models) == 1 and not config.workflows \
            and not config.own_app_models:  # (a failover model has an app of its own)
        (model,) = config.models
        deployment = engine_ingress(**model.deployment_options())
        return deployment.bind(config.model_dump(), ledger, batch)
    engines = {model.name: engine_deployment(**model.deployment_options()).bind(
        model.model_dump()) for model in config.models if model.name not in model_apps}
    remote = {m: (engine_deployment_name(m), app) for m, app in model_apps.items()}
    return Ingress.options(ray_actor_options=on_head).bind(config.model_dump(), engines, ledger,
                                                          batch, remote)


def build_model_app(args: dict[str, Any]) -> Application:
    """One model's own application (``serve_app.layout``): its engine replicas answer
    HTTP for it; the usage ledger is the router app's, reached by name."""
    args = dict(args)
    layout = args.pop(LAYOUT_ARG)  # {"model": name, "router_app": app}
    raw = next(m for m in args["models"] if m.get("name") == layout["model"])
    mine = {**args, "models": [raw], "workflows": [],
            "ingress": "direct", "batch": {**(args.get("batch") or {}), "enabled": False}}
    config = parse_app_config(mine)
    (model,) = config.models
    ledger_app = layout["router_app"] if config.ledger_on else None
    return engine_ingress(**model.deployment_options()).bind(
        config.model_dump(), None, None, ledger_app)
