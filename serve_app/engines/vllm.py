"""``VLLMEngine``: vLLM's ``AsyncLLM`` inside the replica's process.

Why in-process (unlike the ZMQ engine): ``AsyncLLM`` already keeps the model in a
separate EngineCore process and only detokenizes and streams in the caller, so the
replica is a thin async front and one hop is saved.

With ``task: embed`` the engine runs vLLM's pooling runner (``runner: pooling``
unless given): each input becomes one ``AsyncLLM.encode`` request and vLLM's
scheduler batches concurrent ones; pooling comes from the model's
sentence-transformers config, as vLLM reads it.

Requests go through the same code path as vLLM's OpenAI server: vLLM's
``ChatCompletionRequest``/``CompletionRequest`` models, its ``OnlineRenderer`` (chat
template, tokenization, length checks) and ``to_sampling_params``.  That is what
makes output match bare vLLM token for token, and vLLM's own validation errors
reach the client as 4xx.

``engine_args`` are vLLM's ``AsyncEngineArgs`` (the api_server flags with
underscores) plus a few replica-level options (``VLLMEngineArgs``'s own fields),
checked at deploy time (``serve_app.engines.args``).  With no ``model`` the replica
serves hpcserve's tiny model with small CPU-friendly defaults.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

from serve_app.engines.args import VLLMEngineArgs
from serve_app.protocol import (
    EmbedRequest,
    EmbedResult,
    EngineError,
    GenerateDelta,
    GenerateRequest,
    Usage,
)

log = logging.getLogger("hpcserve.engines.vllm")

# Handled by the replica itself, not by AsyncEngineArgs.
SERVING_ARGS = VLLMEngineArgs.serving_names()
# For the tiny model only (no `model` given): it must start on a 2-core CPU box.
TINY_MODEL_DEFAULTS = {"max_model_len": 2048, "enforce_eager": True,
                       "kv_cache_memory_bytes": 64 * 1024 * 1024}
# ...and its environment.  On CPU vLLM forces the multiprocess executor, whose worker
# and EngineCore spin on shared memory (sched_yield) for up to a second after each
# message: on a 2-core node they hold both cores, and the replica, HAProxy and the
# clients get CPU in bursts (a stream's tokens arrive after 1-2 s, all at once).  The
# in-process executor with one OpenMP thread computes on one core and blocks when
# idle: same tokens, steady streaming; bare vLLM on 2 cores went from 24 to 87
# requests/s at 64 clients, 138 to 21 ms CPU per request (README).  A real
# model on a many-core node wants the default (OpenMP over the node's cores).
SMALL_NODE_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "OMP_NUM_THREADS": "1"}
# vLLM's own `stream_interval` (tokens per streamed output; its default is 1).  With
# 1, AsyncLLM builds a RequestOutput per token per request and every layer after it
# (detokenized delta, our coalescer, SSE, HAProxy, the client) works per token.  At
# high concurrency an engine step takes longer than `stream_interval_ms`, so the
# time-based coalescer has nothing to merge; a token count does.  vLLM still sends
# the first and the finishing output at once, so TTFT and end-to-end latency are
# untouched; in between a client gets text every 4 tokens (~20 ms at one stream on
# this box's tiny model, ~100 ms at 128).  At 128 streams on 2 cores this cut the
# replica's and HAProxy's CPU per request by ~20 % (README, "What changed").
# `engine_args: {stream_interval: 1}` restores per-token streaming.
DEFAULT_STREAM_INTERVAL_TOKENS = 4
_DEFAULT_ENV = {"VLLM_NO_USAGE_STATS": "1"}


class EngineStartError(RuntimeError):
    """vLLM failed to start twice (the first failure may be a known flake)."""


def split_engine_args(model_name: str, engine_args: dict[str, Any], task: str = "generate"
                      ) -> tuple[dict[str, Any], dict[str, Any]]:
    """(AsyncEngineArgs kwargs, replica options) with hpcserve's defaults filled in.

    The names were checked with the config (``VLLMEngineArgs``), so a typo was named
    at deploy time instead of surfacing as a TypeError deep in vLLM.
    """
    vllm_kwargs = {k: v for k, v in engine_args.items() if k not in SERVING_ARGS}
    serving = {k: v for k, v in engine_args.items() if k in SERVING_ARGS}
    if "model" not in vllm_kwargs:
        from serve_app.tiny_model import ensure_tiny_model
        vllm_kwargs["model"] = str(ensure_tiny_model())
        for key, value in TINY_MODEL_DEFAULTS.items():
            if key != "kv_cache_memory_bytes" or "VLLM_CPU_KVCACHE_SPACE" not in {
                    **os.environ, **serving.get("env", {})}:
                vllm_kwargs.setdefault(key, value)
        serving["env"] = {**SMALL_NODE_ENV, **serving.get("env", {})}
    vllm_kwargs.setdefault("served_model_name", model_name)
    if task == "embed":
        vllm_kwargs.setdefault("runner", "pooling")
    else:
        vllm_kwargs.setdefault("stream_interval", DEFAULT_STREAM_INTERVAL_TOKENS)
    vllm_kwargs.setdefault("disable_log_stats", True)  # see stat_loggers()
    serving.setdefault("engine_metrics", True)
    return vllm_kwargs, serving


def stat_loggers(engine_metrics: bool) -> list[Any] | None:
    """vLLM's engine metrics (TTFT/ITL histograms, running and waiting requests, KV
    cache use) exported through Ray's metrics agent, so they reach Prometheus from any
    node as ``ray_vllm_*``.  vLLM's own loggers are off unless ``disable_log_stats:
    false`` is given: in a replica its Prometheus registry is never scraped and its
    text log only grows, while both cost EngineCore and replica CPU every step."""
    if not engine_metrics:
        return None
    from vllm.v1.metrics.ray_wrappers import RayPrometheusStatLogger
    return [RayPrometheusStatLogger]


def embed_batch_logger(batches: Counter) -> Any:
    """A vLLM stat logger counting embedding requests finished per engine step into
    ``batches`` (a pooling request finishes in the step that runs it, so this is
    the batch size vLLM's scheduler chose)."""
    from vllm.v1.metrics.loggers import StatLoggerBase

    class EmbedBatches(StatLoggerBase):
        def __init__(self, vllm_config: Any, engine_index: int = 0):
            pass

        def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None,
                   engine_idx: int = 0):
            if iteration_stats is not None and iteration_stats.finished_requests:
                batches[len(iteration_stats.finished_requests)] += 1

        def log_engine_initialized(self):
            pass

    return EmbedBatches


