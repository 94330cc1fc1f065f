"""The batch service without Ray: files, validation, runs to completion, resume
after a crash (torn last line included), cancel, expiry, retries, pagination and
projects -- with a fake engine standing in for the engine deployment's handle."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import orjson
import pytest
from ray.exceptions import RayActorError

from serve_app.batch import store
from serve_app.batch.protocol import line_of
from serve_app.batch.lines import scan
from serve_app.batch.service import BatchServer
from serve_app.protocol import GenerateDelta, Usage

CHAT = "/v1/chat/completions"


class FakeEngine:
    """``handle.generate.remote(req)``: 3 tokens per request.  With ``gate`` every
    request after the first ``free`` waits for ``gate`` before its last token;
    ``fail_first`` requests raise as if their replica died."""

    def __init__(self, gate: bool = False, free: int = 0, fail_first: int = 0):
        self.gate = asyncio.Event()
        if not gate:
            self.gate.set()
        self.free = free
        self.calls: list[str] = []
        self.finished = 0
        self.fail_first = fail_first
        self.generate = self

    def remote(self, req):
        self.calls.append(req.request_id)
        return self._stream(req, len(self.calls))

    async def _stream(self, req, number: int):
        if self.fail_first > 0:
            self.fail_first -= 1
            raise RayActorError()
        prompt = len(req.messages[0].text()) if req.messages else len(req.prompt)
        yield [GenerateDelta(text="ab", num_tokens=2, usage=Usage(prompt, 0))]
        if number > self.free:
            await self.gate.wait()
        yield [GenerateDelta(text="c", num_tokens=1, finish_reason="length",
                             usage=Usage(prompt, 3))]
        self.finished += 1


def config(tmp: Path, **batch) -> dict:
    return {"models": [{"name": "tiny", "engine": "zmq"}, {"name": "other"}],
            "batch": {"enabled": True, "files_dir": str(tmp / "files"),
                      "store": str(tmp / "batch.db"), **batch}}


def service(tmp: Path, engine: FakeEngine, **batch) -> BatchServer:
    server = BatchServer(config(tmp, **batch))
    server.engine = lambda model: engine
    server.max_retries = 2
    return server


def line(i: int, url: str = CHAT, **body) -> dict:
    return {"custom_id": f"req-{i}", "method": "POST", "url": url,
            "body": {"model": "tiny", "messages": [{"role": "user", "content": f"hi {i}"}],
                     "max_tokens": 3, **body}}


async def upload(server: BatchServer, lines: list, owner: str = "") -> str:
    data = b"".join((x if isinstance(x, bytes) else orjson.dumps(x)) + b"\n" for x in lines)
    token = (await server.file_begin(owner, "in.jsonl", "batch", None))["body"]
    for i in range(0, len(data), 1000):  # several parts
        assert (await server.file_part(token, data[i:i + 1000]))["status"] == 200
    answer = await server.file_end(token)
    assert answer["status"] == 200
    assert answer["body"]["bytes"] == len(data)
    return answer["body"]["id"]


async def create(server: BatchServer, file_id: str, owner: str = "", window: str = "24h") -> str:
    answer = await server.batch_create(owner, None, {"input_file_id": file_id, "endpoint": CHAT,
                                               "completion_window": window})
    assert answer["status"] == 200, answer
    return answer["body"]["id"]


async def until(predicate, timeout: float = 20.0):
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


def status(server: BatchServer, batch_id: str, owner: str = "") -> dict:
    return server._batch(owner, batch_id)  # what batch_get answers


async def content(server: BatchServer, file_id: str, owner: str = "") -> list[dict]:
    data = b"".join([c async for c in server.file_content(owner, file_id)])
    return [orjson.loads(x) for x in data.splitlines()]


async def stop(server: BatchServer) -> None:
    """What a killed replica leaves: tasks gone mid-line, nothing finalized."""
    for task in list(server._tasks):
        task.cancel()
    await asyncio.gather(*server._tasks, return_exceptions=True)
    server.conn.close()


def test_scan_names_every_bad_line(tmp_path):
    path = tmp_path / "in.jsonl"
    rows = [orjson.dumps(line(1)), b"{not json", orjson.dumps(line(1)),
            orjson.dumps(line(3, url="/v1/completions")), b"",
            orjson.dumps({**line(4), "method": "GET"}),
            orjson.dumps({k: v for k, v in line(5).items() if k != "body"}),
            orjson.dumps({**line(6), "custom_id": ""}), b"[1]", orjson.dumps(line(7))]
    path.write_bytes(b"\n".join(rows) + b"\n")
    result = scan(str(path), CHAT)
    assert [r[0] for r in result.runnable] == [1, 10]
    assert result.total == 9  # the blank line is not a request
    assert [(e["line"], e["code"]) for e in result.errors] == [
        (2, "invalid_json"), (3, "duplicate_custom_id"), (4, "invalid_url"),
        (6, "invalid_method"), (7, "missing_body"), (8, "missing_custom_id"),
        (9, "invalid_json")]
    assert all(e["message"].startswith(f"Line {e['line']}: ") for e in result.errors)


def test_a_batch_runs_to_completed_with_one_line_per_request(tmp_path):
    async def main():
        engine = FakeEngine()
        server = service(tmp_path, engine, max_concurrency=8)
        bad = [b"{oops", line(0), line(300, url="/v1/completions"),
               {**line(301), "body": None}]
        file_id = await upload(server, [line(i) for i in range(200)] + bad
                         + [line(400, model="nope"), line(401, n=2)])
        batch_id = await create(server, file_id)
        await until(lambda: status(server, batch_id)["status"] == "completed")
        obj = status(server, batch_id)
        assert obj["request_counts"] == {"total": 206, "completed": 200, "failed": 6}
        out = await content(server, obj["output_file_id"])
        assert sorted(r["custom_id"] for r in out) == sorted(f"req-{i}" for i in range(200))
        bodies = [r["response"]["body"] for r in out]
        assert all(r["response"]["status_code"] == 200 and r["error"] is None for r in out)
        assert all(b["object"] == "chat.completion" and
                   b["choices"][0]["message"]["content"] == "abc" for b in bodies)
        assert obj["usage"]["output_tokens"] == sum(
            b["usage"]["completion_tokens"] for b in bodies) == 600
        assert obj["usage"]["input_tokens"] == sum(b["usage"]["prompt_tokens"] for b in bodies)
        errors = {line_of(r["id"]): r for r in await content(server, obj["error_file_id"])}
        assert {n: (r["error"] or {}).get("code") for n, r in errors.items()} == {
            201: "invalid_json", 202: "duplicate_custom_id", 203: "invalid_url",
            204: "invalid_body", 205: None, 206: None}
        assert errors[205]["response"]["status_code"] == 404
        assert errors[206]["response"]["body"]["error"]["param"] == "n"
        assert [e["line"] for e in obj["errors"]["data"]] == [201, 202, 203, 204]
        assert len(engine.calls) == 200
        for key in ("in_progress_at", "finalizing_at", "completed_at"):
            assert obj[key] >= obj["created_at"]
        assert obj["model"] == "tiny"
        # the results are files of the owner, listed with purpose batch_output
        listed = (await server.file_list("", "batch_output", None, 100, "desc"))["body"]["data"]
        assert {f["id"] for f in listed} == {obj["output_file_id"], obj["error_file_id"]}
    asyncio.run(main())


def test_a_restarted_service_finishes_each_line_exactly_once(tmp_path):
    async def main():
        engine = FakeEngine(gate=True, free=10)
        server = service(tmp_path, engine, max_concurrency=4)
        batch_id = await create(server, await upload(server, [line(i) for i in range(40)]))
        await until(lambda: status(server, batch_id)["request_counts"]["completed"] == 10
                    and len(engine.calls) == 14)  # and 4 lines mid-way
        internal = store.get_batch(server.conn, "", batch_id)["internal"]
        await stop(server)
        with open(internal["output_path"], "ab") as f:  # a write cut short
            f.write(b'{"id":"batch_req_torn')
        done_before = len(Path(internal["output_path"]).read_bytes().splitlines()) - 1
        assert done_before == 10

        engine2 = FakeEngine()
        server2 = service(tmp_path, engine2, max_concurrency=4)  # resumes on start
        await until(lambda: status(server2, batch_id)["status"] == "completed")
        obj = status(server2, batch_id)
        out = await content(server2, obj["output_file_id"])
        assert sorted(r["custom_id"] for r in out) == sorted(f"req-{i}" for i in range(40))
        assert len(engine2.calls) == 40 - done_before
        assert obj["request_counts"] == {"total": 40, "completed": 40, "failed": 0}
        assert obj["usage"]["output_tokens"] == 120
    asyncio.run(main())


def test_cancel_stops_new_lines_and_keeps_what_finished(tmp_path):
    async def main():
        engine = FakeEngine(gate=True)
        server = service(tmp_path, engine, max_concurrency=3, cancel_grace_s=5)
        batch_id = await create(server, await upload(server, [line(i) for i in range(30)]))
        await until(lambda: len(engine.calls) == 3)
        assert (await server.batch_cancel("", batch_id))["body"]["status"] == "cancelling"
        engine.gate.set()  # the running lines may finish
        await until(lambda: status(server, batch_id)["status"] == "cancelled")
        obj = status(server, batch_id)
        assert len(engine.calls) == 3  # nothing new after the cancel
        assert obj["request_counts"] == {"total": 30, "completed": 3, "failed": 27}
        assert len(await content(server, obj["output_file_id"])) == 3
        errors = await content(server, obj["error_file_id"])
        assert {r["error"]["code"] for r in errors} == {"batch_cancelled"}
        assert obj["cancelling_at"] <= obj["cancelled_at"]
        assert (await server.batch_cancel("", batch_id))["body"]["status"] == "cancelled"
    asyncio.run(main())


def test_the_completion_window_ends_a_batch_as_expired(tmp_path):
    async def main():
        engine = FakeEngine(gate=True)
        server = service(tmp_path, engine, max_concurrency=2)
        batch_id = await create(server, await upload(server, [line(i) for i in range(10)]), window="1s")
        await until(lambda: status(server, batch_id)["status"] == "expired", timeout=10)
        obj = status(server, batch_id)
        assert obj["output_file_id"] is None  # nothing had finished
        errors = await content(server, obj["error_file_id"])
        assert len(errors) == 10 and {r["error"]["code"] for r in errors} == {"batch_expired"}
        assert engine.finished == 0
    asyncio.run(main())


def test_a_line_whose_replica_dies_is_retried(tmp_path):
    async def main():
        engine = FakeEngine(fail_first=2)
        server = service(tmp_path, engine)
        batch_id = await create(server, await upload(server, [line(0)]))
        await until(lambda: status(server, batch_id)["status"] == "completed")
        assert status(server, batch_id)["request_counts"]["completed"] == 1
        assert len(engine.calls) == 3 and len(set(engine.calls)) == 3  # a new id each time
    asyncio.run(main())


def test_pages_and_projects(tmp_path):
    async def main():
        server = service(tmp_path, FakeEngine())
        file_a = await upload(server, [line(0)], owner="a")
        ids = [await create(server, file_a, owner="a") for _ in range(5)]
        assert (await server.file_get("b", file_a))["status"] == 404
        assert (await server.batch_get("b", ids[0]))["status"] == 404
        assert (await server.batch_cancel("b", ids[0]))["status"] == 404
        assert (await server.batch_create("b", None, {"input_file_id": file_a, "endpoint": CHAT,
                                               "completion_window": "24h"}))["status"] == 404
        assert (await server.batch_list("b", None, 20))["body"]["data"] == []
        seen, after = [], None
        while True:
            page = (await server.batch_list("a", after, 2))["body"]
            seen += [b["id"] for b in page["data"]]
            if not page["has_more"]:
                break
            after = page["last_id"]
        assert seen == ids[::-1]  # newest first, each once
        await until(lambda: not server.runs)
        assert (await server.file_delete("b", file_a))["status"] == 404
        assert (await server.file_delete("a", file_a))["body"]["deleted"] is True
        assert not any(p.name.startswith("file-") and file_a in p.name
                       for p in (tmp_path / "files").iterdir())
    asyncio.run(main())


def test_uploads_are_capped_and_purpose_checked(tmp_path):
    async def main():
        server = service(tmp_path, FakeEngine(), max_file_bytes=100)
        assert (await server.file_begin("", "x", "fine-tune", None))["status"] == 400
        token = (await server.file_begin("", "x", "batch", None))["body"]
        assert (await server.file_part(token, b"x" * 60))["status"] == 200
        assert (await server.file_part(token, b"x" * 60))["status"] == 413
        assert not [p for p in (tmp_path / "files").iterdir() if p.name.startswith(".upload")]
        assert os.listdir(tmp_path / "files") == []
    asyncio.run(main())


def test_the_app_binds_the_batch_service_in_both_ingress_modes(tmp_path):
    from serve_app.app import build_app
    from serve_app.config import ConfigError
    for mode in ("direct", "routed"):
        args = {**config(tmp_path), "ingress": mode, "models": [{"name": "tiny"}]}
        bound = build_app(args)._bound_deployment
        services = [a for a in bound.init_args
                    if getattr(getattr(a, "_bound_deployment", None), "name", None) == "batch"]
        assert len(services) == 1, mode
        options = services[0]._bound_deployment.ray_actor_options
        assert options["num_cpus"] == 0 and "serve_head" in options["resources"]
    plain = build_app({"models": [{"name": "tiny"}]})._bound_deployment
    assert not [a for a in plain.init_args if getattr(a, "_bound_deployment", None)]
    with pytest.raises(ConfigError, match="files_dir, store"):
        build_app({"models": [{"name": "tiny"}], "batch": {"enabled": True}})
