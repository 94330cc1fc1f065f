"""The stores' write path: a batch of statements is one transaction (one disk sync),
all or nothing, on the same real SQLite file the ledger writes."""

import sqlite3

import pytest

from serve_app import sqlite_store
from serve_app.access import store


def _row(i: int) -> dict:
    return {"request_id": f"r{i}", "ts": 1.0 + i, "key": "alice", "project": "chem",
            "user": "", "model": "tiny", "endpoint": "/v1/chat/completions",
            "prompt_tokens": 3, "completion_tokens": 2, "status": 200, "latency_ms": 1.5}


def _wal_frames(conn: sqlite3.Connection) -> int:
    """Pages appended to the write-ahead log since the last checkpoint: each commit
    appends the pages it changed, so per-row commits append at least one per row."""
    return conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()[1]


def test_a_batch_of_usage_rows_is_written_as_one_transaction(tmp_path):
    conn = store.connect(str(tmp_path / "access.db"))
    conn.execute("PRAGMA wal_autocheckpoint=0")  # keep every frame countable
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    assert store.record_usage(conn, [_row(i) for i in range(300)]) == 300
    frames = _wal_frames(conn)
    assert 0 < frames < 60, f"{frames} WAL frames for 300 rows: committed row by row?"
    assert conn.execute("SELECT COUNT(*) FROM usage").fetchone()[0] == 300


def test_a_batch_with_a_bad_row_records_none_of_it_and_the_store_stays_usable(tmp_path):
    conn = store.connect(str(tmp_path / "access.db"))
    rows = [_row(i) for i in range(10)]
    rows[6]["model"] = {"not": "bindable"}  # the insert fails on the seventh row
    with pytest.raises(sqlite3.Error):
        store.record_usage(conn, rows)
    assert conn.execute("SELECT COUNT(*) FROM usage").fetchone()[0] == 0
    assert not conn.in_transaction
    rows[6]["model"] = "tiny"  # the replica resends the batch
    assert store.record_usage(conn, rows) == 10


def test_a_key_and_the_keys_version_change_together(tmp_path):
    conn = store.connect(str(tmp_path / "access.db"))
    before = store.keys_version(conn)
    store.create_key(conn, "alice", "chem")
    assert store.keys_version(conn) == before + 1
    with pytest.raises(store.StoreError):
        store.create_key(conn, "alice", "chem")  # the name exists: nothing changes
    assert store.keys_version(conn) == before + 1
    assert not conn.in_transaction


def test_a_second_writer_is_refused_at_begin_not_midway(tmp_path):
    path = str(tmp_path / "access.db")
    first, second = store.connect(path), store.connect(path)
    second.execute("PRAGMA busy_timeout=200")
    with sqlite_store.transaction(first):
        first.execute("INSERT INTO meta VALUES ('probe', 1)")
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            with sqlite_store.transaction(second):  # BEGIN IMMEDIATE: refused up front
                pass
    assert not second.in_transaction
    assert store.record_usage(second, [_row(1)]) == 1
