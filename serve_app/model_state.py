"""The control loop's model states, as replicas see them: a copy refreshed in the
background, never a call on the request path.

``cluster.model_state`` writes ``{"time", "models": {name: {state, running_replicas,
target_replicas, walltime_left_s, reason?}}}`` to the GCS key-value store every
control tick.  A replica reads it every ``PERIOD_S`` in a thread and keeps the last
copy; ``/v1/models`` answers from it.  Outside Ray (unit tests) it stays empty.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time

log = logging.getLogger("hpcserve.model_state")

KV_NAMESPACE = b"hpcserve"   # cluster.model_state writes these
KV_KEY = b"model_state"
PERIOD_S = 2.0
STALE_S = 60.0  # older than this: the control loop is not publishing; say nothing


class ModelStateCache:
    def __init__(self) -> None:
        self._models: dict[str, dict] = {}
        self._published = 0.0
        self._task: asyncio.Task | None = None

    def status(self, model: str) -> dict | None:
        """The model's last published status, or None (not known or stale)."""
        self._ensure_polling()
        if time.time() - self._published > STALE_S:
            return None
        return self._models.get(model)

    def _ensure_polling(self) -> None:
        if self._task is not None:
            return
        try:
            self._task = asyncio.get_running_loop().create_task(self._poll())
        except RuntimeError:  # no loop: not inside a replica
            pass

    async def _poll(self) -> None:
        from ray.experimental import internal_kv

        while True:
            try:
                if internal_kv._internal_kv_initialized():
                    raw = await asyncio.to_thread(internal_kv._internal_kv_get, KV_KEY,
                                                  namespace=KV_NAMESPACE)
                    if raw:
                        data = json.loads(raw)
                        self._models, self._published = data["models"], data["time"]
            except Exception as err:  # the GCS restarting: keep the last copy
                log.debug("model state not read: %r", err)
            await asyncio.sleep(PERIOD_S)
