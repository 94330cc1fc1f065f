"""`hpcserve keys` and `hpcserve usage`: the operator's side of access.

Both work on the head's access database, ``<home>/access.db`` (SQLite), with or
without the service running.  A key's secret is printed once, by ``keys create``,
alone on the last line of its output; nothing else prints or logs it.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import sys
import time
from datetime import datetime
from pathlib import Path

from serve_app.access import store as db

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhdw])$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@:/-]*$")
NO_LIMIT = "none"
NEVER = "never"
_UNSET = object()  # `keys update`: an option not given (None means "no limit")


class UsageError(ValueError):
    """Bad command-line input: printed as ``hpcserve: <message>``, exit 2."""


def parse_time(text: str, *, future: bool, now: float | None = None) -> float:
    """A duration (``30d``, ``12h``, ``90m``, ``2w``, ``45s``) from now (``future``) or
    ago, or an ISO date / datetime (a date is its 00:00; no zone: local time)."""
    now = time.time() if now is None else now
    match = _DURATION.match(text.strip())
    if match:
        seconds = float(match[1]) * _UNIT_S[match[2]]
        return now + seconds if future else now - seconds
    try:
        return datetime.fromisoformat(text.strip()).timestamp()
    except ValueError:
        raise UsageError(f"{text!r} is neither an ISO date (YYYY-MM-DD, YYYY-MM-DDTHH:MM) "
                         "nor a duration (30d, 12h, 90m, 2w)") from None


def _expiry(text: str | None) -> float | None:
    if text is None or text == NEVER:
        return None
    ts = parse_time(text, future=True)
    if ts <= time.time():
        raise UsageError(f"--expires {text}: that is in the past")
    return ts


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) <= 0:
        raise argparse.ArgumentTypeError(f"a positive integer, not {text!r}")
    return int(text)


def _limit(text: str) -> int | None:
    """``keys update``: a new limit, or ``none`` for no limit."""
    try:
        return None if text == NO_LIMIT else _positive(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"a positive integer or '{NO_LIMIT}', not {text!r}") from None


def _name(text: str) -> str:
    if not _NAME.match(text):
        raise argparse.ArgumentTypeError(f"{text!r}: letters, digits and ._@:/- only, "
                                         "starting with a letter or digit")
    return text


def _models(text: str) -> list[str]:
    globs = [g.strip() for g in text.split(",") if g.strip()]
    if not globs:
        raise argparse.ArgumentTypeError("one or more model names or globs, comma-separated")
    return globs


def store_path(args) -> Path:
    from cluster.config import access_store_of
    from cluster.service import home_dir
    return Path(args.store) if args.store else access_store_of(home_dir(args.home))


def _open(args, create: bool = False):
    path = store_path(args)
    if not path.exists() and not create:
        raise db.StoreError(f"no access database at {path} (`hpcserve keys create` makes "
                            "it; so does `hpcserve up` with managed keys or OIDC)")
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    return db.connect(str(path))


def _when(ts: float | None, empty: str = "-") -> str:
    return empty if ts is None else time.strftime("%Y-%m-%d %H:%M", time.localtime(ts))


def _view(key: dict) -> dict:
    """A key for showing: never its hash (the store leaves it out) nor its secret."""
    return {**key, "state": db.key_state(key)}


def _table(headers: list[str], rows: list[list]) -> str:
    cells = [headers] + [["-" if c is None else str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells)


def _summary(key: dict) -> list[list]:
    return [["name", key["name"]], ["project", key["project"]],
            ["hint", key["hint"] + "..."], ["models", ",".join(key["models"])],
            ["rpm", key["rpm"]], ["tpm", key["tpm"]], ["max concurrent", key["max_concurrent"]],
            ["expires", _when(key["expires_at"], NEVER)], ["state", db.key_state(key)],
            ["created", _when(key["created_at"])], ["updated", _when(key["updated_at"])],
            ["revoked", _when(key["revoked_at"])]]


def _print_key(key: dict) -> None:
    print("\n".join(f"{label + ':':16}{'-' if value is None else value}"
                    for label, value in _summary(key)))


def cmd_create(args) -> int:
    expires_at = _expiry(args.expires)
    conn = _open(args, create=True)
    secret = db.create_key(conn, args.name, args.project, models=args.models, rpm=args.rpm,
                           tpm=args.tpm, max_concurrent=args.max_concurrent,
                           expires_at=expires_at)
    _print_key(db.get_key(conn, args.name))
    print("the key (shown once; only its hash is stored):")
    print(secret)
    return 0


def cmd_list(args) -> int:
    keys = [_view(k) for k in db.list_keys(_open(args))]
    if args.json:
        print(json.dumps(keys, indent=2))
        return 0
    print(_table(["NAME", "HINT", "PROJECT", "MODELS", "RPM", "TPM", "CONCURRENT",
                  "EXPIRES", "STATE"],
                 [[k["name"], k["hint"] + "...", k["project"], ",".join(k["models"]),
                   k["rpm"], k["tpm"], k["max_concurrent"], _when(k["expires_at"], NEVER),
                   k["state"]] for k in keys]))
    return 0


def cmd_show(args) -> int:
    key = _view(db.get_key(_open(args), args.name))
    if args.json:
        print(json.dumps(key, indent=2))
    else:
        _print_key(key)
    return 0


def cmd_revoke(args) -> int:
    conn = _open(args)
    if db.key_state(db.get_key(conn, args.name)) == "revoked":
        raise db.StoreError(f"key '{args.name}' is revoked already")
    db.revoke_key(conn, args.name)
    print(f"revoked key '{args.name}': every replica refuses it within seconds")
    return 0


def cmd_update(args) -> int:
    changes = {field: getattr(args, field) for field in db.KEY_FIELDS
               if field != "expires_at" and getattr(args, field) is not _UNSET}
    if args.expires is not _UNSET:
        changes["expires_at"] = _expiry(args.expires)
    if not changes:
        raise UsageError("nothing to change: give --project, --models, --rpm, --tpm, "
                         "--max-concurrent or --expires")
    conn = _open(args)
    db.update_key(conn, args.name, **changes)
    _print_key(db.get_key(conn, args.name))
    return 0


def cmd_usage(args) -> int:
    since = parse_time(args.since, future=False) if args.since else 0.0
    rows = db.usage_report(_open(args), since=since, by=args.by)
    total = {c: sum(r[c] or 0 for r in rows) for c in db.REPORT_COLUMNS}
    columns = [args.by, *db.REPORT_COLUMNS]
    if args.format == "json":
        print(json.dumps({"since": since or None, "by": args.by, "rows": rows,
                          "total": total}, indent=2))
    elif args.format == "csv":
        writer = csv.DictWriter(sys.stdout, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    else:
        print(f"usage since {_when(since) if since else 'the start'}, by {args.by}")
        print(_table([c.upper().replace("_", " ") for c in columns],
                     [[r[c] for c in columns] for r in rows]
                     + [["TOTAL", *(total[c] for c in db.REPORT_COLUMNS)]]))
    return 0


def _run(func):
    def run(args) -> int:
        try:
            return func(args)
        except UsageError as err:
            print(f"hpcserve: {err}", file=sys.stderr)
            return 2
        except db.StoreError as err:
            print(f"hpcserve: {err.args[0]}", file=sys.stderr)
            return 1
    return run


def add_parsers(sub, with_home) -> None:
    """``keys ...`` and ``usage`` on ``hpcserve``'s subparsers."""
    def common(p):
        with_home(p)
        p.add_argument("--store", help="the access database (default <home>/access.db)")
        return p

    keys = sub.add_parser("keys", help="managed API keys: create, list, show, update, revoke")
    ksub = keys.add_subparsers(dest="keys_command", required=True)
    p = common(ksub.add_parser("create", help="make a key; prints it once, on the last line"))
    p.add_argument("name", type=_name)
    p.add_argument("--project", required=True, type=_name)
    p.add_argument("--models", type=_models, help="model names or globs, comma-separated "
                   "(default: every model the project may use)")
    for flag in ("--rpm", "--tpm", "--max-concurrent"):
        p.add_argument(flag, type=_positive, metavar="N")
    p.add_argument("--expires", metavar="DATE", help="ISO date/datetime or a duration "
                   "from now (30d, 12h); default never")
    p.set_defaults(func=_run(cmd_create))
    p = common(ksub.add_parser("list", help="every key, without secrets"))
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_run(cmd_list))
    p = common(ksub.add_parser("show", help="one key, without its secret"))
    p.add_argument("name")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_run(cmd_show))
    p = common(ksub.add_parser("revoke", help="refuse a key from now on"))
    p.add_argument("name")
    p.set_defaults(func=_run(cmd_revoke))
    p = common(ksub.add_parser("update", help="change a key's project, models, limits or "
                               "expiry (the secret stays)"))
    p.add_argument("name")
    p.add_argument("--project", type=_name, default=_UNSET)
    p.add_argument("--models", type=_models, default=_UNSET)
    for flag in ("--rpm", "--tpm", "--max-concurrent"):
        p.add_argument(flag, type=_limit, default=_UNSET, metavar="N|none")
    p.add_argument("--expires", default=_UNSET, metavar="DATE|never")
    p.set_defaults(func=_run(cmd_update))

    p = common(sub.add_parser("usage", help="requests and tokens from the usage ledger"))
    p.add_argument("--since", metavar="DATE|DURATION",
                   help="ISO date/datetime, or a duration ago (7d, 12h); default: all")
    p.add_argument("--by", choices=sorted(db.GROUPS), default="project")
    p.add_argument("--format", choices=("table", "csv", "json"), default="table")
    p.set_defaults(func=_run(cmd_usage))
