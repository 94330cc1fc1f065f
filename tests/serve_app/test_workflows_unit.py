"""Workflows without a cluster: config errors name the field, the tribunal's steps run
in order on fake engine streams (drafts at once, usage summed, failures handled,
cancellation reaching every step), the derived status and the response's shape.

The end-to-end behaviour with real engines is ``test_workflows.py``.
"""

from __future__ import annotations

import asyncio

import orjson
import pytest

from serve_app.app import build_app
from serve_app.config import ConfigError, parse_app_config
from serve_app.errors import APIError
from serve_app.framing import ResponseFramer
from serve_app.openai_protocol import ChatCompletion, ChatCompletionChunk, Completion
from serve_app.protocol import ChatMessage, GenerateDelta, GenerateRequest, SamplingParams, Usage
from serve_app.workflows import build_workflow
from serve_app.workflows.base import derived_status

MODELS = [{"name": "model-a"}, {"name": "model-b"}, {"name": "model-c"}]
TRIBUNAL = {"name": "tribunal-qa", "kind": "tribunal", "members": ["model-a", "model-b"],
            "judge": "model-c", "rounds": 1}


def _error(args: dict) -> str:
    with pytest.raises(ConfigError) as err:
        parse_app_config(args)
    return str(err.value)


# ---- config ----------------------------------------------------------------------

def test_the_issue_s_config_parses_and_serves_its_models_from_apps_of_their_own():
    cfg = parse_app_config({"models": MODELS, "workflows": [TRIBUNAL]})
    (w,) = cfg.workflows
    assert (w.name, w.kind, w.rounds, w.judge.model) == ("tribunal-qa", "tribunal", 1, "model-c")
    assert [m.model for m in w.members] == ["model-a", "model-b"]
    # auto: the models answer from applications of their own; the workflow runs in the router
    assert cfg.ingress_mode == "direct"
    assert cfg.own_app_models == ["model-a", "model-b", "model-c"]
    # one model and a workflow over it: the same (one model alone has no router at all)
    one = parse_app_config({"models": [{"name": "m"}], "workflows": [
        {**TRIBUNAL, "members": ["m", {"model": "m", "temperature": 1.0, "seed": 2}],
         "judge": "m"}]})
    assert (one.ingress_mode, one.own_app_models) == ("direct", ["m"])
    assert one.workflows[0].members[1].seed == 2


def test_build_app_routes_workflows_through_the_ingress_with_no_deployment_of_their_own():
    bound = build_app({"models": [{"name": "m"}],
                       "workflows": [{**TRIBUNAL, "members": ["m"], "judge": "m"}]}
                      )._bound_deployment
    assert bound.name == "Ingress"
    assert sorted(a._bound_deployment.name for a in bound.init_args[1].values()) == ["engine-m"]


@pytest.mark.parametrize("workflow, where, says", [
    ({**TRIBUNAL, "members": ["model-a", "nope"]}, "args.workflows.0.members.1",
     "unknown model 'nope'"),
    ({**TRIBUNAL, "judge": "gpt-9"}, "args.workflows.0.judge", "unknown model 'gpt-9'"),
    ({**TRIBUNAL, "name": "model-a"}, "args.workflows.0.name", "also a model's name"),
    ({**TRIBUNAL, "members": []}, "args.workflows.0.members", "at least 1"),
    ({**TRIBUNAL, "rounds": 0}, "args.workflows.0.rounds", "greater than or equal to 1"),
    ({**TRIBUNAL, "kind": "chain"}, "args.workflows.0.kind", "'tribunal'"),
    ({**TRIBUNAL, "members": [{"model": "model-a", "temp": 1}]},
     "args.workflows.0.members.0.temp", "Extra inputs"),
    ({**TRIBUNAL, "prompts": {"final": "{question} {answer}"}},
     "args.workflows.0.prompts.final", "unknown placeholder(s) ['answer']"),
    ({**TRIBUNAL, "prompts": {"critique": "{question"}}, "args.workflows.0.prompts.critique",
     "not a valid template"),
    ({**TRIBUNAL, "steps": {"max_tokens": 0}}, "args.workflows.0.steps.max_tokens",
     "greater than 0"),
])
def test_config_errors_name_the_field(workflow, where, says):
    message = _error({"models": MODELS, "workflows": [workflow]})
    line = next((ln for ln in message.splitlines() if ln.strip().startswith(where + ":")), "")
    assert says in line, message


