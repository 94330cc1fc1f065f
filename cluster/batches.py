"""Batches on the control-plane side: where their files live, and `hpcserve batches`.

``set_batch_paths`` gives every app with ``batch.enabled`` its files directory and
store under the service's home (``<home>/files``, ``<home>/batch.db``) where the
config names none, before ``up`` or ``deploy`` sends the config to Serve.  Both
are outside ``<home>/run``, which ``up`` clears: batches outlive a restart of the
whole head.  ``hpcserve batches`` reads the store directly (no Ray needed), so it
works while the head is down too.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from cluster.config import APP_IMPORT_PATH, HpcserveConfig


def set_batch_paths(config: HpcserveConfig, home: Path) -> None:
    """Fill in ``batch.files_dir`` and ``batch.store`` (relative ones are relative to
    ``home``) in the args of every hpcserve app that enables batches."""
    for app in config.serve.get("applications") or []:
        if app.get("import_path") != APP_IMPORT_PATH:
            continue
        args = app.get("args") or {}
        batch = args.get("batch")
        if not isinstance(batch, dict) or not batch.get("enabled"):
            continue
        batch = dict(batch)
        for name, default in (("files_dir", "files"), ("store", "batch.db")):
            batch[name] = str((home / (batch.get(name) or default)).resolve())
        app["args"] = {**args, "batch": batch}


def batch_stores(home: Path) -> list[Path]:
    """The batch stores of the service at ``home`` (as its recorded config says)."""
    from cluster.config import load_config
    stores: list[Path] = []
    config_file = home / "run" / "config.yaml"
    if config_file.exists():
        try:
            config = load_config(config_file)
        except Exception:  # a config that no longer loads: the default place
            config = None
        if config is not None:
            set_batch_paths(config, home)
            for app in config.serve.get("applications") or []:
                batch = (app.get("args") or {}).get("batch") or {}
                if batch.get("enabled") and Path(batch["store"]) not in stores:
                    stores.append(Path(batch["store"]))
    return stores or [home / "batch.db"]


# ---- presentation -----------------------------------------------------------------
def _duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


def progress_line(obj: dict[str, Any], now: float | None = None) -> str:
    """``done/total (pct), rate, ETA`` while it runs; the totals once it is over."""
    now = time.time() if now is None else now
    counts = obj.get("request_counts") or {}
    total = counts.get("total", 0)
    done = counts.get("completed", 0) + counts.get("failed", 0)
    pct = f" ({100 * done / total:.0f}%)" if total else ""
    line = f"{done}/{total}{pct}, {counts.get('failed', 0)} failed"
    started = obj.get("in_progress_at")
    if not started:
        return line
    end = next((obj[k] for k in ("completed_at", "cancelled_at", "expired_at", "failed_at")
                if obj.get(k)), None)
    elapsed = max(1e-9, (end or now) - started)
    rate = done / elapsed
    out_tokens = (obj.get("usage") or {}).get("output_tokens", 0)
    line += f", {rate:.1f} lines/s, {out_tokens / elapsed:.0f} output tokens/s"
    if end:
        return line + f", took {_duration(elapsed)}"
    if obj.get("status") == "in_progress" and rate > 0 and done < total:
        line += f", ETA {_duration((total - done) / rate)}"
    return line


def _when(ts: int | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else "-"


def render_list(rows: list[tuple[str, dict[str, Any]]]) -> str:
    if not rows:
        return "no batches"
    lines = [f"{'ID':<32} {'STATUS':<11} {'PROJECT':<12} {'ENDPOINT':<21} "
             f"{'CREATED':<19}  PROGRESS"]
    for owner, obj in rows:
        lines.append(f"{obj['id']:<32} {obj['status']:<11} {owner or '-':<12} "
                     f"{obj['endpoint']:<21} {_when(obj['created_at']):<19}  "
                     f"{progress_line(obj)}")
    return "\n".join(lines)


def render_show(owner: str, obj: dict[str, Any]) -> str:
    usage = obj.get("usage") or {}
    lines = [f"batch      {obj['id']}", f"status     {obj['status']}",
             f"project    {owner or '-'}", f"endpoint   {obj['endpoint']}",
             f"model      {obj.get('model') or '-'}", f"input      {obj['input_file_id']}",
             f"output     {obj.get('output_file_id') or '-'}",
             f"errors     {obj.get('error_file_id') or '-'}",
             f"progress   {progress_line(obj)}",
             f"tokens     {usage.get('input_tokens', 0)} in, "
             f"{usage.get('output_tokens', 0)} out"]
    for key in ("created_at", "in_progress_at", "finalizing_at", "completed_at",
                "cancelling_at", "cancelled_at", "failed_at", "expired_at", "expires_at"):
        if obj.get(key):
            lines.append(f"{key:<15}{_when(obj[key])}")
    if obj.get("metadata"):
        lines.append(f"metadata   {json.dumps(obj['metadata'])}")
    errors = (obj.get("errors") or {}).get("data") or []
    for e in errors[:10]:
        lines.append(f"  error: {e.get('code')}: {e.get('message')}")
    if len(errors) > 10:
        lines.append(f"  ... {len(errors) - 10} more (the error file has every one)")
    return "\n".join(lines)


# ---- the command --------------------------------------------------------------------
def _cmd_batches(args) -> int:
    from cluster.service import home_dir
    from serve_app.batch import store
    paths = [Path(args.store)] if args.store else batch_stores(home_dir(args.home))
    found: list[tuple[str, dict[str, Any]]] = []
    for path in paths:
        if not path.exists():
            continue
        conn = store.connect(str(path))
        try:
            if args.action == "show":
                row = store.get_batch(conn, None, args.id)
                if row is not None:
                    found.append((row["owner"], row["object"]))
            else:
                marks = conn.execute("SELECT owner, object FROM batches ORDER BY seq DESC "
                                     "LIMIT ?", (args.limit,)).fetchall()
                found += [(r["owner"], json.loads(r["object"])) for r in marks]
        finally:
            conn.close()
    if args.action == "show" and not found:
        print(f"hpcserve: no batch '{args.id}' in {', '.join(map(str, paths))}")
        return 1
    if args.json:
        print(json.dumps([{"project": o, **b} for o, b in found], indent=2))
    elif args.action == "show":
        print(render_show(*found[0]))
    else:
        print(render_list(found))
    return 0


def add_parser(sub, with_home) -> None:
    p = with_home(sub.add_parser("batches", help="batches and their progress (done/total, "
                                 "rate, ETA), from the head's batch store"))
    p.add_argument("action", nargs="?", choices=("list", "show"), default="list")
    p.add_argument("id", nargs="?", help="the batch to show")
    p.add_argument("--limit", type=int, default=50, help="list at most this many (newest "
                   "first; default 50)")
    p.add_argument("--store", help="the batch store (default: from the running config, "
                   "else <home>/batch.db)")
    p.add_argument("--json", action="store_true")

    def run(args) -> int:
        if args.action == "show" and not args.id:
            p.error("show needs a batch id")
        return _cmd_batches(args)
    p.set_defaults(func=run)
