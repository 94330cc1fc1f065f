"""The engine contract, and the registry that names each engine kind.

An engine is a plain class (no Serve in it); ``serve_app.engines.deployment``'s
``EngineDeployment`` is the one Serve deployment that hosts any of them and owns
what is the same for every engine: stream coalescing, health checks, stats and
graceful stop.  Adding an engine is one module with a class that satisfies
``Engine`` and one ``EngineSpec`` in ``ENGINES`` below.

Names are import paths, imported lazily: the core install has neither vLLM nor
Triton, and the config check (``hpcserve up``) must not load an engine to know
what it accepts.  The registry holds, per kind:

* the engine class (``"module:Class"``), constructed as
  ``Engine(model_name, args, task)`` with ``args`` its validated ``engine_args``;
* a pydantic model of its ``engine_args`` (``"module:Model"``), importable in the
  core install, so ``hpcserve up``/``deploy`` reject a misspelt argument naming it
  (``args.models.0.engine_args.modle``);
* its ``Capabilities``: the tasks it serves (``generate``: chat and completions;
  ``embed``: embeddings) and the request options it honours beyond the common core.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from functools import cache
from typing import Any, Literal, Protocol, runtime_checkable

from pydantic import BaseModel, ValidationError
from pydantic_core import InitErrorDetails, PydanticCustomError

from serve_app.protocol import EmbedRequest, EmbedResult, GenerateDelta, GenerateRequest

Task = Literal["generate", "embed"]
# The endpoints (serve_app.api's Endpoint.name) each task answers.
TASK_ENDPOINTS: dict[str, tuple[str, ...]] = {"generate": ("chat", "completion"),
                                              "embed": ("embeddings",)}


@runtime_checkable
class Engine(Protocol):
    """What ``EngineDeployment`` calls.  ``embed`` exists where the engine's
    capabilities include the ``embed`` task.

    * ``generate`` yields *lists* of deltas: everything that was ready at once
      travels as one chunk (Serve's cost is per chunk per hop).  The first delta
      carries ``usage`` so far (prompt tokens known up front), the last one
      ``finish_reason`` and the final ``usage``.  Closing the iterator aborts the
      request in the engine.  Coalescing is the deployment's, not the engine's.
    * ``embed`` answers all of a request's inputs at once; the engine batches
      concurrent requests itself.
    * ``check_health`` raises when the engine behind it is dead, so Serve replaces
      the replica; ``stats`` returns the engine's own counters.
    * ``shutdown`` stops what the engine started (a process, a server); it is
      called once, on Serve's graceful stop or at interpreter exit.

    Errors the request caused are ``EngineError`` (a 4xx for the client); anything
    else is the engine's fault (the routed ingress retries elsewhere).
    """

    def generate(self, request: GenerateRequest) -> AsyncIterator[list[GenerateDelta]]: ...
    async def model_info(self) -> dict[str, Any]: ...
    async def check_health(self) -> None: ...
    async def stats(self) -> dict[str, Any]: ...
    def shutdown(self) -> None: ...


@runtime_checkable
class EmbeddingEngine(Engine, Protocol):
    async def embed(self, request: EmbedRequest) -> EmbedResult: ...


@dataclass(frozen=True)
class Capabilities:
    tasks: frozenset[str]
    # OpenAI request options beyond the common core (max_tokens, temperature, top_p,
    # seed, stop, ignore_eos) that the engine honours; the ingress answers any other
    # option with a 400 naming it, so a client never silently gets something else.
    options: frozenset[str] = frozenset()
    why_not: dict[str, str] | None = None  # task -> why the engine does not serve it

    def endpoints(self, task: str) -> tuple[str, ...]:
        return TASK_ENDPOINTS[task] if task in self.tasks else ()


@dataclass(frozen=True)
class EngineSpec:
    kind: str
    engine: str          # "module:Class", imported only where the engine runs
    args: str            # "module:Model", the pydantic model of engine_args (core install)
    capabilities: Capabilities

    def engine_class(self) -> type[Engine]:
        return _import(self.engine)

    def args_model(self) -> type[BaseModel]:
        return _import(self.args)


ENGINES: dict[str, EngineSpec] = {
    "zmq": EngineSpec(
        "zmq", "serve_app.engines.zmq:ZmqEngine", "serve_app.engines.args:ZmqEngineArgs",
        Capabilities(tasks=frozenset({"generate", "embed"}),
                     options=frozenset({"presence_penalty", "frequency_penalty",
                                        "logit_bias"}))),
    "vllm": EngineSpec(
        "vllm", "serve_app.engines.vllm:VLLMEngine", "serve_app.engines.args:VLLMEngineArgs",
        Capabilities(tasks=frozenset({"generate", "embed"}),
                     options=frozenset({"logprobs", "top_logprobs", "response_format",
                                        "tools", "tool_choice", "top_k", "min_p",
                                        "repetition_penalty", "presence_penalty",
                                        "frequency_penalty", "logit_bias", "min_tokens"}))),
    "triton": EngineSpec(
        "triton", "serve_app.engines.triton:TritonEngine",
        "serve_app.engines.triton_requests:TritonEngineArgs",
        Capabilities(tasks=frozenset({"generate"}), why_not={
            "embed": "hpcserve's Triton engine does not serve embeddings yet; serve the "
                     "model with engine zmq or vllm (docs/embeddings.md)"})),
}


def engine_spec(kind: str) -> EngineSpec:
    return ENGINES[kind]


def capabilities(kind: str) -> Capabilities:
    return ENGINES[kind].capabilities


def check_model(kind: str, task: str, engine_args: dict[str, Any]) -> BaseModel:
    """A model's ``engine_args`` validated for its engine and task: the typed args,
    or a ``ValidationError`` located at ``task`` or ``engine_args.<name>``."""
    details: list[InitErrorDetails] = []
    caps = ENGINES[kind].capabilities
    if task not in caps.tasks:
        reason = (caps.why_not or {}).get(task)
        details.append(_detail(("task",), task, f"the {kind} engine does not serve task "
                                                f"'{task}'" + (f": {reason}" if reason else "")))
    args = None
    try:
        args = validate_engine_args(kind, engine_args)
    except ValidationError as err:
        details += [_detail(("engine_args", *e["loc"]), e.get("input"), e["msg"])
                    for e in err.errors(include_url=False)]
    if args is not None and hasattr(args, "task_errors"):
        details += [_detail(("engine_args", name), engine_args.get(name), message)
                    for name, message in args.task_errors(task).items()]
    if details:
        raise ValidationError.from_exception_data("ModelConfig", details)
    return args


def validate_engine_args(kind: str, args: dict[str, Any]) -> BaseModel:
    """``args`` as the engine's typed ``engine_args``; a ``ValidationError`` whose
    locations are the argument names, an unknown one with the closest valid name."""
    model = ENGINES[kind].args_model()
    try:
        validated = model.model_validate(args)
    except ValidationError as err:
        raise _with_hints(err, model, _known(model)) from None
    # An open model (vLLM's: the engine's own arguments pass through) names what else
    # its engine accepts, where it can tell (vLLM installed here).
    names = getattr(model, "engine_argument_names", lambda: None)()
    unknown = sorted(set(validated.model_extra or ()) - set(names or ())) if names else []
    if unknown:
        known = _known(model) | set(names)
        raise ValidationError.from_exception_data(model.__name__, [
            _unknown(name, args[name], known, f"{kind} engine argument") for name in unknown])
    return validated


def _known(model: type[BaseModel]) -> set[str]:
    return set(model.model_fields)


def _unknown(name: str, value: Any, known: set[str], what: str = "") -> InitErrorDetails:
    close = difflib.get_close_matches(name, sorted(known), n=1)
    message = f"unknown {what or 'engine argument'}" + (
        f" (did you mean '{close[0]}'?)" if close else "")
    return _detail((name,), value, message, "unknown_argument")


def _detail(loc: tuple, value: Any, message: str, kind: str = "invalid_argument"
            ) -> InitErrorDetails:
    text = message.replace("{", "{{").replace("}", "}}")  # a template to pydantic
    return InitErrorDetails(type=PydanticCustomError(kind, text), loc=loc, input=value)


def _with_hints(err: ValidationError, model: type[BaseModel], known: set[str]
                ) -> ValidationError:
    """The same errors, with 'did you mean' on unknown top-level names."""
    details: list[InitErrorDetails] = []
    for e in err.errors(include_url=False):
        if e["type"] == "extra_forbidden" and len(e["loc"]) == 1:
            details.append(_unknown(str(e["loc"][0]), e["input"], known))
        else:
            details.append(_detail(e["loc"], e.get("input"), e["msg"], e["type"]))
    return ValidationError.from_exception_data(model.__name__, details)


@cache
def _import(path: str) -> Any:
    module_name, _, attr = path.partition(":")
    return getattr(importlib.import_module(module_name), attr)