def start_engine(engine_args: Any, model_name: str, loggers: list[Any] | None = None):
    """``AsyncLLM.from_engine_args``, retried once: start flakes ~1 in 5 under load
    (SemLock / ``/psm_*`` FileNotFoundError), a second failure is reported."""
    from vllm.v1.engine.async_llm import AsyncLLM

    first: BaseException | None = None
    for attempt in (1, 2):
        t0 = time.monotonic()
        try:
            engine = AsyncLLM.from_engine_args(engine_args, stat_loggers=loggers)
            log.info("vLLM engine for %s started in %.1f s (attempt %d)", model_name,
                     time.monotonic() - t0, attempt)
            return engine
        except Exception as exc:  # noqa: BLE001 - any start failure gets one retry
            if first is not None:
                raise EngineStartError(
                    f"vLLM engine for model '{model_name}' ({engine_args.model}) failed to "
                    f"start twice. First: {type(first).__name__}: {first}. Second: "
                    f"{type(exc).__name__}: {exc}") from exc
            first = exc
            log.warning("vLLM engine for %s failed to start (%s: %s); retrying once",
                        model_name, type(exc).__name__, exc)
            time.sleep(2.0)
    raise AssertionError("unreachable")


class VLLMEngine:
    def __init__(self, model_name: str, args: VLLMEngineArgs, task: str = "generate"):
        from vllm.engine.arg_utils import AsyncEngineArgs

        self.model_name = model_name
        self.task = task
        self.aborted = 0  # requests freed before they finished (client gone or failed)
        self.embed_batches: Counter[int] = Counter()
        vllm_kwargs, serving = split_engine_args(
            model_name, args.model_dump(exclude_unset=True), task)
        for key, value in {**_DEFAULT_ENV, **serving.get("env", {})}.items():
            if key in serving.get("env", {}) or key not in os.environ:
                os.environ[key] = str(value)
        loggers = stat_loggers(serving["engine_metrics"])
        if task == "embed":
            loggers = [*(loggers or ()), embed_batch_logger(self.embed_batches)]
        self.engine = start_engine(AsyncEngineArgs(**vllm_kwargs), model_name, loggers)
        if task == "generate":
            self._init_generation(serving)

    def _init_generation(self, serving: dict[str, Any]) -> None:
        from vllm.entrypoints.serve.utils.api_utils import get_max_tokens
        from vllm.renderers.chat_utils import load_chat_template
        from vllm.renderers.online_renderer import OnlineRenderer

        mc = self.engine.model_config
        self._get_max_tokens = get_max_tokens
        self.renderer = OnlineRenderer(
            model_config=mc, renderer=self.engine.renderer, request_logger=None,
            chat_template=load_chat_template(serving.get("chat_template")),
            chat_template_content_format=serving.get("chat_template_content_format", "auto"),
            default_chat_template_kwargs=serving.get("default_chat_template_kwargs"))
        self.renderer.warmup()
        # As vLLM's OpenAIServingChat/Completion: the model's generation_config
        # defaults, and its max_tokens override.
        self.default_sampling = mc.get_diff_sampling_param()
        self.override_max_tokens = (
            self.default_sampling.get("max_tokens")
            if mc.generation_config not in ("auto", "vllm")
            else getattr(mc, "override_generation_config", {}).get("max_new_tokens"))

    # ---- generation ---------------------------------------------------------
    async def generate(self, request: GenerateRequest) -> AsyncIterator[list[GenerateDelta]]:
        from vllm.sampling_params import RequestOutputKind

        from serve_app.engines.vllm_requests import (
            engine_error,
            finish_reason,
            logprobs_content,
        )

        chat = request.messages is not None
        engine_input, prompt_len, sampling = await self._prepare(request, chat)
        sampling.output_kind = RequestOutputKind.DELTA
        want_logprobs = sampling.logprobs is not None
        tokenizer = self.engine.renderer.tokenizer
        request_id = f"{request.request_id}-{uuid.uuid4().hex[:8]}"  # unique per attempt
        completion_tokens, finished, first = 0, False, True
        try:
            # vLLM's per-request collector merges outputs produced while we were
            # busy, so each item is everything that was ready: one chunk per item.
            async for out in self.engine.generate(engine_input, sampling, request_id):
                c = out.outputs[0]
                completion_tokens += len(c.token_ids)
                delta = GenerateDelta(text=c.text, num_tokens=len(c.token_ids))
                if want_logprobs and c.logprobs:
                    delta.extras["logprobs"] = logprobs_content(c.token_ids, c.logprobs,
                                                                tokenizer)
                if out.finished:
                    finished = True
                    delta.finish_reason = finish_reason(c.finish_reason)
                if out.finished or first:  # the first: prompt tokens up front
                    delta.usage = Usage(prompt_len, completion_tokens)
                first = False
                yield [delta]
        except Exception as exc:
            err = engine_error(exc, chat)
            if err is not None:
                raise err from None
            raise
        finally:
            if not finished:  # client gone (cancelled) or failed: free the KV cache now
                self.aborted += 1
                await _abort_quietly(self.engine, request_id)

    async def _prepare(self, request: GenerateRequest, chat: bool):
        """(engine input, prompt tokens excluding continuation, SamplingParams)."""
        from vllm.entrypoints.serve.engine.protocol import ErrorResponse

        from serve_app.engines.vllm_requests import (
            engine_error,
            error_response_to_engine_error,
            to_vllm_request,
        )

        vreq = to_vllm_request(request, self.model_name)
        try:
            if chat:
                rendered = await self.renderer.render_chat(vreq)
                if isinstance(rendered, ErrorResponse):
                    raise error_response_to_engine_error(rendered, chat)
                engine_input = rendered[1][0]
            else:
                rendered = await self.renderer.render_completion(vreq)
                if isinstance(rendered, ErrorResponse):
                    raise error_response_to_engine_error(rendered, chat)
                engine_input = rendered[0]
            prompt_ids = list(engine_input["prompt_token_ids"])
            prompt_len = len(prompt_ids)
            if request.continuation:
                # A failed-over stream: the text the client already has follows the
                # templated prompt, tokenized by vLLM's tokenizer, and generation
                # resumes after it.
                tokenizer = self.engine.renderer.get_tokenizer()
                extra = tokenizer.encode(request.continuation, add_special_tokens=False)
                engine_input["prompt_token_ids"] = prompt_ids + list(extra)
                if engine_input.get("prompt") is not None:
                    engine_input["prompt"] += request.continuation
            max_tokens = self._get_max_tokens(
                self.engine.model_config.max_model_len,
                vreq.max_completion_tokens if chat and vreq.max_completion_tokens is not None
                else vreq.max_tokens,
                len(engine_input["prompt_token_ids"]), self.default_sampling,
                self.override_max_tokens, truncate_prompt_tokens=vreq.truncate_prompt_tokens)
            sampling = vreq.to_sampling_params(max_tokens, self.default_sampling)
        except EngineError:
            raise
        except Exception as exc:
            err = engine_error(exc, chat)
            if err is not None:
                raise err from None
            raise
        return engine_input, prompt_len, sampling

    # ---- embeddings ---------------------------------------------------------
    async def embed(self, request: EmbedRequest) -> EmbedResult:
        """One ``encode`` request per input, all at once: vLLM's scheduler batches
        them with every other request's."""
        import numpy as np
        from vllm.pooling_params import PoolingParams

        from serve_app.embed_inputs import check_dimensions, check_inputs, token_ids
        from serve_app.engines.vllm_requests import engine_error

        mc = self.engine.model_config
        check_dimensions(request.dimensions, mc.get_hidden_size(), bool(mc.is_matryoshka),
                         mc.matryoshka_dimensions)
        inputs = token_ids(self.engine.renderer.get_tokenizer(), request.inputs)
        check_inputs(inputs, mc.max_model_len, mc.get_vocab_size())
        params = PoolingParams(task="embed", dimensions=request.dimensions)
        base = f"{request.request_id}-{uuid.uuid4().hex[:8]}"
        try:
            prompts = await self.engine.renderer.render_cmpl_async(
                [{"prompt_token_ids": ids} for ids in inputs])
            rows = await asyncio.gather(*(self._encode(prompt, params, f"{base}-{i}")
                                          for i, prompt in enumerate(prompts)))
        except Exception as exc:
            err = engine_error(exc, chat=False)
            if err is None:
                raise
            if err.param in (None, "prompt"):
                err.param = "input"
            raise err from None
        return EmbedResult(embeddings=np.stack(rows).astype(np.float32, copy=False),
                           prompt_tokens=sum(len(ids) for ids in inputs))

    async def _encode(self, prompt: Any, params: Any, request_id: str):
        finished = False
        try:
            async for out in self.engine.encode(prompt, params, request_id):
                finished = out.finished
                data = out.outputs.data
            return data.float().cpu().numpy()
        finally:
            if not finished:  # cancelled (client gone) or failed: free it now
                self.aborted += 1
                await _abort_quietly(self.engine, request_id)

    # ---- control ------------------------------------------------------------
    async def model_info(self) -> dict[str, Any]:
        import vllm

        mc = self.engine.model_config
        info = {"model": self.model_name, "max_model_len": mc.max_model_len, "engine": "vllm",
                "engine_model": mc.model, "dtype": str(mc.dtype),
                "vllm_version": vllm.__version__}
        if self.task == "embed":
            info["dimensions"] = mc.get_hidden_size()
        return info

    async def check_health(self) -> None:
        """Raises when the EngineCore process died, so Serve replaces this replica."""
        if self.engine.errored:
            raise RuntimeError(f"vLLM engine for '{self.model_name}' is dead "
                               f"({type(self.engine.dead_error).__name__})")
        await self.engine.check_health()

    async def stats(self) -> dict[str, Any]:
        """``running``: requests the engine still holds (unfinished, incl. queued);
        ``aborted``: requests this replica freed before they finished."""
        stats = {"engine": "vllm", "running": self.engine.get_num_unfinished_requests(),
                 "aborted": self.aborted,
                 "queued_tokens": self.engine.get_num_queued_tokens(),
                 "errored": self.engine.errored}
        if self.task == "embed":  # string keys, as the ZMQ engine's
            stats["embed_batches_by_size"] = {
                str(k): v for k, v in sorted(self.embed_batches.items())}
        return stats

    def shutdown(self) -> None:
        """Stop the EngineCore process."""
        engine, self.engine = getattr(self, "engine", None), None
        if engine is not None:
            engine.shutdown()


async def _abort_quietly(engine: Any, request_id: str) -> None:
    """Abort ``request_id``; safe to call from a cancelled generator's ``finally``."""
    try:
        await asyncio.shield(engine.abort(request_id))
    except BaseException:  # noqa: BLE001 - already finished/aborted, or loop closing
        pass