def test_a_workflow_may_not_call_a_workflow_nor_share_a_name():
    message = _error({"models": MODELS, "workflows": [
        {**TRIBUNAL, "members": ["model-a", "other"]},
        {**TRIBUNAL, "name": "other", "judge": "tribunal-qa"},
        {**TRIBUNAL, "name": "other"}]})
    assert ("args.workflows.0.members.1: 'other' is a workflow; a workflow calls models "
            "only") in message
    assert "args.workflows.1.judge: 'tribunal-qa' is a workflow" in message
    assert "args.workflows.2.name: workflow names must be unique, 'other'" in message


def test_direct_ingress_with_workflows_serves_the_models_from_apps_of_their_own():
    from serve_app.config import parse_app_config
    config = parse_app_config({"models": [{"name": "model-a"}], "ingress": "direct",
                               "workflows": [{**TRIBUNAL, "members": ["model-a"],
                                              "judge": "model-a"}]})
    assert config.own_app_models == ["model-a"]  # the workflow runs in the router


def test_cluster_config_check_reports_the_workflow_field(tmp_path):
    """`hpcserve up`/`deploy` load the whole file through cluster.config."""
    import yaml

    from cluster.config import load_config
    from tests.conftest import default_config

    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(default_config(models=MODELS, args={"workflows": [
        {**TRIBUNAL, "judge": "model-z"}]})))
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "applications.0.args.workflows.0.judge: unknown model 'model-z'" in str(err.value)


# ---- the tribunal on fake engines ---------------------------------------------------

class FakeEngines:
    """``call(req, retries)`` like the routed ingress's: each model answers
    ``<model>#<n>`` in two deltas; ``fail`` models raise, ``hold`` makes every call
    wait for ``release`` (to see which calls run at once, and to cancel them)."""

    def __init__(self, fail: dict[str, Exception] | None = None, hold: bool = False,
                 fail_at: str = "start"):
        self.fail, self.fail_at = fail or {}, fail_at
        self.calls: list[GenerateRequest] = []
        self.retries: list[int | None] = []
        self.running: set[str] = set()
        self.cancelled: list[str] = []
        self.release = asyncio.Event()
        self.hold = hold
        self.started = asyncio.Condition()

    async def call(self, req: GenerateRequest, retries: int | None):
        self.calls.append(req)
        self.retries.append(retries)
        self.running.add(req.request_id)
        async with self.started:
            self.started.notify_all()
        try:
            if req.model in self.fail and self.fail_at == "start":
                raise self.fail[req.model]
            if self.hold:
                await self.release.wait()
            text = f"<{req.model}#{len(self.calls)}>"
            yield [GenerateDelta(text=text[:4], num_tokens=1, usage=Usage(10, 1))]
            if req.model in self.fail:
                raise self.fail[req.model]
            yield [GenerateDelta(text=text[4:], num_tokens=2, finish_reason="stop",
                                 usage=Usage(10, 3))]
        except (asyncio.CancelledError, GeneratorExit):
            self.cancelled.append(req.request_id)
            raise
        finally:
            self.running.discard(req.request_id)

    async def wait_running(self, n: int) -> None:
        async with self.started:
            await self.started.wait_for(lambda: len(self.running) >= n)


def _tribunal(engines: FakeEngines, **overrides):
    cfg = parse_app_config({"models": MODELS, "workflows": [{**TRIBUNAL, **overrides}]})
    models = {m.name: m for m in cfg.models}
    return build_workflow(cfg.workflows[0], engines.call, models)


def _request(**sampling) -> GenerateRequest:
    return GenerateRequest(request_id="r1", model="tribunal-qa",
                           messages=[ChatMessage(role="user", content="Why is the sky blue?")],
                           sampling=SamplingParams(**sampling))


async def _collect(stream) -> tuple[str, list[GenerateDelta]]:
    deltas = [d async for batch in stream for d in batch]
    return "".join(d.text for d in deltas), deltas


