"""The head's access database (SQLite): managed keys, stored hashed, and the usage ledger.

Written by ``hpcserve keys`` (keys) and by the ledger replica (usage); read by the
ledger (keys, to hand their hashes to replicas) and ``hpcserve usage``.  A key is
32 random bytes, so a plain SHA-256 is the right hash: nothing to brute-force, and a
lookup by hash needs no per-key salt.  The secret itself is printed once by
``create_key`` and never stored.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import sqlite3
import time
from typing import Any, Iterable

from serve_app import sqlite_store

KEY_PREFIX = "hpcs_"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS keys (
    name TEXT PRIMARY KEY, project TEXT NOT NULL, hash TEXT NOT NULL UNIQUE,
    hint TEXT NOT NULL, models TEXT NOT NULL, rpm INTEGER, tpm INTEGER,
    max_concurrent INTEGER, expires_at REAL, revoked_at REAL,
    created_at REAL NOT NULL, updated_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT OR IGNORE INTO meta VALUES ('keys_version', 0);
CREATE TABLE IF NOT EXISTS usage (
    request_id TEXT PRIMARY KEY, ts REAL NOT NULL, key TEXT NOT NULL,
    project TEXT NOT NULL, user TEXT NOT NULL, model TEXT NOT NULL,
    endpoint TEXT NOT NULL, prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL, status INTEGER NOT NULL, latency_ms REAL NOT NULL);
CREATE INDEX IF NOT EXISTS usage_ts ON usage (ts);
"""

KEY_FIELDS = ("project", "models", "rpm", "tpm", "max_concurrent", "expires_at")
USAGE_FIELDS = ("request_id", "ts", "key", "project", "user", "model", "endpoint",
                "prompt_tokens", "completion_tokens", "status", "latency_ms")
GROUPS = {"project": "project", "key": "key", "user": "user", "model": "model"}


class StoreError(LookupError):
    """A key name that does not exist (or already does, for create)."""


