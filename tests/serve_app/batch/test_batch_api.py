"""The Files and Batches API end to end: the official ``openai`` client against a
real ``hpcserve up`` with the tiny model, access on (a static key, OIDC tokens of
two projects, the usage ledger).

A batch of 2,000 chat lines completes with one valid completion per custom_id whose
usage adds up to the batch's totals and to the ledger's; bad lines land in the error
file with their line numbers while the good ones complete; a cancel leaves partial
output and no engine work after it settles; the batch service's replica killed
mid-batch (and, separately, the control loop) still gives every line exactly once;
the completion window's end gives ``expired``; a batch outlives ``hpcserve down``
and ``up``; pages of ``GET /v1/batches``; a
project never sees another's files or batches.
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import sqlite3
import time
from pathlib import Path

import httpx
import openai
import pytest

from serve_app.processes import pid_alive, session_members
from tests.conftest import default_config
from tests.serve_app.access.oidc_issuer import AUDIENCE, ISSUER, Issuer

KEY = "sk-batch-test-key"
BATCH_REPLICA = "ray::ServeReplica:hpcserve:batch"
TERMINAL = ("completed", "failed", "expired", "cancelled")


@pytest.fixture(scope="module")
def issuer(tmp_path_factory):
    return Issuer(tmp_path_factory.mktemp("oidc"))


@pytest.fixture(scope="module")
def stack(hpcserve_stack, stats_probe, issuer, tmp_path_factory):
    access_db = tmp_path_factory.mktemp("access") / "access.db"
    config = default_config(args={
        "api_keys": [KEY],
        "access": {"store": str(access_db), "projects": {"proj-a": {}, "proj-b": {}},
                   "oidc": {"issuer": ISSUER, "audience": AUDIENCE,
                            "jwks_file": str(issuer.jwks_file),
                            "project_map": {"/proj-a": "proj-a", "/proj-b": "proj-b"}}},
        "batch": {"enabled": True, "max_concurrency": 32}})
    s = hpcserve_stack(config, name="batch")
    s.access_db = access_db
    s.stats = stats_probe(s.head, "engine-tiny")
    yield s
    s.stats.close()
    s.down()


def chat_line(i: int, max_tokens: int = 4, **extra) -> dict:
    return {"custom_id": f"req-{i}", "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": "tiny", "max_tokens": max_tokens, "temperature": 0,
                     "messages": [{"role": "user", "content": f"Question {i}: hello?"}],
                     **extra}}


def jsonl(lines: list) -> bytes:
    return b"".join((x if isinstance(x, bytes) else json.dumps(x).encode()) + b"\n"
                    for x in lines)


def submit(client: openai.OpenAI, lines: list, window: str = "24h", **kwargs):
    uploaded = client.files.create(file=("input.jsonl", io.BytesIO(jsonl(lines))),
                                   purpose="batch")
    assert uploaded.purpose == "batch" and uploaded.bytes == len(jsonl(lines))
    return client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                 completion_window=window, **kwargs)


def wait(client: openai.OpenAI, batch_id: str, until, timeout: float = 900):
    """Poll the batch until ``until(batch)``; every object seen is returned."""
    seen, deadline = [], time.monotonic() + timeout
    while True:
        batch = client.batches.retrieve(batch_id)
        seen.append(batch)
        if until(batch):
            return seen
        assert batch.status not in TERMINAL, f"batch ended as {batch.status}: {batch}"
        assert time.monotonic() < deadline, f"timed out: {batch}"
        time.sleep(0.5)


def finished(batch) -> bool:
    return batch.status in TERMINAL


def lines_of(client: openai.OpenAI, file_id: str | None) -> list[dict]:
    if file_id is None:
        return []
    return [json.loads(x) for x in client.files.content(file_id).text.splitlines()]


def ledger(stack, batch_id: str, lines: int) -> tuple[int, int, int]:
    """(rows, prompt tokens, completion tokens) of the batch in the usage ledger, once
    it has ``lines`` rows (replicas send usage every sync_interval_s) or after 60 s."""
    deadline = time.monotonic() + 60
    while True:
        with sqlite3.connect(stack.access_db) as conn:
            found = conn.execute(
                "SELECT COUNT(*), SUM(prompt_tokens), SUM(completion_tokens) FROM usage "
                "WHERE endpoint='batch' AND request_id LIKE ?",
                (f"batch_req_{batch_id.removeprefix('batch_')}_%",)).fetchone()
        if found[0] == lines or time.monotonic() > deadline:
            return found
        time.sleep(0.5)


def test_a_batch_of_2000_chat_lines_completes(stack):
    client = stack.client()
    batch = submit(client, [chat_line(i) for i in range(2000)], metadata={"run": "big"})
    assert batch.status == "validating" and batch.metadata == {"run": "big"}
    seen = wait(client, batch.id, finished)
    batch = seen[-1]
    assert batch.status == "completed", batch
    done = [b.request_counts.completed for b in seen if b.status == "in_progress"]
    assert any(0 < d < 2000 for d in done), "the counts move while the batch runs"
    assert done == sorted(done)
    assert batch.request_counts.total == batch.request_counts.completed == 2000
    assert batch.request_counts.failed == 0 and batch.error_file_id is None
    assert batch.created_at <= batch.in_progress_at <= batch.finalizing_at <= batch.completed_at
    out = lines_of(client, batch.output_file_id)
    assert sorted(r["custom_id"] for r in out) == sorted(f"req-{i}" for i in range(2000))
    assert len({r["id"] for r in out}) == 2000
    for record in out:
        assert record["error"] is None and record["response"]["status_code"] == 200
        body = openai.types.chat.ChatCompletion.model_validate(record["response"]["body"])
        assert body.model == "tiny" and body.choices[0].message.role == "assistant"
        assert 1 <= body.usage.completion_tokens <= 4
    usage = [r["response"]["body"]["usage"] for r in out]
    assert batch.usage.output_tokens == sum(u["completion_tokens"] for u in usage)
    assert batch.usage.input_tokens == sum(u["prompt_tokens"] for u in usage)
    assert batch.usage.total_tokens == sum(u["total_tokens"] for u in usage)
    # the ledger has the same tokens, once per line, under the batch endpoint
    assert ledger(stack, batch.id, 2000) == (2000, batch.usage.input_tokens,
                                             batch.usage.output_tokens)
    # the output file is a file of the caller's, and the CLI shows the batch
    assert client.files.retrieve(batch.output_file_id).purpose == "batch_output"
    shown = stack.cli("batches", "show", batch.id).stdout
    assert "completed" in shown and "2000/2000 (100%), 0 failed" in shown
    assert batch.id in stack.cli("batches").stdout


def test_bad_lines_go_to_the_error_file_and_the_good_lines_complete(stack):
    client = stack.client()
    lines = [chat_line(i) for i in range(20)]
    lines[3] = b'{"custom_id": "req-3", "method": "POST", '                # bad JSON
    lines[5] = {**chat_line(5), "url": "/v1/completions"}                  # wrong url
    lines[7] = chat_line(2)                                                # duplicate id
    lines[9] = {k: v for k, v in chat_line(9).items() if k != "body"}      # no body
    lines[11] = chat_line(11, model="no-such-model")                       # a 404 answer
    batch = wait(client, submit(client, lines).id, finished)[-1]
    assert batch.status == "completed"
    assert (batch.request_counts.total, batch.request_counts.completed,
            batch.request_counts.failed) == (20, 15, 5)
    out = lines_of(client, batch.output_file_id)
    assert sorted(r["custom_id"] for r in out) == sorted(
        f"req-{i}" for i in range(20) if i not in (3, 5, 7, 9, 11))
    errors = {int(r["id"].rpartition("_")[2]): r for r in lines_of(client, batch.error_file_id)}
    assert sorted(errors) == [4, 6, 8, 10, 12]  # line numbers count from 1
    assert [errors[n]["error"]["code"] for n in (4, 6, 8, 10)] == [
        "invalid_json", "invalid_url", "duplicate_custom_id", "missing_body"]
    assert all(errors[n]["error"]["message"].startswith(f"Line {n}:") for n in (4, 6, 8, 10))
    assert errors[12]["error"] is None and errors[12]["response"]["status_code"] == 404
    assert errors[12]["response"]["body"]["error"]["code"] == "model_not_found"
    assert [e.line for e in batch.errors.data] == [4, 6, 8, 10]


def test_cancel_mid_batch_keeps_partial_output_and_stops_engine_work(stack):
    client = stack.client()
    batch = submit(client, [chat_line(i, max_tokens=48, ignore_eos=True) for i in range(1000)])
    wait(client, batch.id, lambda b: b.request_counts.completed >= 40)
    asked = time.monotonic()
    assert client.batches.cancel(batch.id).status == "cancelling"
    batch = wait(client, batch.id, finished, timeout=120)[-1]
    settled = time.monotonic() - asked
    assert batch.status == "cancelled" and batch.cancelled_at >= batch.cancelling_at
    assert settled < 30, f"cancel took {settled:.1f}s"
    before = stack.stats.stats()
    time.sleep(3)
    after = stack.stats.stats()
    assert after["prefills"] == before["prefills"], "no engine work after the cancel"
    assert after["running"] == after["waiting"] == 0
    out = lines_of(client, batch.output_file_id)
    errors = lines_of(client, batch.error_file_id)
    assert 40 <= len(out) < 1000 and len(out) == batch.request_counts.completed
    assert {r["error"]["code"] for r in errors} == {"batch_cancelled"}
    assert sorted(r["custom_id"] for r in out + errors) == sorted(
        f"req-{i}" for i in range(1000))
    print(f"\ncancel settled in {settled:.1f}s with {len(out)} of 1000 lines done")


def _batch_replica(stack) -> int:
    for pid in session_members(stack.head.pid):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()
        except (OSError, UnicodeDecodeError):
            continue
        if cmd == BATCH_REPLICA or cmd.startswith(BATCH_REPLICA + "."):
            return pid
    raise AssertionError("no batch service replica on the head")


def _exactly_once(client, batch, n: int) -> None:
    assert batch.status == "completed", batch
    assert batch.request_counts.completed == n and batch.request_counts.failed == 0
    out = lines_of(client, batch.output_file_id)
    ids = [r["custom_id"] for r in out]
    assert len(ids) == n and sorted(ids) == sorted(f"req-{i}" for i in range(n))
    assert batch.usage.output_tokens == sum(
        r["response"]["body"]["usage"]["completion_tokens"] for r in out)


def test_the_batch_service_killed_mid_batch_resumes_every_line_once(stack):
    client = stack.client()
    batch = submit(client, [chat_line(i, max_tokens=24, ignore_eos=True) for i in range(600)])
    wait(client, batch.id, lambda b: b.request_counts.completed >= 60)
    victim = _batch_replica(stack)
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 60
    while pid_alive(victim):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    batch = wait(client, batch.id, finished)[-1]  # answered by the new replica
    assert _batch_replica(stack) != victim
    _exactly_once(client, batch, 600)


def test_a_control_loop_restart_mid_batch_loses_nothing(stack):
    client = stack.client()
    batch = submit(client, [chat_line(i, max_tokens=24, ignore_eos=True) for i in range(300)])
    wait(client, batch.id, lambda b: b.request_counts.completed >= 30)
    pid_file = stack.home / "run" / "control.pid"
    victim = int(pid_file.read_text())
    os.kill(victim, signal.SIGKILL)  # its supervisor starts another
    deadline = time.monotonic() + 120
    while int(pid_file.read_text()) == victim or not pid_alive(int(pid_file.read_text())):
        assert time.monotonic() < deadline, "the supervisor did not restart the loop"
        time.sleep(0.2)
    _exactly_once(client, wait(client, batch.id, finished)[-1], 300)


def test_the_completion_window_ends_a_slow_batch_as_expired(stack):
    client = stack.client()
    batch = submit(client, [chat_line(i, max_tokens=64, ignore_eos=True) for i in range(2000)],
                   window="4s")
    batch = wait(client, batch.id, finished, timeout=120)[-1]
    assert batch.status == "expired" and batch.expired_at >= batch.expires_at
    out, errors = lines_of(client, batch.output_file_id), lines_of(client, batch.error_file_id)
    assert len(out) < 2000 and len(out) + len(errors) == 2000
    assert {r["error"]["code"] for r in errors} == {"batch_expired"}


def test_batches_are_listed_newest_first_in_pages(stack):
    client = stack.client()
    uploaded = client.files.create(file=("one.jsonl", io.BytesIO(jsonl([chat_line(0)]))),
                                   purpose="batch")
    ids = [client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                 completion_window="24h").id for _ in range(5)]
    page = client.batches.list(limit=2)
    assert [b.id for b in page.data] == ids[:-3:-1] and page.has_more
    listed = [b.id for b in client.batches.list(limit=2)]  # the client follows `after`
    assert listed[:5] == ids[::-1] and len(listed) == len(set(listed))
    raw = httpx.get(f"{stack.base_url}/batches", params={"after": ids[2], "limit": 1},
                    headers={"Authorization": f"Bearer {KEY}"}).json()
    assert [b["id"] for b in raw["data"]] == [ids[1]] and raw["has_more"] is True
    assert raw["first_id"] == raw["last_id"] == ids[1]
    for batch_id in ids:
        wait(client, batch_id, finished)
    # and /openapi.json describes them (serve_app.openapi, checked there against the objects)
    doc = httpx.get(f"{stack.base_url.removesuffix('/v1')}/openapi.json", timeout=30).json()
    assert {"/v1/files", "/v1/files/{file_id}/content", "/v1/batches",
            "/v1/batches/{batch_id}/cancel"} <= set(doc["paths"])


def test_a_project_sees_only_its_own_files_and_batches(stack, issuer):
    def as_project(group: str) -> openai.OpenAI:
        token = issuer.token(groups=[group], exp=int(time.time()) + 3600)
        return openai.OpenAI(base_url=stack.base_url, api_key=token, max_retries=0)
    a, b, static = as_project("/proj-a"), as_project("/proj-b"), stack.client()
    batch = submit(a, [chat_line(i) for i in range(3)])
    for other in (b, static):
        with pytest.raises(openai.NotFoundError):
            other.files.retrieve(batch.input_file_id)
        with pytest.raises(openai.NotFoundError):
            other.batches.retrieve(batch.id)
        with pytest.raises(openai.NotFoundError):
            other.batches.cancel(batch.id)
        with pytest.raises(openai.NotFoundError):
            other.batches.create(input_file_id=batch.input_file_id,
                                 endpoint="/v1/chat/completions", completion_window="24h")
        assert batch.id not in [x.id for x in other.batches.list()]
        assert batch.input_file_id not in [f.id for f in other.files.list()]
    batch = wait(a, batch.id, finished)[-1]
    assert batch.status == "completed"
    with pytest.raises(openai.NotFoundError):
        b.files.content(batch.output_file_id)
    assert len(lines_of(a, batch.output_file_id)) == 3
    assert a.files.delete(batch.input_file_id).deleted
    with pytest.raises(openai.NotFoundError):
        a.files.retrieve(batch.input_file_id)


def test_a_batch_outlives_a_restart_of_the_whole_head(stack):
    """``hpcserve down`` and ``up`` mid-batch; the new head's batch service
    resumes it from the files and store under the home."""
    client = stack.client()
    batch = submit(client, [chat_line(i, max_tokens=24, ignore_eos=True) for i in range(400)])
    wait(client, batch.id, lambda b: b.request_counts.completed >= 40)
    stack.cli("down", timeout=300)
    up = stack.cli("up", "-c", str(stack.home / "config.yaml"), "--timeout", "600",
                   timeout=900)
    assert "ready" in up.stdout
    client = stack.client()
    batch = wait(client, batch.id, finished)[-1]
    _exactly_once(client, batch, 400)
    assert ledger(stack, batch.id, 400) == (400, batch.usage.input_tokens,
                                            batch.usage.output_tokens)  # each line once


def test_a_file_larger_than_one_grpc_message_round_trips(stack):
    """Uploads travel to the batch service in parts and come back as a stream: a file
    above Serve's 4 MiB message cap between replicas is no problem."""
    client = stack.client()
    data = jsonl([chat_line(i, padding="x" * 2000) for i in range(3000)])  # ~6.5 MB
    uploaded = client.files.create(file=('big "x"\r\n.jsonl', io.BytesIO(data)),
                                   purpose="batch")
    assert uploaded.bytes == len(data) > 6_000_000
    content = client.files.with_raw_response.content(uploaded.id)
    assert content.content == data
    assert re.fullmatch(r'attachment; filename="[\w.-]+"',  # quotes and CR LF are not
                        content.headers["content-disposition"])  # repeated into a header
    assert client.files.delete(uploaded.id).deleted
