"""Entry point for `serve deploy`: ``import_path: serve_app.app:build_app``.

``ingress: routed``: one engine deployment per configured model
(``serve_app.engines.deployment``, the same class for every engine kind) and the
ingress that routes to them.  The ingress is pinned to the head (``serve_head``
resource) because workers come and go with their batch jobs; engine replicas ask
for ``hpc_slot`` (or what the model config says), which only workers advertise.

``ingress: direct``: the one model's engine replica is the app's ingress
(``serve_app.engine_ingress``); HAProxy on the head sends requests straight to it.

``ingress: auto`` (default) is ``direct`` for one model and ``routed`` for several.
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


def build_app(args: dict[str, Any]) -> Application:
    config = parse_app_config(args)
    on_head = {"num_cpus": 0, "resources": dict(config.ingress_resources)}
    ledger = None
    if config.ledger_on:  # access.store on the head: keys, limits, usage
        ledger = Ledger.options(ray_actor_options=on_head).bind(config.access.model_dump())
    batch = batch_service(config, ledger, on_head)  # None unless batch.enabled
    if config.ingress_mode == "direct":
        (model,) = config.models
        deployment = engine_ingress(**model.deployment_options())
        return deployment.bind(config.model_dump(), ledger, batch)
    engines = {model.name: engine_deployment(**model.deployment_options()).bind(
        model.model_dump()) for model in config.models}
    return Ingress.options(ray_actor_options=on_head).bind(config.model_dump(), engines, ledger,
                                                          batch)