def test_one_round_drafts_then_critique_then_final_with_usage_summed():
    engines = FakeEngines()
    workflow = _tribunal(engines)
    text, deltas = asyncio.run(_collect(workflow.run(_request(max_tokens=7, temperature=0.3))))
    assert [(r.model, r.request_id.split(".")[1]) for r in engines.calls] == [
        ("model-a", "0-draft"), ("model-b", "1-draft"), ("model-c", "2-critique"),
        ("model-c", "3-final")]
    assert text == "<model-c#4>"  # the final step is what the client gets
    draft_a, draft_b, critique, final = engines.calls
    assert draft_a.messages[-1].content == "Why is the sky blue?"
    assert "Answer 1:\n<model-a#1>" in critique.messages[0].content
    assert "Answer 2:\n<model-b#2>" in critique.messages[0].content
    assert "Note:" not in critique.messages[0].content
    assert "<model-c#3>" in final.messages[0].content  # the critique reaches the final step
    # the client's sampling applies to the final step only; the others use `steps`
    assert (final.sampling.max_tokens, final.sampling.temperature) == (7, 0.3)
    assert draft_a.sampling.max_tokens == critique.sampling.max_tokens == 512
    # judge steps use the app's retries (None), members member_retries (0)
    assert engines.retries == [0, 0, None, None]
    last = deltas[-1]
    assert last.usage == Usage(40, 12)  # four steps of 10 prompt + 3 completion tokens
    assert sum(d.num_tokens for d in deltas) == 12  # usage so far counts every step too
    ext = last.extras["hpcserve"]
    assert ext["workflow"] == "tribunal-qa" and ext["kind"] == "tribunal"
    steps = ext["trace"]
    assert [(s["step"], s["role"], s["model"], s.get("member")) for s in steps] == [
        ("draft", "member", "model-a", 0), ("draft", "member", "model-b", 1),
        ("critique", "judge", "model-c", None), ("final", "judge", "model-c", None)]
    assert all(s["status"] == "ok" and s["prompt_tokens"] == 10 and
               s["completion_tokens"] == 3 for s in steps)
    assert all("text" not in s for s in steps)
    ends = {s["step"]: s["end_s"] for s in steps}
    starts = {s["step"]: s["start_s"] for s in steps}
    assert ends["draft"] <= starts["critique"] <= ends["critique"] <= starts["final"]


def test_trace_texts_on_request_and_member_sampling_from_the_config():
    engines = FakeEngines()
    workflow = _tribunal(engines, members=[{"model": "model-a", "temperature": 1.5, "seed": 9},
                                           "model-a"],
                         judge={"model": "model-c", "seed": 4, "max_tokens": 5},
                         steps={"max_tokens": 32, "temperature": 0.7})
    req = _request()
    req.extras["hpcserve"] = {"trace_texts": True}
    _, deltas = asyncio.run(_collect(workflow.run(req)))
    trace = deltas[-1].extras["hpcserve"]["trace"]
    assert [s.get("text") for s in trace] == ["<model-a#1>", "<model-a#2>", "<model-c#3>", None]
    a1, a2, critique, final = engines.calls
    assert (a1.sampling.temperature, a1.sampling.seed, a1.sampling.max_tokens) == (1.5, 9, 32)
    assert (a2.sampling.temperature, a2.sampling.seed) == (0.7, None)
    assert (critique.sampling.seed, final.sampling.seed) == (4, 4)  # the client gave none
    assert (critique.sampling.max_tokens, final.sampling.max_tokens) == (5, None)
    assert "hpcserve" not in final.extras  # the engine never sees hpcserve's options


def test_drafts_run_at_once():
    async def scenario():
        engines = FakeEngines(hold=True)
        workflow = _tribunal(engines, members=["model-a", "model-b", "model-a"])
        task = asyncio.ensure_future(_collect(workflow.run(_request())))
        await engines.wait_running(3)  # all three drafts started before any finished
        assert sorted(r.model for r in engines.calls) == ["model-a", "model-a", "model-b"]
        engines.release.set()
        return await task
    text, _ = asyncio.run(scenario())
    assert text == "<model-c#5>"


