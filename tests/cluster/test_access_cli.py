"""`hpcserve keys`, `hpcserve usage` and the access line of `hpcserve status`, run as
the real CLI against a temporary home, with no Ray: they need only the SQLite file."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from cluster.ports import free_port
from serve_app.access import store
from tests.conftest import HPCSERVE, ROOT, default_config


def hpcserve(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*HPCSERVE, *args, "--home", str(home)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def ok(home: Path, *args: str) -> str:
    proc = hpcserve(home, *args)
    assert proc.returncode == 0, (args, proc.stdout, proc.stderr)
    return proc.stdout


def create(home: Path, name: str, *options: str) -> tuple[str, str]:
    """(the secret, everything printed before it)"""
    proc = hpcserve(home, "keys", "create", name, *options)
    assert proc.returncode == 0, proc.stderr
    *summary, secret = proc.stdout.rstrip("\n").split("\n")
    return secret, "\n".join(summary) + proc.stderr


def db(home: Path):
    return store.connect(str(home / "access.db"))


@pytest.fixture
def home(tmp_path) -> Path:
    return tmp_path / "home"  # not there yet: `keys create` makes it


def test_create_prints_the_key_alone_on_the_last_line_and_stores_only_its_hash(home):
    secret, summary = create(home, "alice", "--project", "chem", "--models", "tiny, llama-*",
                             "--rpm", "30", "--tpm", "5000", "--max-concurrent", "2",
                             "--expires", "30d")
    assert secret.startswith(store.KEY_PREFIX) and len(secret) > 40 and " " not in secret
    assert secret not in summary and secret[:9] in summary  # the hint, not the key
    usable = db(home).execute("SELECT * FROM keys").fetchall()
    assert [r["hash"] for r in usable] == [store.hash_key(secret)]
    key = store.usable_keys(db(home))[store.hash_key(secret)]
    assert (key["project"], key["models"], key["rpm"], key["tpm"], key["max_concurrent"]) == (
        "chem", ["tiny", "llama-*"], 30, 5000, 2)
    assert 29.9 * 86400 < key["expires_at"] - time.time() <= 30 * 86400
    files = list(home.iterdir())
    assert any(f.name == "access.db" for f in files)
    for f in files:  # the database, its WAL and shared memory: no secret anywhere
        assert secret.encode() not in f.read_bytes(), f
    assert oct((home / "access.db").stat().st_mode & 0o777) == "0o600"


def test_list_and_show_never_print_a_secret(home):
    alice, _ = create(home, "alice", "--project", "chem", "--rpm", "30")
    bob, _ = create(home, "bob", "--project", "phys", "--models", "tiny",
                    "--expires", "2099-01-01")
    outputs = [ok(home, "keys", "list"), ok(home, "keys", "list", "--json"),
               ok(home, "keys", "show", "alice"), ok(home, "keys", "show", "bob", "--json")]
    for out in outputs:
        assert alice not in out and bob not in out
        assert store.hash_key(alice) not in out and store.hash_key(bob) not in out
    table = outputs[0].splitlines()
    assert table[0].split() == ["NAME", "HINT", "PROJECT", "MODELS", "RPM", "TPM",
                                "CONCURRENT", "EXPIRES", "STATE"]
    assert table[1].split()[:5] == ["alice", alice[:9] + "...", "chem", "*", "30"]
    assert "2099-01-01 00:00" in table[2] and table[2].split()[-1] == "active"
    listed = json.loads(outputs[1])
    assert [(k["name"], k["state"], k["models"]) for k in listed] == [
        ("alice", "active", ["*"]), ("bob", "active", ["tiny"])]
    assert "hash" not in listed[0]
    shown = json.loads(outputs[3])
    assert (shown["project"], shown["hint"], shown["rpm"]) == ("phys", bob[:9], None)
    assert "project:        chem" in outputs[2]


def test_update_and_revoke_change_the_keys_replicas_get(home):
    secret, _ = create(home, "alice", "--project", "chem", "--rpm", "30")
    digest = store.hash_key(secret)
    version = store.keys_version(db(home))
    out = ok(home, "keys", "update", "alice", "--project", "bio", "--models", "tiny",
             "--rpm", "none", "--tpm", "900", "--expires", "12h")
    assert secret not in out
    key = store.usable_keys(db(home))[digest]
    assert (key["project"], key["models"], key["rpm"], key["tpm"]) == ("bio", ["tiny"], None, 900)
    assert 11.9 * 3600 < key["expires_at"] - time.time() <= 12 * 3600
    assert store.keys_version(db(home)) > version  # what replicas poll to pick it up
    ok(home, "keys", "update", "alice", "--expires", "never")
    assert store.usable_keys(db(home))[digest]["expires_at"] is None

    out = ok(home, "keys", "revoke", "alice")
    assert "revoked" in out and secret not in out
    assert digest not in store.usable_keys(db(home))
    assert json.loads(ok(home, "keys", "show", "alice", "--json"))["state"] == "revoked"

    store.update_key(db(home), "alice", expires_at=time.time() - 1)  # revoked wins
    create(home, "old", "--project", "chem")
    store.update_key(db(home), "old", expires_at=time.time() - 1)
    states = {k["name"]: k["state"] for k in json.loads(ok(home, "keys", "list", "--json"))}
    assert states == {"alice": "revoked", "old": "expired"}


@pytest.fixture(scope="module")
def one_key(tmp_path_factory) -> tuple[Path, str]:
    """A home with one key, alice, which no bad command may change."""
    home = tmp_path_factory.mktemp("one-key")
    return home, create(home, "alice", "--project", "chem")[0]


@pytest.mark.parametrize("args, code, message", [
    (["keys", "create", "alice", "--project", "chem"], 1, "a key named 'alice' exists already"),
    (["keys", "create", "bob", "--project", "chem", "--expires", "next week"], 2,
     "'next week' is neither an ISO date (YYYY-MM-DD, YYYY-MM-DDTHH:MM) nor a duration"),
    (["keys", "create", "bob", "--project", "chem", "--expires", "2001-02-03"], 2,
     "--expires 2001-02-03: that is in the past"),
    (["keys", "create", "bob", "--project", "chem", "--rpm", "0"], 2,
     "argument --rpm: a positive integer, not '0'"),
    (["keys", "create", "bob"], 2, "the following arguments are required: --project"),
    (["keys", "create", "bad name", "--project", "chem"], 2, "letters, digits and ._@:/- only"),
    (["keys", "update", "alice"], 2, "nothing to change"),
    (["keys", "update", "alice", "--tpm", "-5"], 2, "a positive integer or 'none', not '-5'"),
    (["keys", "update", "nobody", "--rpm", "5"], 1, "no key named 'nobody'"),
    (["keys", "show", "nobody"], 1, "no key named 'nobody'"),
    (["keys", "revoke", "nobody"], 1, "no key named 'nobody'"),
    (["usage", "--since", "last tuesday"], 2, "'last tuesday' is neither an ISO date"),
    (["usage", "--by", "colour"], 2, "argument --by: invalid choice: 'colour'"),
])
def test_bad_input_fails_with_a_clear_message(one_key, args, code, message):
    home, secret = one_key
    proc = hpcserve(home, *args)
    assert proc.returncode == code, (proc.stdout, proc.stderr)
    assert message in proc.stderr
    assert secret not in proc.stdout + proc.stderr
    assert [k["name"] for k in store.list_keys(db(home))] == ["alice"]  # nothing changed


def test_read_commands_without_a_database_say_where_it_should_be(home):
    for args in (["keys", "list"], ["keys", "show", "a"], ["usage"]):
        proc = hpcserve(home, *args)
        assert proc.returncode == 1
        assert f"no access database at {home / 'access.db'}" in proc.stderr
    assert not home.exists()  # and they made none


def _usage(i: int, ts: float, key: str, project: str, user: str, model: str,
           prompt: int, completion: int, status: int = 200) -> dict:
    return {"request_id": f"r{i}", "ts": ts, "key": key, "project": project, "user": user,
            "model": model, "endpoint": "/v1/chat/completions", "prompt_tokens": prompt,
            "completion_tokens": completion, "status": status, "latency_ms": 12.5}


def test_usage_reports_by_each_grouping_in_each_format(home):
    now = time.time()
    rows = [_usage(1, now - 60, "alice", "chem", "", "tiny", 10, 5),
            _usage(2, now - 50, "alice", "chem", "", "big", 20, 7),
            _usage(3, now - 40, "oidc:eve", "phys", "eve", "tiny", 3, 0, status=429),
            _usage(4, now - 30, "bob", "phys", "", "tiny", 8, 8),
            _usage(5, now - 10 * 86400, "bob", "phys", "", "big", 1000, 1000)]  # 10 days ago
    home.mkdir()
    conn = db(home)  # what the ledger replica writes
    assert store.record_usage(conn, rows) == 5
    assert store.record_usage(conn, rows[:1]) == 0  # a resent batch counts once
    expected = {  # since 7d: rows 1-4
        "project": {"chem": (2, 0, 30, 12), "phys": (2, 1, 11, 8)},
        "key": {"alice": (2, 0, 30, 12), "bob": (1, 0, 8, 8), "oidc:eve": (1, 1, 3, 0)},
        "user": {"": (3, 0, 38, 20), "eve": (1, 1, 3, 0)},
        "model": {"big": (1, 0, 20, 7), "tiny": (3, 1, 21, 13)},
    }
    for by, groups in expected.items():
        report = json.loads(ok(home, "usage", "--since", "7d", "--by", by, "--format", "json"))
        assert report["by"] == by and now - 7 * 86400 - 60 < report["since"] < now
        got = {r[by]: (r["requests"], r["errors"], r["prompt_tokens"], r["completion_tokens"])
               for r in report["rows"]}
        assert got == groups
        assert all(r["total_tokens"] == r["prompt_tokens"] + r["completion_tokens"]
                   for r in report["rows"])
        assert report["total"] == {"requests": 4, "errors": 1, "prompt_tokens": 41,
                                   "completion_tokens": 20, "total_tokens": 61}

        parsed = list(csv.DictReader(io.StringIO(
            ok(home, "usage", "--since", "7d", "--by", by, "--format", "csv"))))
        assert {r[by]: (int(r["requests"]), int(r["errors"]), int(r["prompt_tokens"]),
                        int(r["completion_tokens"])) for r in parsed} == groups

    everything = json.loads(ok(home, "usage", "--format", "json", "--by", "model"))
    assert everything["total"]["total_tokens"] == 61 + 2000 and everything["since"] is None
    since_date = time.strftime("%Y-%m-%d", time.localtime(now - 20 * 86400))
    assert json.loads(ok(home, "usage", "--since", since_date, "--format", "json")
                      )["total"]["requests"] == 5
    table = ok(home, "usage", "--since", "7d").splitlines()
    assert table[0].startswith("usage since ") and table[0].endswith("by project")
    assert table[1].split()[:3] == ["PROJECT", "REQUESTS", "ERRORS"]
    assert table[2].split() == ["chem", "2", "0", "30", "12", "42"]
    assert table[-1].split() == ["TOTAL", "4", "1", "41", "20", "61"]


@pytest.fixture
def fake_head(home):
    """A run dir as `up` leaves it, with a live process standing in for the head and a
    dashboard that does not answer: enough for `status`, without Ray."""
    run = home / "run"
    run.mkdir(parents=True)
    config = default_config(args={"access": {"managed_keys": True}})
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    stand_in = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    port = free_port()
    (run / "head.json").write_text(json.dumps({
        "pid": stand_in.pid, "node_ip": "127.0.0.1", "gcs_address": "127.0.0.1:1",
        "dashboard_url": f"http://127.0.0.1:{port}", "metrics_port": 1,
        "http_url": "http://127.0.0.1:1", "temp_dir": str(home / "ray"),
        "token_path": str(home / "auth_token")}))
    yield home
    stand_in.kill()
    stand_in.wait()


def _status(home: Path) -> tuple[str, dict]:
    return ok(home, "status"), json.loads(ok(home, "status", "--json"))


def test_status_shows_the_ledgers_report_on_the_access_store(fake_head):
    home = fake_head
    text, status = _status(home)
    assert "access:" not in text and status["access"] == []  # no report yet

    health = {"ts": time.time(), "store_ok": True, "store_error": None, "keys": 3,
              "oidc": {"ok": True, "error": None, "last_refresh": time.time() - 20},
              "replicas": 2, "unsent_usage": 0}
    (home / "access-health.json").write_text(json.dumps(health))
    text, status = _status(home)
    (line,) = [ln for ln in text.splitlines() if ln.startswith("access:")]
    assert line == ("access: store ok, 3 keys, OIDC JWKS ok, 2 replicas reporting, "
                    "0 usage records unsent")
    (reported,) = status["access"]
    assert reported["keys"] == 3 and reported["stale"] is False
    assert reported["path"] == str(home / "access-health.json")

    health.update(ts=time.time() - 100, store_ok=False, keys=3,
                  store_error="database disk image is malformed",
                  oidc={"ok": False, "error": "JWKS fetch: connection refused",
                        "last_refresh": time.time() - 400})
    tmp = home / "access-health.json.tmp"
    tmp.write_text(json.dumps(health))
    os.replace(tmp, home / "access-health.json")
    text, status = _status(home)
    (line,) = [ln for ln in text.splitlines() if ln.startswith("access:")]
    assert "store FAILING (database disk image is malformed)" in line
    assert "OIDC JWKS FAILING (JWKS fetch: connection refused)" in line
    stale = re.search(r"STALE: the ledger's last report is (\d+)s old", line)
    assert stale and 100 <= int(stale.group(1)) < 160, line  # 100 s + the CLI's own start
    assert status["access"][0]["stale"] is True and status["access"][0]["age_s"] >= 100


def test_up_makes_a_key_for_its_first_requests_and_deletes_it(tmp_path):
    from cluster.service import UP_KEY, _first_request_key
    path = tmp_path / "access.db"
    app = default_config(args={"access": {"managed_keys": True, "store": str(path)}})
    app = app["applications"][0]
    store.create_key(db(tmp_path), UP_KEY, "hpcserve")  # left by an `up` that was killed
    with _first_request_key(app) as headers:
        secret = headers["Authorization"].removeprefix("Bearer ")
        key = store.usable_keys(db(tmp_path))[store.hash_key(secret)]
        assert key["name"] == UP_KEY and key["expires_at"] < time.time() + 601
    assert [k["name"] for k in store.list_keys(db(tmp_path))] == []

    keys_file = tmp_path / "keys"
    keys_file.write_text("\nfrom-file\n")
    oidc = {"issuer": "i", "audience": "a", "jwks_file": "j"}
    for args, expected in (({"api_keys_file": str(keys_file)},
                            {"Authorization": "Bearer from-file"}),
                           ({}, {}),  # no credentials
                           ({"access": {"oidc": oidc}}, None)):  # OIDC only: no token
        with _first_request_key(default_config(args=args)["applications"][0]) as headers:
            assert headers == expected
