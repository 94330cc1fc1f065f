"""The head's batch database (SQLite): files and batches, each with its owner.

Written by the batch service (``service``); read by it and by ``hpcserve batches``.
A batch row keeps the OpenAI batch object as JSON (what the API returns, counts
updated while it runs) and, apart, what only the service needs (``internal``: the
caller, the paths of its output and error files).  ``seq`` orders rows for
pagination (ids are random).  ``owner`` is the caller's project ("" without
authentication); a lookup with ``owner=None`` sees every row (the CLI).
"""

from __future__ import annotations

import json
import sqlite3
import time
from typing import Any

from serve_app import sqlite_store

_SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE, owner TEXT NOT NULL,
    purpose TEXT NOT NULL, filename TEXT NOT NULL, bytes INTEGER NOT NULL,
    created_at INTEGER NOT NULL, expires_at INTEGER, path TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS files_owner ON files (owner, seq);
CREATE TABLE IF NOT EXISTS batches (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE, owner TEXT NOT NULL,
    status TEXT NOT NULL, object TEXT NOT NULL, internal TEXT NOT NULL,
    updated_at REAL NOT NULL);
CREATE INDEX IF NOT EXISTS batches_owner ON batches (owner, seq);
CREATE INDEX IF NOT EXISTS batches_status ON batches (status);
"""


def connect(path: str) -> sqlite3.Connection:
    return sqlite_store.connect(path, _SCHEMA)


def _owned(owner: str | None) -> tuple[str, tuple]:
    return ("", ()) if owner is None else (" AND owner=?", (owner,))


# ---- files ----------------------------------------------------------------------
def add_file(conn: sqlite3.Connection, row: dict[str, Any]) -> None:
    conn.execute("INSERT OR IGNORE INTO files (id, owner, purpose, filename, bytes, "
                 "created_at, expires_at, path) VALUES (:id, :owner, :purpose, :filename, "
                 ":bytes, :created_at, :expires_at, :path)", row)


def get_file(conn: sqlite3.Connection, owner: str | None, file_id: str) -> sqlite3.Row | None:
    where, args = _owned(owner)
    return conn.execute(f"SELECT * FROM files WHERE id=?{where}", (file_id, *args)).fetchone()


def list_files(conn: sqlite3.Connection, owner: str | None, *, purpose: str | None = None,
               after: str | None = None, limit: int = 10000,
               order: str = "desc") -> tuple[list[sqlite3.Row], bool]:
    """A page of files, newest first (``order="asc"``: oldest first), and whether
    more follow."""
    where, args = _owned(owner)
    if purpose:
        where, args = where + " AND purpose=?", (*args, purpose)
    op, direction = ("<", "DESC") if order == "desc" else (">", "ASC")
    if after:
        cursor = conn.execute("SELECT seq FROM files WHERE id=?", (after,)).fetchone()
        if cursor is None:
            return [], False
        where, args = where + f" AND seq {op} ?", (*args, cursor["seq"])
    rows = conn.execute(f"SELECT * FROM files WHERE 1=1{where} ORDER BY seq {direction} "
                        "LIMIT ?", (*args, limit + 1)).fetchall()
    return rows[:limit], len(rows) > limit


def delete_file(conn: sqlite3.Connection, file_id: str) -> None:
    conn.execute("DELETE FROM files WHERE id=?", (file_id,))


def expired_files(conn: sqlite3.Connection, now: float) -> list[sqlite3.Row]:
    return conn.execute("SELECT * FROM files WHERE expires_at IS NOT NULL AND expires_at < ?",
                        (now,)).fetchall()


# ---- batches --------------------------------------------------------------------
def add_batch(conn: sqlite3.Connection, obj: dict[str, Any], owner: str,
              internal: dict[str, Any]) -> None:
    conn.execute("INSERT INTO batches (id, owner, status, object, internal, updated_at) "
                 "VALUES (?,?,?,?,?,?)", (obj["id"], owner, obj["status"], json.dumps(obj),
                                          json.dumps(internal), time.time()))


def save_batch(conn: sqlite3.Connection, obj: dict[str, Any]) -> None:
    conn.execute("UPDATE batches SET status=?, object=?, updated_at=? WHERE id=?",
                 (obj["status"], json.dumps(obj), time.time(), obj["id"]))


def _batch(row: sqlite3.Row | None) -> dict[str, Any] | None:
    if row is None:
        return None
    return {"object": json.loads(row["object"]), "internal": json.loads(row["internal"]),
            "owner": row["owner"], "updated_at": row["updated_at"]}


def get_batch(conn: sqlite3.Connection, owner: str | None,
              batch_id: str) -> dict[str, Any] | None:
    """``{"object", "internal", "owner", "updated_at"}`` or None."""
    where, args = _owned(owner)
    return _batch(conn.execute(f"SELECT * FROM batches WHERE id=?{where}",
                               (batch_id, *args)).fetchone())


def list_batches(conn: sqlite3.Connection, owner: str | None, *, after: str | None = None,
                 limit: int = 10000) -> tuple[list[dict[str, Any]], bool]:
    """A page of batch objects, newest first, and whether more follow."""
    where, args = _owned(owner)
    if after:
        cursor = conn.execute("SELECT seq FROM batches WHERE id=?", (after,)).fetchone()
        if cursor is None:
            return [], False
        where, args = where + " AND seq < ?", (*args, cursor["seq"])
    rows = conn.execute(f"SELECT object FROM batches WHERE 1=1{where} ORDER BY seq DESC "
                        "LIMIT ?", (*args, limit + 1)).fetchall()
    return [json.loads(r["object"]) for r in rows[:limit]], len(rows) > limit


def batches_with_status(conn: sqlite3.Connection,
                        statuses: tuple[str, ...]) -> list[dict[str, Any]]:
    marks = ",".join("?" * len(statuses))
    rows = conn.execute(f"SELECT * FROM batches WHERE status IN ({marks}) ORDER BY seq",
                        statuses).fetchall()
    return [_batch(r) for r in rows]


def file_in_use(conn: sqlite3.Connection, file_id: str,
                statuses: tuple[str, ...]) -> str | None:
    """The id of an unfinished batch reading ``file_id``, if any."""
    marks = ",".join("?" * len(statuses))
    for row in conn.execute(f"SELECT id, object FROM batches WHERE status IN ({marks})",
                            statuses):
        if json.loads(row["object"])["input_file_id"] == file_id:
            return row["id"]
    return None
