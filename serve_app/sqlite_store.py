"""The one way the data plane opens its SQLite stores (access, batch)."""

from __future__ import annotations

import os
import sqlite3


def connect(path: str, schema: str) -> sqlite3.Connection:
    """Open (creating it with mode 0600, and its directory) a WAL-mode store that
    several processes may share, with ``schema`` applied."""
    if not os.path.exists(path):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
    conn = sqlite3.connect(path, timeout=10, isolation_level=None)
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA journal_mode=WAL")
    conn.executescript(schema)
    return conn
