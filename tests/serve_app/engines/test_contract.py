"""The engine contract: the registry, the config check of ``engine_args`` and ``task``,
and ``EngineDeployment`` (coalescing, task guard, health, stats, one graceful stop)
around a stand-in engine.  Nothing is started here."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import numpy as np
import pytest

from serve_app.config import ConfigError, parse_app_config
from serve_app.engines import deployment as deployment_module
from serve_app.engines.base import ENGINES, Capabilities, EmbeddingEngine, Engine
from serve_app.engines.deployment import EngineDeployment
from serve_app.protocol import (
    EmbedRequest,
    EmbedResult,
    EngineError,
    GenerateDelta,
    GenerateRequest,
    Usage,
)


def _error(model: dict) -> str:
    with pytest.raises(ConfigError) as info:
        parse_app_config({"models": [{"name": "m", **model}]})
    return str(info.value)


def test_every_kind_has_an_args_model_in_the_core_install():
    for kind, spec in ENGINES.items():
        assert spec.kind == kind
        assert spec.args_model().model_validate({}) is not None or kind == "vllm"
        assert "generate" in spec.capabilities.tasks


@pytest.mark.parametrize("model, where, says", [
    ({"engine": "zmq", "engine_args": {"model_pth": "/m"}},
     "args.models.0.engine_args.model_pth", "did you mean 'model_path'"),
    ({"engine": "triton", "engine_args": {"protocl": "http"}},
     "args.models.0.engine_args.protocl", "did you mean 'protocol'"),
    ({"engine": "zmq", "engine_args": {"max_batch": 0}},
     "args.models.0.engine_args.max_batch", "greater than or equal to 1"),
    ({"engine": "vllm", "engine_args": {"model": "/m", "engine_metrics": "yes"}},
     "args.models.0.engine_args.engine_metrics", "valid boolean"),
    ({"engine": "triton", "task": "embed"},
     "args.models.0.task", "does not serve task 'embed'"),
    ({"engine": "zmq", "task": "embed"},
     "args.models.0.engine_args.model_path", "needs a model directory"),
    ({"engine": "vllm", "task": "embed", "engine_args": {"enforce_eager": True}},
     "args.models.0.engine_args.model", "needs a model"),
    ({"task": "classify"}, "args.models.0.task", "'generate' or 'embed'"),
])
def test_config_errors_name_the_field(model, where, says):
    message = _error(model)
    assert f"{where}: " in message and says in message, message


def test_vllm_names_are_checked_at_deploy_time_where_vllm_is_installed():
    from serve_app.engines.args import vllm_engine_argument_names

    if vllm_engine_argument_names() is None:
        pytest.skip("vLLM is not installed: the replica checks its arguments")
    message = _error({"engine": "vllm", "engine_args": {"modle": "/m"}})
    assert "args.models.0.engine_args.modle: unknown vllm engine argument (did you mean " \
           "'model'?)" in message
    config = parse_app_config({"models": [{"name": "m", "engine": "vllm", "task": "embed",
                                           "engine_args": {"model": "/m", "dtype": "float32"}}]})
    assert config.models[0].task == "embed"


# ---- EngineDeployment around a stand-in engine ---------------------------------------

@dataclass
class _Spec:
    cls: type
    capabilities: Capabilities = Capabilities(tasks=frozenset({"generate", "embed"}))

    def engine_class(self):
        return self.cls


class FakeEngine:
    """Streams one token per delta; embeds each input as [len(text), 1]."""

    instances: list[FakeEngine] = []

    def __init__(self, model_name, args, task):
        self.model_name, self.args, self.task = model_name, args, task
        self.stopped = 0
        self.healthy = True
        FakeEngine.instances.append(self)

    async def generate(self, request: GenerateRequest):
        for i in range(5):
            await asyncio.sleep(0.001)
            last = i == 4
            yield [GenerateDelta(text="t", num_tokens=1, finish_reason="stop" if last else None,
                                 usage=Usage(3, i + 1) if last or i == 0 else None)]

    async def embed(self, request: EmbedRequest) -> EmbedResult:
        return EmbedResult(np.array([[len(t), 1.0] for t in request.inputs], dtype=np.float32),
                           prompt_tokens=len(request.inputs))

    async def model_info(self):
        return {"model": self.model_name, "max_model_len": 64}

    async def check_health(self):
        if not self.healthy:
            raise ConnectionError("engine gone")

    async def stats(self):
        return {"calls": 1}

    def shutdown(self):
        self.stopped += 1


@pytest.fixture
def host(monkeypatch):
    def make(task: str = "generate", interval_ms: float = 0.0) -> EngineDeployment:
        monkeypatch.setattr(deployment_module, "ENGINES", {**ENGINES, "zmq": _Spec(FakeEngine)})
        model = {"name": "m", "task": task, "stream_interval_ms": interval_ms,
                 "engine_args": {"model_path": "/models/x", "max_batch": 8}}
        return EngineDeployment(model)
    return make


def test_the_fake_engine_satisfies_the_protocols():
    engine = FakeEngine("m", None, "embed")
    assert isinstance(engine, Engine) and isinstance(engine, EmbeddingEngine)


def test_the_engine_gets_its_typed_args_and_task(host):
    h = host(task="embed")
    assert h.engine.args.model_path == "/models/x" and h.engine.args.max_batch == 8
    assert h.engine.task == "embed"


def test_generation_is_coalesced_by_the_deployment(host):
    async def chunks(h):
        return [c async for c in h.generate(GenerateRequest(request_id="r", model="m",
                                                            prompt="x"))]
    plain = asyncio.run(chunks(host(interval_ms=0)))
    assert len(plain) == 5
    merged = asyncio.run(chunks(host(interval_ms=1000)))
    # the first chunk at once, the finishing one at once, the ones between merged
    assert [sum(d.num_tokens for d in c) for c in merged] == [1, 4]
    assert merged[-1][-1].finish_reason == "stop" and merged[-1][-1].usage == Usage(3, 5)


def test_a_task_the_model_is_not_configured_for_is_a_400(host):
    async def embed(h):
        return await h.embed(EmbedRequest(request_id="r", model="m", inputs=["ab", "c"]))

    async def generate(h):
        return [c async for c in h.generate(GenerateRequest(request_id="r", model="m",
                                                            prompt="x"))]

    with pytest.raises(EngineError) as info:
        asyncio.run(embed(host("generate")))
    assert (info.value.status, info.value.param) == (400, "model")
    with pytest.raises(EngineError):
        asyncio.run(generate(host("embed")))
    result = asyncio.run(embed(host("embed")))
    assert result.embeddings.tolist() == [[2.0, 1.0], [1.0, 1.0]] and result.prompt_tokens == 2


def test_health_stats_and_info_come_from_the_engine(host):
    h = host("embed")
    asyncio.run(h.check_health())
    h.engine.healthy = False
    with pytest.raises(ConnectionError):
        asyncio.run(h.check_health())
    assert asyncio.run(h.stats()) == {"engine": "zmq", "task": "embed", "calls": 1}
    assert asyncio.run(h.model_info()) == {"model": "m", "max_model_len": 64, "task": "embed"}


def test_the_engine_is_stopped_once(host):
    h = host()
    engine = h.engine
    h.__del__()          # Serve's graceful stop
    h.shutdown()         # and the atexit hook, later
    assert engine.stopped == 1


class _EndlessEngine(FakeEngine):
    """Streams until closed; records whether the request was closed (aborted)."""

    async def generate(self, request: GenerateRequest):
        self.closed = False
        try:
            while True:
                await asyncio.sleep(0.005)
                yield [GenerateDelta(text="t", num_tokens=1)]
        finally:
            self.closed = True


@pytest.mark.parametrize("interval_ms", [0.0, 20.0])
def test_a_call_cancelled_while_its_chunk_is_written_closes_the_engine_request(
        host, monkeypatch, interval_ms):
    """grpc.aio drives Serve's streaming handler as ``async for m in gen: await
    write(m)``; a cancel that lands in the write leaves the generator suspended."""
    monkeypatch.setattr(deployment_module, "ENGINES", {**ENGINES, "zmq": _Spec(_EndlessEngine)})
    h = EngineDeployment({"name": "m", "stream_interval_ms": interval_ms,
                          "engine_args": {"model_path": "/models/x", "max_batch": 8}})

    async def scenario() -> bool:
        gen = h.generate(GenerateRequest(request_id="r", model="m", prompt="x"))
        writing = asyncio.Event()

        async def grpc_handler():
            async for _ in gen:
                writing.set()
                await asyncio.sleep(60)  # the write the cancel lands in

        task = asyncio.create_task(grpc_handler())
        await writing.wait()
        task.cancel()
        for _ in range(200):
            await asyncio.sleep(0.01)
            if h.engine.closed:
                break
        closed = h.engine.closed
        await gen.aclose()  # still referenced until here (no garbage collection); the
        return closed       # late close finds the stream closed, and does not raise

    assert asyncio.run(scenario())
