"""The one way the data plane opens and writes its SQLite stores (access, batch)."""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager


def connect(path: str, schema: str) -> sqlite3.Connection:
    """Open (creating it with mode 0600, and its directory) a WAL-mode store that
    several processes may share, with ``schema`` applied.  The connection is in
    autocommit mode: a write of more than one statement goes in ``transaction``."""
    if not os.path.exists(path):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
    conn = sqlite3.connect(path, timeout=10, isolation_level=None)
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA journal_mode=WAL")
    conn.executescript(schema)
    return conn


@contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """All the statements inside commit together or not at all.

    In autocommit mode ``with conn:`` opens no transaction, so every statement
    commits (and syncs the disk) on its own: a batch of usage rows cost one disk
    sync per row, which on a slow disk left the ledger behind a flood, and a key's
    row and the keys version could be seen apart.  ``BEGIN IMMEDIATE`` takes the
    write lock at once, so two writers wait (``timeout``) instead of failing midway.
    """
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:  # a failed COMMIT too: never leave it open
            conn.execute("ROLLBACK")
        raise
