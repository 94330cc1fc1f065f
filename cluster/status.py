"""`hpcserve status`: allocations, models and replicas in one view."""

from __future__ import annotations

import json
import time
from pathlib import Path

from cluster.config import access_store_of, load_run_config
from cluster.head import HeadInfo, serve_status
from cluster.listening import listeners
from cluster.model_routes import relayed_models
from cluster.policy import budget_left_s
from cluster.service import run_dir_of
from cluster.state import StateStore
from cluster.supervisor import restarts
from serve_app.processes import pid_alive


def collect(home: Path) -> dict:
    run_dir = run_dir_of(home)
    if not (run_dir / "head.json").exists():
        return {"running": False}
    head = HeadInfo.load(run_dir)
    control_pid = int((run_dir / "control.pid").read_text()) if (
        run_dir / "control.pid").exists() else 0
    supervisor = run_dir / "supervisor.pid"
    supervisor_pid = int(supervisor.read_text()) if supervisor.exists() else 0
    restart_count, restart_time = restarts(run_dir)
    out: dict = {"running": pid_alive(head.pid), "endpoint": f"{head.http_url}/v1",
                 "dashboard": head.dashboard_url, "head_pid": head.pid,
                 "control_pid": control_pid, "control_alive": pid_alive(control_pid),
                 "supervisor_pid": supervisor_pid, "supervisor_alive": pid_alive(supervisor_pid),
                 "control_restarts": restart_count, "control_last_restart": restart_time}
    store = StateStore(run_dir / "state.db")
    now = time.time()
    out["allocations"] = [{
        "id": a.id, "pool": a.pool, "provider": a.provider, "job": a.job_id,
        "phase": a.phase, "node": a.node,
        "walltime_left_s": round(a.end_time - now) if a.end_time else None}
        for a in store.allocations(live_only=True)]
    try:
        apps = serve_status(head).get("applications") or {}
    except Exception as err:  # the head may be starting or gone
        out["serve_error"] = str(err)
        apps = {}
    out["applications"] = {}
    out["failover_models"] = relayed_models(head)
    for name, app in apps.items():
        deployments = {}
        for dep_name, dep in (app.get("deployments") or {}).items():
            deployments[dep_name] = {
                "status": dep.get("status"),
                "replicas": [{"state": r.get("state"), "node_ip": r.get("node_ip"),
                              "node_id": (r.get("node_id") or "")[:12]}
                             for r in dep.get("replicas") or []]}
        out["applications"][name] = {"status": app.get("status"), "deployments": deployments}
    stores = [access_store_of(home)]
    try:
        config = load_run_config(run_dir)
        authenticated = config.authenticated
        out["pools"] = [_pool_summary(pc, store, now) for pc in config.cluster.pools]
        stores = [Path(s) for app in config.serve.get("applications") or []
                  if (s := ((app.get("args") or {}).get("access") or {}).get("store"))] or stores
    except Exception:  # a config edited since `up`: say so rather than guess
        authenticated = False
    out["access"] = [h for path in dict.fromkeys(stores) if (h := access_health(path, now))]
    out["ports"] = [item.as_dict() for item in listeners(run_dir, head, authenticated)]
    out["events"] = [f"{time.strftime('%H:%M:%S', time.localtime(t))} {alloc} {msg}"
                     for t, _, alloc, msg in store.events(10)]
    return out


HEALTH_FILE = "access-health.json"  # written by the ledger replica next to its store
HEALTH_STALE_S = 30


def access_health(store: Path, now: float) -> dict | None:
    """The ledger's last report on the access store and OIDC keys, if it wrote one."""
    path = store.parent / HEALTH_FILE
    try:
        health = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        return {"path": str(path), "store_ok": False, "stale": True,
                "store_error": f"unreadable {HEALTH_FILE}: {err}"}
    age = now - float(health.get("ts") or 0)
    return {**health, "path": str(path), "age_s": round(age, 1), "stale": age > HEALTH_STALE_S}


