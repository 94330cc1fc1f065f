"""Routing by model at HAProxy: a model's requests go straight to its own replicas.

Ray Serve's HAProxy routes by path prefix only, one backend per application.  With
each model deployed as an application of its own at ``/_m/<model>`` (its engine
replicas answering HTTP themselves, as with ``ingress: direct``), the rules below
read the request's ``model`` from the JSON body and prefix the path with that
model's route, so OpenAI clients keep calling ``/v1/...`` and every model gets the
one-hop data path.  Anything the rules do not recognise -- a model without an app
of its own (workflows, models that want mid-stream failover), a body that names
its model after HAProxy's buffer, a GET -- keeps its path and reaches the router application at
``/``, which serves everything.

The map (``model route-prefix`` lines) is written by the control plane at deploy
time, beside Serve's HAProxy config; HAProxy reads it at every (re)start.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

MAP_FILE = "hpcserve-models.map"
PREFIX = "/_m/"
# the bodies that name a model; others (GET /v1/models, files, batches) go to the router
MODEL_PATHS = "/v1/chat/completions /v1/completions /v1/embeddings"
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


def route_prefix(model: str) -> str:
    """The model's application route: ``/_m/`` and its name with anything outside
    ``[A-Za-z0-9._-]`` (which Serve, HAProxy or a path would read differently) as
    ``_XX`` hex -- distinct names stay distinct."""
    return PREFIX + _UNSAFE.sub(lambda m: "".join(f"_{b:02x}" for b in m[0].encode()),
                                model.replace("_", "_5f"))


def frontend_rules(map_dir: Path) -> str:
    """Lines for Serve's ``http_frontend``, after its ``bind`` (and the shed rules).

    ``wait-for-body`` holds a POST until its body is in (at most 1 s, at most the
    buffer); ``json_query`` reads what is in the buffer, so a model named after the
    first 16 KiB (Serve's ``tune.bufsize``) is not found and the router serves the
    request.  A path already under ``/_m/`` is left as it is."""
    cond = f"METH_POST {{ path {MODEL_PATHS} }}"
    return (
        "    # hpcserve: a request for a model with its own application goes to its replicas\n"
        f"    http-request wait-for-body time 1s if {cond}\n"
        f"    http-request set-var(txn.hpcserve_model) req.body,json_query('$.model') if {cond}\n"
        "    http-request set-var(txn.hpcserve_route) "
        f"var(txn.hpcserve_model),map({map_dir / MAP_FILE}) if {{ var(txn.hpcserve_model) -m found }}\n"
        "    http-request set-path %[var(txn.hpcserve_route)]%[path] "
        f"if {{ var(txn.hpcserve_route) -m found }} !{{ path_beg {PREFIX} }}\n")


def write_map(map_dir: Path, models: list[str]) -> Path:
    """The map of the models that have their own application (atomically)."""
    path = map_dir / MAP_FILE
    text = "".join(f"{m} {route_prefix(m)}\n" for m in models if " " not in m)
    if not path.exists() or path.read_text() != text:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(text)
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    return path
