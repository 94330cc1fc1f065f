"""What every engine deployment provides, and how the app finds one by name.

An engine is a Ray Serve deployment class with:

* ``async def generate(self, request: GenerateRequest) -> AsyncIterator[list[GenerateDelta]]``
  -- yields *lists* of deltas: everything that was ready at once travels as one
  chunk, because Serve's cost is per chunk per hop, not per token.  The last delta
  has ``finish_reason`` and ``usage``; the first one carries ``usage`` so far as
  well (prompt tokens known up front), for ``stream_options.continuous_usage_stats``;
* ``async def model_info(self) -> dict`` -- ``{"max_model_len": int, ...}``;
* ``async def check_health(self)`` -- raises when the engine behind it is dead,
  so Serve replaces the replica;
* ``async def stats(self) -> dict`` -- engine's own counters (for tests/status).

Adding an engine means writing one module that defines such a class and registering
its name in ``ENGINE_CLASSES`` below (import path, imported lazily so the core
install never needs vLLM or Triton).
"""

from __future__ import annotations

import importlib

ENGINE_CLASSES: dict[str, str] = {
    "zmq": "serve_app.engines.zmq:ZmqEngine",
    "vllm": "serve_app.engines.vllm:VLLMEngine",
    "triton": "serve_app.engines.triton:TritonEngine",
}


def engine_class(kind: str):
    """Import the deployment class registered for ``kind``."""
    module_name, _, attr = ENGINE_CLASSES[kind].partition(":")
    return getattr(importlib.import_module(module_name), attr)


# OpenAI request options beyond the common core (max_tokens, temperature, top_p,
# seed, stop, ignore_eos) that each engine honours.  The ingress answers any other
# option with a 400 naming it, so a client never silently gets something else.
ENGINE_OPTIONS: dict[str, frozenset[str]] = {
    "zmq": frozenset({"presence_penalty", "frequency_penalty", "logit_bias"}),
    "vllm": frozenset({"logprobs", "top_logprobs", "response_format", "tools",
                       "tool_choice", "top_k", "min_p", "repetition_penalty",
                       "presence_penalty", "frequency_penalty", "logit_bias", "min_tokens"}),
    "triton": frozenset(),
}
