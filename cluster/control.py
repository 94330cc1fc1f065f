"""The control loop: ticks every pool against the live cluster, forever.

Started detached by ``hpcserve up`` (``python -m cluster.control RUN_DIR``) and
stopped by ``hpcserve down``.  It never sits on the request path, and it can be
killed at any moment: the pools' state is in sqlite and jobs run on without it.
"""

from __future__ import annotations

import logging
import signal
import sys
import time
from pathlib import Path

from cluster import haproxy_guard, metrics
from cluster.config import load_run_config
from cluster.head import HeadInfo
from cluster.model_state import document, model_states, publish, write_local
from cluster.policy import demand_by_pool
from cluster.pool import Pool
from cluster.providers import make_provider
from cluster.providers.base import WorkerSpec
from cluster.ray_view import RayView
from cluster.state import StateStore

log = logging.getLogger("hpcserve.control")

# Head-local settings a worker must not inherit (it picks its own ports, has no token file).
_HEAD_ONLY = {"RAY_AUTH_TOKEN_PATH", "RAY_SERVE_HAPROXY_METRICS_PORT", "RAY_SERVE_HAPROXY_STATS_PORT",
              "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT", "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT",
              "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT", "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT",
              "RAY_SERVE_DIRECT_INGRESS_MIN_GRPC_PORT", "RAY_SERVE_DIRECT_INGRESS_MAX_GRPC_PORT",
              "RAY_SERVE_HAPROXY_BINARY_PATH", "HPCSERVE_HTTP_HOST", "HPCSERVE_SERVE_BIND_HOST",
              "DASHBOARD_METRIC_PORT", "AUTOSCALER_METRIC_PORT", "HPCSERVE_RELAY_PORT",
              # HAProxy runs on the head only; a value with a space cannot travel
              # through HEAppE (heappe_template.SAFE_VALUE)
              "RAY_SERVE_HAPROXY_RETRY_ON", "RAY_SERVE_HAPROXY_RETRIES"}


def worker_environment(head: HeadInfo) -> dict[str, str]:
    env = {k: v for k, v in head.env.items() if k not in _HEAD_ONLY}
    if head.env.get("RAY_AUTH_MODE") == "token":
        env["RAY_AUTH_TOKEN"] = Path(head.token_path).read_text().strip()
    return env


def build_pools(run_dir: Path, head: HeadInfo, store: StateStore, view: RayView) -> list[Pool]:
    config = load_run_config(run_dir)
    env = worker_environment(head)
    pools = []
    for pc in config.cluster.pools:
        provider = make_provider(pc.provider, dict(pc.provider_options), run_dir, pc.name)
        spec = WorkerSpec(allocation_id="", pool=pc.name, head_address=head.gcs_address,
                          walltime_s=pc.walltime_s, warning_s=pc.warning_s,
                          num_cpus=pc.num_cpus, num_gpus=pc.num_gpus,
                          resources=dict(pc.resources), env={**env, **pc.worker_env})
        pools.append(Pool(pc, provider, store, spec, drain=view.drain))
    return pools


def _publish_model_state(view: RayView, pools: list[Pool], serve: dict,
                         store: StateStore, run_dir: Path) -> None:
    now = time.time()
    models = [m for app in serve.get("applications") or []
              for m in (app.get("args") or {}).get("models") or []]
    states = model_states(models, view.deployments, [p.config for p in pools],
                          store.allocations(live_only=True),
                          {p.config.name: why for p in pools if (why := p.blocked(now))}, now,
                          {a: t for p in pools for a, t in p.expected_starts.items()})
    doc = document(states, now)
    try:
        write_local(run_dir, doc)  # for `hpcserve up`, which has no GCS client
    except OSError as err:
        log.warning("model state not written to %s: %s", run_dir, err)
    try:
        publish(view, doc)
    except Exception as err:  # the GCS restarting: the replicas keep their last copy
        log.warning("model state not published: %s", err)


def run(run_dir: Path) -> None:
    head = HeadInfo.load(run_dir)
    store = StateStore(run_dir / "state.db")
    view = RayView(head)
    pools = build_pools(run_dir, head, store, view)
    config = load_run_config(run_dir)
    cluster = config.cluster
    interval, idle_interval = cluster.control_interval_s, cluster.control_idle_interval_s
    stopping = False

    def _stop(*_):
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    if head.control_metrics_port:
        metrics.serve(head.control_metrics_port)
    adopted = store.allocations(live_only=True)
    log.info("control loop up; re-adopting %d live allocations: %s", len(adopted),
             [a.id for a in adopted])
    while not stopping:
        started = time.monotonic()
        try:
            nodes = view.nodes()
            demand = demand_by_pool([p.config for p in pools], view.pending_demand())
        except Exception as err:  # head restarting, dashboard busy: act without it
            log.warning("cluster view unavailable: %s", err)
            nodes, demand = None, {}
        metrics.TICKS.inc()
        for pool in pools:
            pool.demand_nodes = demand.get(pool.config.name, 0)
        for pool in pools:
            try:
                pool.tick(nodes)
            except Exception:
                log.exception("pool %s tick failed", pool.config.name)
        if nodes is not None:
            _publish_model_state(view, pools, config.serve, store, run_dir)
        try:
            haproxy_guard.keep_relay(head.env, Path(head.private_dir) / "h")
        except Exception:
            log.exception("failover relay check failed")
        (run_dir / "control.heartbeat").write_text(str(time.time()))
        # Slow down while all is steady; the horizon keeps a rotation from being
        # noticed up to one idle period late.
        now = time.time()
        period = idle_interval if all(p.steady(now, 2 * idle_interval) for p in pools) \
            else interval
        deadline = started + period
        while not stopping and time.monotonic() < deadline:
            time.sleep(min(0.25, max(0.0, deadline - time.monotonic())))
    log.info("control loop stopped")


def main() -> None:
    run_dir = Path(sys.argv[1])
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per tick otherwise
    run(run_dir)


if __name__ == "__main__":
    main()