def test_a_failing_member_is_left_out_and_the_judge_is_told():
    engines = FakeEngines(fail={"model-b": RuntimeError("ActorDiedError: replica gone")},
                          fail_at="middle")
    text, deltas = asyncio.run(_collect(_tribunal(engines).run(_request())))
    critique = engines.calls[2].messages[0].content
    assert "Answer 1:" in critique and "Answer 2:" not in critique
    assert "Note: 1 of the panel's 2 answers are missing" in critique and "answer 2" in critique
    assert text.startswith("<model-c")
    trace = deltas[-1].extras["hpcserve"]["trace"]
    failed = trace[1]
    assert (failed["status"], failed["model"]) == ("failed", "model-b")
    assert "replica gone" in failed["error"]
    # its tokens until it failed still count: 10 prompt + 1 completion
    assert (failed["prompt_tokens"], failed["completion_tokens"]) == (10, 1)
    assert deltas[-1].usage == Usage(40, 10)


def test_every_member_failing_is_a_503():
    engines = FakeEngines(fail={"model-a": RuntimeError("x"), "model-b": APIError(400, "too long")})
    with pytest.raises(APIError) as err:
        asyncio.run(_collect(_tribunal(engines).run(_request())))
    assert err.value.status == 503 and err.value.code == "workflow_step_failed"
    assert "every member of the panel failed" in err.value.message
    assert "too long" in err.value.message
    assert len(engines.calls) == 2  # no judge step was started


@pytest.mark.parametrize("fail_at, step", [("start", "critique"), ("middle", "critique")])
def test_a_failing_judge_is_a_503_naming_the_step(fail_at, step):
    engines = FakeEngines(fail={"model-c": RuntimeError("RayActorError: judge died")},
                          fail_at=fail_at)
    heard: list[Usage] = []
    with pytest.raises(APIError) as err:
        asyncio.run(_collect(_tribunal(engines).run(_request(), heard.append)))
    assert err.value.status == 503 and err.value.code == "workflow_step_failed"
    assert f"failed at step '{step}' (round 1, judge 'model-c')" in err.value.message
    assert "judge died" in err.value.message
    # the request is accounted what its steps used, the failed one's tokens included
    judge = Usage(0, 0) if fail_at == "start" else Usage(10, 1)
    assert heard[-1] == Usage(20 + judge.prompt_tokens, 6 + judge.completion_tokens)


def test_a_client_error_in_the_final_step_keeps_its_status():
    engines = FakeEngines()
    calls = 0

    async def call(req, retries):
        nonlocal calls
        calls += 1
        if calls == 4:
            raise APIError(400, "logit_bias: token 99999 is outside the vocabulary",
                           param="logit_bias")
        async for batch in engines.call(req, retries):
            yield batch
    cfg = parse_app_config({"models": MODELS, "workflows": [TRIBUNAL]})
    workflow = build_workflow(cfg.workflows[0], call, {m.name: m for m in cfg.models})
    with pytest.raises(APIError) as err:
        asyncio.run(_collect(workflow.run(_request())))
    assert err.value.status == 400 and "step 'final'" in err.value.message


def test_two_rounds_revise_with_the_critique():
    engines = FakeEngines()
    text, deltas = asyncio.run(_collect(_tribunal(engines, rounds=2).run(_request())))
    steps = [(s["step"], s["round"], s["model"]) for s in deltas[-1].extras["hpcserve"]["trace"]]
    assert steps == [("draft", 1, "model-a"), ("draft", 1, "model-b"),
                     ("critique", 1, "model-c"), ("revise", 2, "model-a"),
                     ("revise", 2, "model-b"), ("critique", 2, "model-c"),
                     ("final", 2, "model-c")]
    revise_a = engines.calls[3].messages[-1].content
    assert "<model-a#1>" in revise_a and "<model-c#3>" in revise_a  # own draft + critique
    assert "answer 1" in revise_a
    critique2 = engines.calls[5].messages[0].content
    assert "<model-a#4>" in critique2 and "<model-a#1>" not in critique2
    assert deltas[-1].usage == Usage(70, 21)


