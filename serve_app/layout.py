"""Where each model is served when its replicas answer HTTP themselves.

With ``ingress: direct`` and several models (or workflows), ``hpcserve up``/``deploy``
turn the app into one application per always-on model, at ``/_m/<model>`` (its
engine replicas are the ingress: one hop per token, as with one model), and the
configured app as the router at ``/``: ``/v1/models``, files and batches,
workflows, and the models that may scale to zero.  HAProxy reads a request's
``model`` and sends it to the model's application (``cluster.model_routes``); the
router reaches those engines by name, the model applications reach the router's
usage ledger by name.

Names are derived here, once, for both planes.
"""

from __future__ import annotations

import re

ROUTE_PREFIX = "/_m/"
LAYOUT_ARG = "_layout"  # set by hpcserve in a generated or split app's args
LEDGER_DEPLOYMENT = "access-ledger"
_UNSAFE = re.compile(r"[^A-Za-z0-9.-]")
_ESCAPED = re.compile(r"(?:_[0-9a-f]{2})+")


def safe_name(model: str) -> str:
    """The model's name with anything outside ``[A-Za-z0-9.-]`` as ``_XX`` hex (so
    ``_`` too): usable in a path, an HAProxy backend and a Serve app name, and two
    distinct names stay distinct."""
    return _UNSAFE.sub(lambda m: "".join(f"_{b:02x}" for b in m[0].encode()), model)


def model_name(safe: str) -> str:
    """``safe_name`` undone (a model's name from its route)."""
    return _ESCAPED.sub(lambda m: bytes.fromhex(m[0].replace("_", "")).decode(
        errors="replace"), safe)


def model_route(model: str) -> str:
    return ROUTE_PREFIX + safe_name(model)


def model_app(router_app: str, model: str) -> str:
    return f"{router_app}.m.{safe_name(model)}"


def engine_deployment_name(model: str) -> str:
    return f"engine-{model}"
