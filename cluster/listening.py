"""Every port this service listens on, on this machine: what it is, who may reach it.

Read from the kernel, not from the config: the processes are the head's and the
control loop's trees and, for local pools, each allocation's job tree (Serve
replicas and engines are children of their node's raylet, whatever session they
run in).  ``hpcserve status`` prints it; the safe-defaults tests assert on it.
Allocations on other hosts are not listed (their ports are the same kinds: Ray's
token-authenticated ones, the replica's direct-ingress and gRPC ports, metrics).
"""

from __future__ import annotations

import ipaddress
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil

from cluster.head import HeadInfo


@dataclass
class Listener:
    host: str
    port: int
    pid: int
    process: str
    role: str
    auth: str         # what a client must present: "API key", "Ray token", "none", ...
    reach: str        # "this machine" | "network"

    def as_dict(self) -> dict:
        return asdict(self)


def _roots(run_dir: Path, head: HeadInfo) -> list[int]:
    pids = [head.pid]
    for pid_file in [run_dir / "supervisor.pid", run_dir / "control.pid",
                     *run_dir.glob("jobs/*/*/supervisor.pid")]:
        try:
            pids.append(int(pid_file.read_text()))
        except (OSError, ValueError):
            continue
    return pids


def _processes(roots: list[int]) -> dict[int, psutil.Process]:
    found: dict[int, psutil.Process] = {}
    for pid in roots:
        try:
            root = psutil.Process(pid)
            for proc in [root, *root.children(recursive=True)]:
                found[proc.pid] = proc
        except psutil.Error:
            continue
    return found


def _descends(pid: int, roots: list[int], procs: dict[int, psutil.Process]) -> bool:
    """Whether ``pid``, started since the tree was read, is ours (adds it if so):
    Serve replaces HAProxy's process on every reload, so its listener may belong
    to a process younger than the tree."""
    try:
        proc = psutil.Process(pid)
        if not any(parent.pid in roots for parent in proc.parents()):
            return False
    except psutil.Error:
        return False
    procs[pid] = proc
    return True


def _reach(host: str) -> str:
    try:
        return "this machine" if ipaddress.ip_address(host).is_loopback else "network"
    except ValueError:
        return "network"


def _role(name: str, host: str, port: int, head: HeadInfo,
          api_auth: str) -> tuple[str, str]:
    env = head.env
    ray_auth = "Ray token" if env.get("RAY_AUTH_MODE") == "token" else "none"
    if name == "haproxy":
        if port == int(env.get("RAY_SERVE_HAPROXY_METRICS_PORT", -1)):
            return "HAProxy Prometheus metrics", "none"
        if port == int(env.get("RAY_SERVE_HAPROXY_STATS_PORT", -1)):
            return "HAProxy stats page", "none"
        return "OpenAI API (Serve's HAProxy)", api_auth
    if "ServeReplica" in name:
        lo = int(env.get("RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT", 0))
        hi = int(env.get("RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT", 0))
        if lo <= port <= hi:
            return "Serve replica: direct-ingress HTTP", api_auth
        if host in ("::", "0.0.0.0"):
            return "Ray worker gRPC (the replica's actor)", ray_auth
        return "Serve replica: handle gRPC (serve_app.serve_binds)", "none"
    if "ProxyActor" in name:
        if port == int(env.get("RAY_SERVE_FALLBACK_PROXY_HTTP_PORT", -1)):
            return "Serve fallback proxy (HTTP)", api_auth
        return "Ray worker gRPC (ProxyActor)", ray_auth
    if name == "gcs_server":
        return "Ray GCS (workers join here)", ray_auth
    if name == "raylet":
        return "Ray raylet / object manager", ray_auth
    if "DashboardAgent" in name:
        if port == head.metrics_port:
            return "Ray node Prometheus metrics (head)", "none"
        if host in ("0.0.0.0", "::"):
            return "Ray node Prometheus metrics", "none"
        return "Ray dashboard agent", ray_auth
    if "cluster.control" in name and port == head.control_metrics_port:
        return "hpcserve control-plane metrics", "none"
    if "cluster.failover_relay" in name:
        return "hpcserve failover relay (HAProxy's; /metrics)", "none"
    if "zmq_engine" in name:
        return "hpcserve ZMQ engine", "none"
    if port == int(head.dashboard_url.rsplit(":", 1)[1]):
        return "Ray dashboard / `serve deploy` API", ray_auth
    if port == int(env.get("DASHBOARD_METRIC_PORT", -1)):
        return "Ray dashboard Prometheus metrics", "none"
    if port == int(env.get("AUTOSCALER_METRIC_PORT", -1)):
        return "Ray autoscaler Prometheus metrics", "none"
    if "ray.util.client" in name:
        return "Ray client server", ray_auth
    if name.startswith("ray::"):
        return f"Ray worker gRPC ({name[5:]})", ray_auth
    return "Ray component", ray_auth


def listeners(run_dir: Path, head: HeadInfo, authenticated: bool) -> list[Listener]:
    """Every LISTEN socket of this service's processes on this machine."""
    roots = _roots(run_dir, head)
    procs = _processes(roots)
    api_auth = "API key" if authenticated else "none (loopback only)"
    out = []
    for conn in psutil.net_connections(kind="inet"):
        if conn.status != psutil.CONN_LISTEN or conn.pid is None:
            continue
        if conn.pid not in procs and not _descends(conn.pid, roots, procs):
            continue
        try:
            proc = procs[conn.pid]
            name = proc.name()
            if name in ("python", "python3") or name.startswith("python3."):
                name = " ".join(proc.cmdline()[1:4])
        except psutil.Error:
            continue
        host = conn.laddr.ip.removeprefix("::ffff:")
        role, auth = _role(name, host, conn.laddr.port, head, api_auth)
        out.append(Listener(host, conn.laddr.port, conn.pid, name[:48], role, auth,
                            _reach(host)))
    return sorted(out, key=lambda item: (item.role, item.port, item.host))
