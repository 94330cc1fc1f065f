"""The persistent Ray head: start it, deploy Serve on it, stop exactly it.

The head runs no engine work (``num_cpus=0``); it advertises ``serve_head`` so the
Serve controller, the proxy (HAProxy) and, with ``ingress: routed``, the ingress
replica live there while workers come and go.  Every
``ray start`` -- head and workers -- gets the same environment from
``ray_environment`` so auth, Serve's low-overhead transport and health-check
timings agree across the cluster.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

from cluster import haproxy_guard
from cluster.config import HeadConfig, HpcserveConfig, is_loopback
from cluster.node_ports import node_port_args
from cluster.ports import free_ports
from serve_app.processes import stop_process_group

RAY = str(Path(sys.executable).with_name("ray"))


def ensure_token(path: Path) -> str:
    """Read the Ray auth token, creating it 0600 if missing."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
    os.chmod(path, 0o600)
    return path.read_text().strip()


HAPROXY_RETRY_ON = "conn-failure empty-response"


def ray_environment(cfg: HeadConfig, token_path: Path, haproxy_dir: Path) -> dict[str, str]:
    """Environment for every ``ray start`` of this cluster (no secrets inline).

    ``haproxy_dir`` must be short: Ray nests a 56-character directory in it and
    HAProxy refuses socket paths over 97 characters.
    """
    env = {
        "RAY_AUTH_MODE": "token" if cfg.auth == "token" else "disabled",
        "RAY_worker_niceness": "0",
        "RAY_USAGE_STATS_ENABLED": "0",
        # Serve's low-overhead data path (FIELD-NOTES): HAProxy in front, gRPC
        # between replicas, fast failure detection, drains that finish in time.
        "RAY_SERVE_ENABLE_HA_PROXY": "1",
        "RAY_SERVE_USE_GRPC_BY_DEFAULT": "1",
        # User code and router on the replica's main loop (no second thread: every
        # request and chunk crossed threads under one GIL), GC frozen after start-up.
        # Engine replica CPU per request 7.6 -> 6.2 ms at c=64-128 (README).
        "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
        # One HAProxy thread: it proxies a few thousand chunks a second, and Serve's
        # default of 4 threads contended for the engine's cores.
        "RAY_SERVE_HAPROXY_NBTHREAD": "1",
        # A model request whose replica took it and died before answering (its node
        # lost, not a byte sent back) goes to another replica, as the routed ingress
        # retries; Serve's default retries only what never reached a replica.  Not
        # a 503 (backpressure), nor a response already started, nor anything but a
        # model request (cluster.model_routes.frontend_rules; docs/operations.md).
        "RAY_SERVE_HAPROXY_RETRY_ON": HAPROXY_RETRY_ON,
        # at most two more replicas: a request that kills its replica kills no more
        "RAY_SERVE_HAPROXY_RETRIES": "2",
        "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": str(haproxy_dir / "haproxy.cfg"),
        "RAY_SERVE_HAPROXY_SOCKET_PATH": str(haproxy_dir / "admin.sock"),
        "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": str(haproxy_dir),
        "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": str(haproxy_dir / "server-state"),
        # Serve's controller loop every 0.5 s instead of 0.1 s, replica metrics cached
        # for 1 s: the fixed CPU of an idle service shares the cores with the engine.
        "RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "0.5",
        "RAY_SERVE_METRICS_EXPORT_INTERVAL_MS": "1000",
        "RAY_health_check_period_ms": "1000",
        "RAY_health_check_failure_threshold": "3",
        "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "30",
        # An ingress replica being stopped stays reachable this long so HAProxy
        # (on the head, reloaded within ~1 s) drops it first; Serve's default 30 s
        # would stretch every drain of an `ingress: direct` engine replica.
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "5",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "VLLM_NO_USAGE_STATS": "1",
    }
    if cfg.auth == "token":
        env["RAY_AUTH_TOKEN_PATH"] = str(token_path)
    env.update(cfg.env)
    return env