def hash_key(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def connect(path: str) -> sqlite3.Connection:
    return sqlite_store.connect(path, _SCHEMA)


def _bump(conn: sqlite3.Connection) -> None:
    conn.execute("UPDATE meta SET value = value + 1 WHERE name = 'keys_version'")


def keys_version(conn: sqlite3.Connection) -> int:
    return conn.execute("SELECT value FROM meta WHERE name='keys_version'").fetchone()[0]


def create_key(conn: sqlite3.Connection, name: str, project: str, *,
               models: list[str] | None = None, rpm: int | None = None,
               tpm: int | None = None, max_concurrent: int | None = None,
               expires_at: float | None = None) -> str:
    """Store a new key and return its secret (the only time it exists in clear)."""
    secret = KEY_PREFIX + secrets.token_urlsafe(32)
    now = time.time()
    try:
        # the name's primary key settles a race between two creates
        with sqlite_store.transaction(conn):
            conn.execute("INSERT INTO keys VALUES (?,?,?,?,?,?,?,?,?,NULL,?,?)",
                         (name, project, hash_key(secret), secret[:len(KEY_PREFIX) + 4],
                          json.dumps(models or ["*"]), rpm, tpm, max_concurrent,
                          expires_at, now, now))
            _bump(conn)
    except sqlite3.IntegrityError:
        raise StoreError(f"a key named '{name}' exists already") from None
    return secret


def update_key(conn: sqlite3.Connection, name: str, **changes: Any) -> None:
    """Change a key's project, models or limits (``None`` clears a limit)."""
    unknown = set(changes) - set(KEY_FIELDS)
    if unknown:
        raise ValueError(f"not a key field: {sorted(unknown)}")
    if "models" in changes:
        changes["models"] = json.dumps(changes["models"] or ["*"])
    if not changes:
        get_key(conn, name)  # only: does it exist
        return
    with sqlite_store.transaction(conn):
        sets = ", ".join(f"{f}=?" for f in changes)
        cur = conn.execute(f"UPDATE keys SET {sets}, updated_at=? WHERE name=?",
                           (*changes.values(), time.time(), name))
        if cur.rowcount == 0:
            raise StoreError(f"no key named '{name}'")
        _bump(conn)


def revoke_key(conn: sqlite3.Connection, name: str) -> None:
    with sqlite_store.transaction(conn):
        cur = conn.execute("UPDATE keys SET revoked_at=?, updated_at=? WHERE name=? "
                           "AND revoked_at IS NULL", (time.time(), time.time(), name))
        if cur.rowcount == 0:
            raise StoreError(f"no active key named '{name}'")
        _bump(conn)


def delete_key(conn: sqlite3.Connection, name: str) -> None:
    """Forget a key (its usage rows stay); for keys nobody was given, like the one
    ``hpcserve up`` makes to send each model its first request."""
    with sqlite_store.transaction(conn):
        if conn.execute("DELETE FROM keys WHERE name=?", (name,)).rowcount == 0:
            raise StoreError(f"no key named '{name}'")
        _bump(conn)


def key_state(key: dict[str, Any], now: float | None = None) -> str:
    """``active``, ``revoked`` or ``expired``."""
    if key["revoked_at"] is not None:
        return "revoked"
    if key["expires_at"] is not None and key["expires_at"] <= (now or time.time()):
        return "expired"
    return "active"


def _public(row: sqlite3.Row) -> dict[str, Any]:
    out = {k: row[k] for k in row.keys() if k != "hash"}
    out["models"] = json.loads(row["models"])
    return out


def list_keys(conn: sqlite3.Connection) -> list[dict[str, Any]]:
    """Every key without its hash: name, project, hint (the secret's first characters),
    models, limits, expiry, revocation, times."""
    return [_public(r) for r in conn.execute("SELECT * FROM keys ORDER BY name")]


def get_key(conn: sqlite3.Connection, name: str) -> dict[str, Any]:
    row = conn.execute("SELECT * FROM keys WHERE name=?", (name,)).fetchone()
    if row is None:
        raise StoreError(f"no key named '{name}'")
    return _public(row)


def usable_keys(conn: sqlite3.Connection) -> dict[str, dict[str, Any]]:
    """hash -> key record, for keys not revoked (expiry is checked per request, so a
    key expires on time even between syncs)."""
    rows = conn.execute("SELECT * FROM keys WHERE revoked_at IS NULL")
    return {r["hash"]: {**_public(r), "hash": r["hash"]} for r in rows}


def keys_by_hash(conn: sqlite3.Connection) -> dict[str, dict[str, Any]]:
    """hash -> key record for every key, revoked ones included (so a revoked key
    gets a 401 that says so rather than one that calls it unknown)."""
    return {r["hash"]: _public(r) for r in conn.execute("SELECT * FROM keys")}


def record_usage(conn: sqlite3.Connection, rows: Iterable[dict[str, Any]]) -> int:
    """Append finished requests; a request id already recorded is skipped, so a
    replica may resend a batch whose acknowledgement it lost."""
    with sqlite_store.transaction(conn):
        cur = conn.executemany(
            f"INSERT OR IGNORE INTO usage VALUES ({','.join('?' * len(USAGE_FIELDS))})",
            [tuple(r[f] for f in USAGE_FIELDS) for r in rows])
    return cur.rowcount


REPORT_COLUMNS = ("requests", "errors", "prompt_tokens", "completion_tokens",
                  "total_tokens")


def usage_report(conn: sqlite3.Connection, *, since: float = 0.0, until: float | None = None,
                 by: str = "project") -> list[dict[str, Any]]:
    """Requests, errors and tokens per ``by`` (project, key, user or model) for the
    requests finished in [since, until)."""
    if by not in GROUPS:
        raise ValueError(f"by: one of {sorted(GROUPS)}, not {by!r}")
    column = GROUPS[by]
    rows = conn.execute(
        f"SELECT {column} AS {by}, COUNT(*) AS requests, "
        "SUM(status >= 400) AS errors, SUM(prompt_tokens) AS prompt_tokens, "
        "SUM(completion_tokens) AS completion_tokens, "
        "SUM(prompt_tokens + completion_tokens) AS total_tokens "
        f"FROM usage WHERE ts >= ? AND ts < ? GROUP BY {column} ORDER BY {column}",
        (since, float("inf") if until is None else until))
    return [dict(r) for r in rows]
