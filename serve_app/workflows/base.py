"""What every workflow shares: its config's base, the run of one request (steps, trace,
usage), and the status it derives from the models it calls.

A workflow is served under its own model name.  The routed ingress (which holds the
engine handles) gives it ``call(req, retries)``: the same engine stream with failover
that a plain request gets.  A workflow turns one ``GenerateRequest`` into several such
calls and yields the deltas of its last step, which is what the client receives.

``Run`` keeps the books of one request: every step's model, role, tokens, timing and
outcome (the trace), the usage summed over all steps, and the cancellation of steps
still running when the request ends early (a client that went away).
"""

from __future__ import annotations

import asyncio
import string
import time
from contextlib import aclosing
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, ClassVar

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from serve_app.errors import APIError
from serve_app.framing import EXTENSION as TRACE_OPTION  # the client's options, the trace
from serve_app.protocol import GenerateDelta, GenerateRequest, SamplingParams, Usage

if TYPE_CHECKING:
    from serve_app.config import ModelConfig

# The routed ingress's engine stream: (request, retries on another replica or None for
# the app's max_retries) -> stream of delta lists; raises APIError for engine errors.
StepCall = Callable[[GenerateRequest, "int | None"], AsyncIterator[list[GenerateDelta]]]
# Told the usage of a run's steps so far whenever a step ends (the request's accounting).
UsageSink = Callable[[Usage], None]



class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Participant(_Strict):
    """A model a workflow calls, and how it samples in the intermediate steps."""

    model: str = Field(min_length=1, description="a model of this app's `models`")
    temperature: float | None = Field(default=None, ge=0.0, le=2.0, description=(
        "for this participant's intermediate steps (null: the workflow's `steps`)"))
    seed: int | None = Field(default=None, description="for this participant's steps")
    max_tokens: int | None = Field(default=None, gt=0, description=(
        "bound of this participant's intermediate steps (null: the workflow's `steps`)"))


def _named(value: Any) -> Any:
    return {"model": value} if isinstance(value, str) else value


# A participant may be written as a bare model name.
ParticipantSpec = Annotated[Participant, BeforeValidator(_named)]


class StepSampling(_Strict):
    """Sampling of the intermediate steps; the final step uses the client's."""

    max_tokens: int = Field(default=512, gt=0, description="each intermediate step's bound")
    temperature: float | None = Field(default=None, ge=0.0, le=2.0,
                                      description="null: each model's default")
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    ignore_eos: bool = Field(default=False, description=(
        "generate max_tokens in every intermediate step (benchmarks, random-weight models)"))


class WorkflowConfig(_Strict):
    """The fields every workflow kind has; a kind subclasses it with its own."""

    name: str = Field(min_length=1, description="the `model` clients ask for")
    kind: str

    # Read where a served name's config is asked for its context (admission's estimate):
    # a workflow has none of its own.
    max_model_len: ClassVar[int | None] = None

    def model_fields_used(self) -> list[tuple[tuple[str | int, ...], str]]:
        """(location in this config, model name) of every model the workflow calls."""
        raise NotImplementedError

    def required_models(self) -> list[str]:
        """Models the workflow cannot run without."""
        raise NotImplementedError

    def final_model(self) -> str:
        """The model of the step the client receives: the client's options are checked
        against its engine, and ``max_tokens`` against its context."""
        raise NotImplementedError

    def panel_models(self) -> list[str]:
        """Models of which one is enough (the rest may be left out)."""
        return []

    def describe(self) -> dict[str, Any]:
        """What ``/v1/models`` shows of it."""
        return self.model_dump(mode="json", include={"kind"})


def check_template(text: str, allowed: Iterable[str]) -> str:
    """``text`` if it is a ``str.format`` template with only ``allowed`` placeholders."""
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(text) if f is not None]
    except ValueError as err:
        raise ValueError(f"not a valid template ({err}); write a literal brace as {{{{ "
                         "or }}") from None
    allowed = set(allowed)
    unknown = sorted({f for f in fields if f not in allowed})
    if unknown:
        raise ValueError(f"unknown placeholder(s) {unknown}; this template may use "
                         f"{sorted('{' + a + '}' for a in allowed)}")
    return text


# ---- one request's run -----------------------------------------------------------


@dataclass
class Step:
    """One model call of a run, as the trace reports it (times from the run's start)."""

    step: str
    round: int
    role: str
    model: str
    member: int | None = None
    status: str = "pending"          # running, ok, failed, cancelled
    prompt_tokens: int = 0
    completion_tokens: int = 0
    start_s: float | None = None
    end_s: float | None = None
    ttft_s: float | None = None
    finish_reason: str | None = None
    error: str | None = None
    text: str | None = None

    def trace(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "step": self.step, "round": self.round, "role": self.role, "model": self.model,
            "status": self.status, "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "start_s": _ms(self.start_s), "end_s": _ms(self.end_s),
            "latency_s": (_ms(self.end_s - self.start_s)
                          if self.start_s is not None and self.end_s is not None else None),
            "ttft_s": _ms(self.ttft_s), "finish_reason": self.finish_reason}
        if self.member is not None:
            out["member"] = self.member
        if self.error is not None:
            out["error"] = self.error
        if self.text is not None:
            out["text"] = self.text
        return out


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds, 4)