def test_cancelling_the_request_cancels_every_running_step():
    async def scenario():
        engines = FakeEngines(hold=True)
        task = asyncio.ensure_future(_collect(_tribunal(engines).run(_request())))
        await engines.wait_running(2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return engines
    engines = asyncio.run(scenario())
    assert sorted(engines.cancelled) == ["r1.0-draft", "r1.1-draft"]
    assert engines.running == set()


def test_closing_the_stream_mid_final_step_closes_the_engine_stream():
    async def scenario():
        engines = FakeEngines()
        stream = _tribunal(engines).run(_request())
        first = await anext(stream)
        await stream.aclose()  # what the server does when the client goes away
        return engines, first
    engines, first = asyncio.run(scenario())
    assert engines.cancelled == ["r1.3-final"] and engines.running == set()
    # the first batch already counts the earlier steps' completion tokens
    assert first[0].text == "" and first[0].num_tokens == 9
    assert first[1].usage == Usage(40, 10)


def test_a_step_waits_at_most_its_model_s_cold_start_timeout():
    engines = FakeEngines()
    cfg = parse_app_config({"models": [{"name": "model-a"}, {"name": "model-b"},
                                       {"name": "model-c", "cold_start_timeout_s": 0.05}],
                            "workflows": [TRIBUNAL]})
    models = {m.name: m for m in cfg.models}

    async def call(req, retries):
        if req.model == "model-c":  # the judge's model has no replica: never answers
            await asyncio.Event().wait()
        async for batch in engines.call(req, retries):
            yield batch
    workflow = build_workflow(cfg.workflows[0], call, models)
    with pytest.raises(APIError) as err:
        asyncio.run(_collect(workflow.run(_request())))
    assert err.value.status == 503 and "step 'critique'" in err.value.message
    assert "no replica of 'model-c' answered within its cold_start_timeout_s=0.05" \
        in err.value.message


# ---- status and response shape -------------------------------------------------------

def _status(state: str, running: int = 1, reason: str | None = None) -> dict:
    out = {"state": state, "running_replicas": running, "target_replicas": 1,
           "walltime_left_s": 100 * running}
    if reason:
        out["reason"] = reason
    return out


def test_status_is_derived_from_the_judge_and_the_readiest_member():
    cfg = parse_app_config({"models": MODELS, "workflows": [TRIBUNAL]}).workflows[0]
    states = {"model-a": _status("ready"), "model-b": _status("ready"),
              "model-c": _status("ready", 2)}
    assert derived_status(cfg, states.get) == {
        "state": "ready", "running_replicas": 4, "target_replicas": 3, "walltime_left_s": 100}
    states["model-b"] = _status("unavailable", 0, "fits no pool")
    out = derived_status(cfg, states.get)  # one member is enough
    assert out["state"] == "ready" and out["reason"] == "model-b: unavailable (fits no pool)"
    states["model-a"] = _status("cold", 0)
    assert derived_status(cfg, states.get)["state"] == "cold"
    states["model-a"] = _status("ready")
    states["model-c"] = _status("queued", 0)
    assert derived_status(cfg, states.get)["state"] == "queued"  # the judge is required
    assert derived_status(cfg, lambda name: None) is None


@pytest.mark.parametrize("kind", ["chat", "completion"])
def test_the_trace_fits_the_response_models(kind):
    engines = FakeEngines()
    req = _request()
    req.extras["hpcserve"] = {"trace_texts": True}
    _, deltas = asyncio.run(_collect(_tribunal(engines).run(req)))
    ext = deltas[-1].extras["hpcserve"]
    framer = ResponseFramer(kind, "tribunal-qa")
    whole = orjson.loads(framer.whole("x", "stop", deltas[-1].usage, None, ext))
    model = ChatCompletion if kind == "chat" else Completion
    assert model.model_validate(whole).hpcserve.trace[0].model == "model-a"
    raw = framer.final_chunks("stop", deltas[-1].usage, True, False, ext)
    events = [orjson.loads(e[6:]) for e in raw.split(b"\n\n") if e.startswith(b"data: {")]
    assert "hpcserve" in events[0] and "hpcserve" not in events[1]  # finish chunk, usage chunk
    if kind == "chat":
        assert ChatCompletionChunk.model_validate(events[0]).hpcserve.workflow == "tribunal-qa"
    assert "hpcserve" not in orjson.loads(framer.whole("x", "stop", Usage(1, 1)))