def render_access(h: dict) -> str:
    store = ("store ok" if h.get("store_ok")
             else f"store FAILING ({h.get('store_error') or 'unknown error'})")
    parts = [store, f"{h.get('keys', '?')} keys"]
    oidc = h.get("oidc")
    if oidc:
        parts.append("OIDC JWKS ok" if oidc.get("ok")
                     else f"OIDC JWKS FAILING ({oidc.get('error') or 'unknown error'})")
    if "replicas" in h:
        parts.append(f"{h['replicas']} replicas reporting")
    if "unsent_usage" in h:
        parts.append(f"{h['unsent_usage']} usage records unsent")
    if h.get("shed"):
        parts.append("refused at HAProxy (flooding): " + ", ".join(h["shed"]))
    if h.get("shed_error"):
        parts.append(f"shedding FAILING ({h['shed_error']})")
    if h.get("stale"):
        parts.append(f"STALE: the ledger's last report is {h['age_s']:.0f}s old" if "age_s" in h
                     else "STALE")
    return "access: " + ", ".join(parts)


def _pool_summary(pc, store: StateStore, now: float) -> dict:
    allocations = store.allocations(pc.name)
    live = [a for a in allocations if a.live]
    out = {"pool": pc.name, "min_allocations": pc.min_allocations,
           "max_allocations": pc.max_allocations, "live": len(live),
           "serving": sum(a.phase == "SERVING" for a in live)}
    left = budget_left_s(pc, allocations, now)
    if left is not None:
        budget = pc.max_node_hours_per_day
        out["node_hours_budget"] = budget
        out["node_hours_left"] = round(left / 3600, 2)
        out["node_hours_used_or_committed"] = round(budget - left / 3600, 2)
    return out


def render(s: dict) -> str:
    if not s.get("running"):
        return "hpcserve: not running"
    lines = [f"endpoint  {s['endpoint']}   dashboard {s['dashboard']}",
             f"head pid {s['head_pid']}   control loop pid {s['control_pid']} "
             f"({'alive' if s['control_alive'] else 'DEAD'}; supervisor "
             f"{'alive' if s.get('supervisor_alive') else 'DEAD'}, "
             f"{s.get('control_restarts', 0)} restarts)", "",
             f"{'ALLOCATION':24} {'PROVIDER':8} {'JOB':18} {'PHASE':9} {'NODE':14} WALL-TIME LEFT"]
    for p in reversed(s.get("pools", [])):
        budget = (f"; node-hours used or committed {p['node_hours_used_or_committed']} of "
                  f"{p['node_hours_budget']} today, {p['node_hours_left']} left"
                  if "node_hours_budget" in p else "")
        lines.insert(2, f"pool {p['pool']}: {p['serving']} serving, {p['live']} live "
                        f"(min {p['min_allocations']}, max {p['max_allocations']}){budget}")
    for a in s["allocations"]:
        left = "-" if a["walltime_left_s"] is None else f"{a['walltime_left_s']}s"
        lines.append(f"{a['id']:24} {a['provider']:8} {a['job']:18} {a['phase']:9} "
                     f"{a['node'] or '-':14} {left}")
    for app, info in s.get("applications", {}).items():
        lines += ["", f"application {app}: {info['status']}"]
        for dep, d in info["deployments"].items():
            where = ", ".join(f"{r['state']}@{r['node_ip']}" for r in d["replicas"]) or "-"
            lines.append(f"  {dep:24} {d['status']:10} {where}")
    if s.get("failover_models"):
        lines += ["", "mid-stream failover (through the head's relay): "
                  + ", ".join(s["failover_models"])]
    if s.get("access"):
        lines += [""] + [render_access(h) for h in s["access"]]
    if s.get("ports"):
        lines += ["", f"{'LISTENING ON':24} {'ROLE':50} {'CLIENTS NEED':22} REACHABLE FROM"]
        lines += [f"{p['host'] + ':' + str(p['port']):24} {p['role']:50} {p['auth']:22} "
                  f"{p['reach']}" for p in s["ports"]]
    if s.get("events"):
        lines += ["", "recent events:"] + [f"  {e}" for e in s["events"]]
    return "\n".join(lines)