class StepFailed(Exception):
    def __init__(self, step: Step, message: str, status: int = 503):
        super().__init__(message)
        self.step, self.message, self.status = step, message, status


class Run:
    """The books of one workflow request: steps in the order they started, usage."""

    def __init__(self, workflow: "Workflow", req: GenerateRequest,
                 on_usage: UsageSink | None = None):
        self.workflow = workflow
        self.on_usage = on_usage
        self.request_id = req.request_id
        self.t0 = time.monotonic()
        self.steps: list[Step] = []
        self.cancelled = False  # the request ended: no step may go on (see ``parallel``)
        options = req.extras.get(TRACE_OPTION) or {}
        self.trace_texts = bool(options.get("trace_texts"))

    def now(self) -> float:
        return time.monotonic() - self.t0

    def step(self, step: str, round_: int, role: str, who: Participant,
             member: int | None = None) -> Step:
        s = Step(step, round_, role, who.model, member)
        self.steps.append(s)
        return s

    def usage(self) -> Usage:
        return Usage(sum(s.prompt_tokens for s in self.steps),
                     sum(s.completion_tokens for s in self.steps))

    def extension(self) -> dict[str, Any]:
        """The response's ``hpcserve`` field."""
        return {"workflow": self.workflow.config.name, "kind": self.workflow.config.kind,
                "trace": [s.trace() for s in self.steps]}

    def request(self, step: Step, who: Participant, messages: list[dict[str, str]],
                sampling: SamplingParams) -> GenerateRequest:
        n = self.steps.index(step)
        return GenerateRequest(request_id=f"{self.request_id}.{n}-{step.step}", model=who.model,
                               messages=messages, sampling=sampling)

    async def tracked(self, step: Step, req: GenerateRequest,
                      retries: int | None) -> AsyncIterator[list[GenerateDelta]]:
        """The step's engine stream, with its tokens and timing kept in ``step``.

        Waits at most the model's ``cold_start_timeout_s`` for the first delta.  Any
        failure becomes ``StepFailed`` (the step marked failed, its tokens so far kept:
        they were computed).  Cancellation and ``aclose`` mark it cancelled."""
        step.status, step.start_s = "running", self.now()
        timeout = self.workflow.models[req.model].cold_start_timeout_s
        stream = self.workflow.call(req, retries)
        try:
            batch: list[GenerateDelta] | None
            try:  # asyncio.timeout: 3.11's wait_for can swallow a cancel (zmq client)
                async with asyncio.timeout(timeout):
                    batch = await anext(stream)
            except StopAsyncIteration:
                batch = None
            while batch is not None:
                if step.ttft_s is None and any(d.text or d.num_tokens for d in batch):
                    step.ttft_s = self.now() - step.start_s
                for d in batch:
                    step.completion_tokens += d.num_tokens
                    if d.usage is not None:
                        step.prompt_tokens = d.usage.prompt_tokens
                        if d.finish_reason:  # the engine's count is the one that holds
                            step.completion_tokens = d.usage.completion_tokens
                    if d.finish_reason:
                        step.finish_reason = d.finish_reason
                        step.status, step.end_s = "ok", self.now()
                yield batch
                if self.cancelled:  # a cancellation that did not reach this task
                    raise asyncio.CancelledError
                try:
                    batch = await anext(stream)
                except StopAsyncIteration:
                    batch = None
            if step.status == "running":
                step.status, step.end_s = "ok", self.now()
        except (asyncio.CancelledError, GeneratorExit):
            step.status = "cancelled"
            raise
        except asyncio.TimeoutError:
            raise self._failed(step, f"no replica of '{req.model}' answered within its "
                               f"cold_start_timeout_s={timeout:g}") from None
        except APIError as err:
            raise self._failed(step, err.message, err.status) from None
        except Exception as err:  # a replica died, the engine failed: RayError and friends
            raise self._failed(step, f"{type(err).__name__}: {err}".strip()[:500]) from None
        finally:
            if step.end_s is None:
                step.end_s = self.now()
            if self.on_usage is not None:
                self.on_usage(self.usage())
            await stream.aclose()

    def _failed(self, step: Step, message: str, status: int = 503) -> StepFailed:
        step.status, step.error = "failed", message
        return StepFailed(step, message, status)

    async def complete(self, step: Step, req: GenerateRequest, retries: int | None) -> str:
        """Run an intermediate step to its end; its text."""
        parts: list[str] = []
        async with aclosing(self.tracked(step, req, retries)) as stream:
            async for batch in stream:
                parts += (d.text for d in batch)
        text = "".join(parts)
        if self.trace_texts:
            step.text = text
        return text

    async def final(self, step: Step, req: GenerateRequest,
                    retries: int | None) -> AsyncIterator[list[GenerateDelta]]:
        """Stream the last step to the client, its usage counting every step.

        The first batch opens with an empty delta worth the earlier steps' completion
        tokens, and every usage the engine reports has the earlier steps' added: a
        stream's usage so far (and a stream cut short, as accounted) is the whole
        run's.  The delta that finishes carries the trace (``extras['hpcserve']``)."""
        prior = self.usage()
        first = True
        async with aclosing(self.tracked(step, req, retries)) as stream:
            async for batch in stream:
                for d in batch:
                    if d.usage is not None:
                        d.usage = Usage(prior.prompt_tokens + d.usage.prompt_tokens,
                                        prior.completion_tokens + d.usage.completion_tokens)
                    if d.finish_reason:
                        d.extras = {**d.extras, TRACE_OPTION: self.extension()}
                if first and prior.completion_tokens:
                    batch = [GenerateDelta(num_tokens=prior.completion_tokens), *batch]
                first = False
                yield batch

    async def parallel(self, calls: list[Awaitable[Any]]) -> list[Any]:
        """Run steps at once; each result or its exception.  If this is cancelled (the
        client left), every step still running is cancelled before this returns."""
        tasks = [asyncio.ensure_future(c) for c in calls]
        try:
            return await asyncio.gather(*tasks, return_exceptions=True)
        except BaseException:
            # A cancel is delivered once; one that a step's task loses (asyncio's
            # wait_for in 3.11 drops it when the awaited item arrives at the same
            # moment) would leave that step streaming to its end: the flag stops it
            # at its next item.
            self.cancelled = True
            raise
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.wait(tasks)