@dataclass
class HeadInfo:
    """What a running head looks like; saved as RUN_DIR/head.json."""

    pid: int
    node_ip: str
    gcs_address: str
    dashboard_url: str
    metrics_port: int
    http_url: str
    temp_dir: str
    token_path: str
    env: dict[str, str] = field(default_factory=dict)
    private_dir: str = ""  # 0700: holds Ray's temp dir and HAProxy's files
    control_metrics_port: int = 0  # the control loop's Prometheus metrics (loopback)

    @property
    def control_metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.control_metrics_port}/metrics"

    @property
    def relay_metrics_url(self) -> str:
        """The failover relay's counters (``cluster.relay_metrics``), on its own port."""
        return f"http://127.0.0.1:{self.env.get('HPCSERVE_RELAY_PORT')}/metrics"

    def save(self, run_dir: Path) -> None:
        (run_dir / "head.json").write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, run_dir: Path) -> "HeadInfo":
        return cls(**json.loads((run_dir / "head.json").read_text()))

    @property
    def metrics_url(self) -> str:
        """The head's Prometheus endpoint.  Ray binds a node's metrics port at 127.0.0.1
        when its address is a loopback one (127.0.0.2 included), else all interfaces."""
        host = "127.0.0.1" if is_loopback(self.node_ip) else self.node_ip
        return f"http://{host}:{self.metrics_port}/metrics"

    def auth_headers(self) -> dict[str, str]:
        if self.env.get("RAY_AUTH_MODE") != "token":
            return {}
        return {"Authorization": f"Bearer {Path(self.token_path).read_text().strip()}"}

    @property
    def prometheus_file_sd(self) -> Path:
        """Ray's Prometheus file_sd target list: every node's metrics port, kept current
        as allocations come and go (engine metrics live on the worker nodes)."""
        return Path(self.temp_dir) / "session_latest" / "prom_metrics_service_discovery.json"

    def process_env(self) -> dict[str, str]:
        """os.environ plus this cluster's Ray settings, for drivers and CLIs.

        Serve's throughput mode runs a handle's router on the caller's event loop; a
        driver that calls a handle from plain code has none (``RuntimeError: No event
        loop running``), so drivers keep the router on a loop of its own.
        """
        return {**os.environ, **self.env, "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "1"}


def start_head(config: HpcserveConfig, run_dir: Path, token_path: Path,
               timeout_s: float = 90) -> HeadInfo:
    cfg = config.cluster.head
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "logs").mkdir(exist_ok=True)
    if cfg.auth == "token":
        ensure_token(token_path)
    # Ray's and HAProxy's socket paths must stay short: keep them directly under /tmp.
    # 0700: Ray's sockets and HAProxy's admin socket live in it (other users of a
    # login node have no business there; /tmp/haproxy-serve was world-writable).
    # Ray makes its temp dir world-writable (0777), so it sits in one that is not.
    private_dir = Path(f"/tmp/hpcs-{os.getuid()}-{secrets.token_hex(3)}")
    private_dir.mkdir(mode=0o700)
    (private_dir / "h").mkdir(mode=0o700)
    temp_dir = private_dir / "r"
    env = ray_environment(cfg, token_path, private_dir / "h")
    env.update({"RAY_SERVE_HAPROXY_BINARY_PATH": str(haproxy_guard.install(private_dir / "h")),
                "HPCSERVE_HTTP_HOST": config.http_host,
                "HPCSERVE_SERVE_BIND_HOST": config.serve_bind_host})
    node_args, node_env = node_port_args(cfg.node_ip, cfg.metrics_export_port)
    env.update(node_env)
    gcs_port, dash_port = cfg.gcs_port or free_ports(1)[0], cfg.dashboard_port or free_ports(1)[0]
    client_port, dash_metrics, autoscaler_metrics, control_metrics, relay = free_ports(5)
    # Ray's defaults are fixed (44227, 44217): a second head on the machine collided.
    env.update({"DASHBOARD_METRIC_PORT": str(dash_metrics),
                "AUTOSCALER_METRIC_PORT": str(autoscaler_metrics),
                "HPCSERVE_RELAY_PORT": str(relay)})  # the failover relay (loopback)
    metrics_port = int(next(a for a in node_args
                            if a.startswith("--metrics-export-port=")).split("=")[1])
    cmd = [RAY, "start", "--head", "--block", f"--port={gcs_port}", "--num-cpus=0",
           '--resources={"serve_head": 1}', "--dashboard-host=127.0.0.1",
           f"--dashboard-port={dash_port}", f"--ray-client-server-port={client_port}",
           f"--temp-dir={temp_dir}", "--disable-usage-stats",
           # Its only job is streaming logs to Ray drivers, and hpcserve has none.
           "--include-log-monitor=False", *node_args]
    log = open(run_dir / "logs" / "head.log", "ab")
    proc = subprocess.Popen(cmd, env={**os.environ, **env}, stdout=log, stderr=log,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    info = HeadInfo(pid=proc.pid, node_ip=cfg.node_ip, gcs_address=f"{cfg.node_ip}:{gcs_port}",
                    dashboard_url=f"http://127.0.0.1:{dash_port}", metrics_port=metrics_port,
                    http_url=f"http://{config.http_host}:{config.http_port}",
                    temp_dir=str(temp_dir), token_path=str(token_path), env=env,
                    private_dir=str(private_dir), control_metrics_port=control_metrics)
    info.save(run_dir)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = (run_dir / "logs" / "head.log").read_text()[-3000:]
            raise RuntimeError(f"ray head exited with {proc.returncode}:\n{tail}")
        try:
            r = httpx.get(f"{info.dashboard_url}/api/version", headers=info.auth_headers(),
                          timeout=2)
            if r.status_code == 200:
                return info
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    stop_process_group(proc.pid)
    raise TimeoutError(f"ray head not ready after {timeout_s}s; see {run_dir}/logs/head.log")


def deploy_serve(info: HeadInfo, serve_config: dict, timeout_s: float = 180) -> None:
    """PUT the Serve config, exactly what `serve deploy` does."""
    r = httpx.put(f"{info.dashboard_url}/api/serve/applications/", json=serve_config,
                  headers=info.auth_headers(), timeout=timeout_s)
    if r.status_code != 200:
        raise RuntimeError(f"serve deploy failed ({r.status_code}): {r.text[-6000:]}")


def serve_status(info: HeadInfo, timeout_s: float = 10) -> dict:
    r = httpx.get(f"{info.dashboard_url}/api/serve/applications/",
                  headers=info.auth_headers(), timeout=timeout_s)
    r.raise_for_status()
    return r.json()