def step_failure(workflow: WorkflowConfig, err: StepFailed, what: str) -> APIError:
    """The request's error when a step it cannot do without failed (names the step)."""
    status = err.status if 400 <= err.status < 500 and err.step.step == "final" else 503
    return APIError(status, f"The workflow '{workflow.name}' failed at {what}: "
                    f"{err.message}", type_=None if status < 500 else "server_error",
                    code="workflow_step_failed")


# ---- the workflow object in the ingress --------------------------------------------

_STATE_RANK = {"ready": 0, "scaling": 1, "starting": 2, "queued": 3, "cold": 4,
               "unavailable": 5}


def derived_status(config: WorkflowConfig,
                   status_of: Callable[[str], dict | None]) -> dict | None:
    """A workflow's status from those of its models: as ready as the least ready model
    it cannot do without (every required model, and the readiest of its panel);
    replicas are those of its models together; the reason lists each model that is
    not ready.  None when no model's status is known."""
    names = list(dict.fromkeys([*config.required_models(), *config.panel_models()]))
    known = {n: s for n in names if (s := status_of(n)) is not None}
    if not known:
        return None

    def rank(name: str) -> int:
        s = known.get(name)
        return _STATE_RANK.get(s["state"], 0) if s else 0

    needed = list(config.required_models())
    panel = config.panel_models()
    if panel:
        needed.append(min(panel, key=rank))
    state = max((known[n]["state"] for n in needed if n in known),
                key=lambda st: _STATE_RANK.get(st, 0), default="ready")
    out: dict[str, Any] = {
        "state": state,
        "running_replicas": sum(s["running_replicas"] for s in known.values()),
        "target_replicas": sum(s["target_replicas"] for s in known.values())}
    walltimes = [s["walltime_left_s"] for s in known.values()
                 if s.get("walltime_left_s") is not None]
    if walltimes:
        out["walltime_left_s"] = min(walltimes)
    not_ready = [f"{n}: {s['state']}" + (f" ({s['reason']})" if s.get("reason") else "")
                 for n, s in known.items() if s["state"] != "ready"]
    if not_ready:
        out["reason"] = "; ".join(not_ready)
    return out


class Workflow:
    """A workflow kind's runtime; a kind sets ``kind``, ``Config`` and ``run``."""

    kind: ClassVar[str]
    Config: ClassVar[type[WorkflowConfig]]

    def __init__(self, config: WorkflowConfig, call: StepCall,
                 models: dict[str, "ModelConfig"]):
        self.config = config
        self.call = call
        self.models = models

    def run(self, req: GenerateRequest, on_usage: UsageSink | None = None
            ) -> AsyncIterator[list[GenerateDelta]]:
        """The client's request -> the final step's deltas (the last carries the trace);
        ``on_usage`` is told the usage of every step so far as steps end."""
        raise NotImplementedError
