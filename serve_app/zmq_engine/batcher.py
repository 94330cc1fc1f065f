"""Continuous batching over a transformers causal LM on PyTorch.

Why this shape: requests arrive and finish at different times, and a decode step
costs about the same for one sequence as for several, so the engine keeps *one*
running batch and lets requests join and leave it between decode steps.

How: each new request is prefilled alone (batch of one, no padding), then its KV
cache is merged into the running batch's cache, left-padded to a common length.
An attention mask hides the padding and explicit position ids keep every row's
positions as if it ran alone, so a greedy request produces the same tokens whether
it runs alone or batched.  Finished or aborted rows are dropped from the cache, and
padding columns no remaining row needs are trimmed.

The batcher is single-threaded: one thread calls ``add``/``abort``/``step``; only
``stats`` may be called from another thread.
"""

from __future__ import annotations

import threading
from collections import Counter, deque
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from serve_app.protocol import (
    EngineError,
    GenerateDelta,
    GenerateRequest,
    SamplingParams,
    Usage,
)
from serve_app.templating import client_prompt_tokens, prompt_token_ids, render_prompt
from serve_app.zmq_engine.detokenizer import IncrementalDetokenizer, StopStringBuffer
from serve_app.zmq_engine.sampling import LogitsAdjuster, sample

Event = tuple[Hashable, GenerateDelta]


@dataclass(eq=False)
class _Sequence:
    key: Hashable
    prompt_ids: list[int]
    sampling: SamplingParams
    max_tokens: int
    generator: torch.Generator
    detok: IncrementalDetokenizer
    text: StopStringBuffer
    output_ids: list[int] = field(default_factory=list)
    unsent_tokens: int = 0  # generated tokens not yet covered by a sent delta
    num_cached: int = 0  # tokens of this row in the KV cache = position of the next one
    finish_reason: str | None = None
    client_prompt_tokens: int = 0  # prompt_ids without a failed-over stream's continuation
    adjust: LogitsAdjuster | None = None  # penalties / logit bias, if the request has any
    reported: bool = False  # a delta went out (the first one carries the prompt's usage)

    def usage(self) -> Usage:
        return Usage(prompt_tokens=self.client_prompt_tokens,
                     completion_tokens=len(self.output_ids))


class _Stats:
    """Counters another thread may read while the generation thread writes them."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.decode_steps = 0
        self.decode_steps_by_batch_size: Counter[int] = Counter()
        self.prefills = 0
        self.prompt_tokens = 0
        self.tokens_generated = 0
        self.requests_finished = 0
        self.requests_aborted = 0


def context_length(config: Any) -> int:
    """The longest sequence the model was built for (prompt + completion)."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name in ("max_position_embeddings", "n_positions", "seq_length", "max_seq_len"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    raise ValueError("cannot tell the model's context length; pass max_model_len")


def vocab_size(model: Any) -> int:
    """Token ids the model scores (the logits' width), as vLLM's ``get_vocab_size``."""
    config = model.config
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    size = getattr(config, "vocab_size", None)
    return size if isinstance(size, int) else model.get_output_embeddings().weight.shape[0]


def _eos_ids(model: Any, tokenizer: Any) -> set[int]:
    ids: set[int] = set()
    gen = getattr(model, "generation_config", None)
    for value in (getattr(gen, "eos_token_id", None), getattr(model.config, "eos_token_id", None),
                  tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(v for v in value if isinstance(v, int))
    return ids


class Batcher:
    """Runs many generation requests as one batch, one decode step per ``step()``."""

    def __init__(self, model: Any, tokenizer: Any, *, max_batch: int = 32,
                 max_model_len: int | None = None, eos_token_ids: set[int] | None = None,
                 seed: int | None = None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        self.max_model_len = min(max_model_len or context_length(model.config),
                                 context_length(model.config))
        self.vocab_size = vocab_size(model)
        self.eos_token_ids = eos_token_ids if eos_token_ids is not None else _eos_ids(model, tokenizer)
        self._device = next(model.parameters()).device
        self._rng = torch.Generator()
        if seed is None:
            self._rng.seed()
        else:
            self._rng.manual_seed(seed)
        self._waiting: deque[_Sequence] = deque()
        self._running: list[_Sequence] = []  # row i of the cache and mask
        self._cache: DynamicCache | None = None
        self._mask: torch.Tensor | None = None  # [rows, columns], 0 = left padding
        self._stats = _Stats()

    # -- requests in and out -------------------------------------------------------

    def add(self, key: Hashable, request: GenerateRequest) -> None:
        """Queue a request; raises ``EngineError`` (nothing generated) if it cannot run."""
        if any(s.key == key for s in (*self._waiting, *self._running)):
            raise EngineError(f"request id {request.request_id!r} is already running",
                              status=400, param="request_id", code="duplicate_request_id")
        params = request.sampling
        _check_sampling(params)
        adjust = LogitsAdjuster.from_options(request.extras, self.vocab_size, self._device)
        param = "messages" if request.messages is not None else "prompt"
        try:
            text = render_prompt(self.tokenizer, request)
        except Exception as exc:  # a template that rejects the conversation
            raise EngineError(f"cannot apply the chat template: {exc}", status=400,
                              param=param, code="invalid_prompt") from exc
        ids = prompt_token_ids(self.tokenizer, text, request)
        if not ids:
            raise EngineError("the prompt is empty", status=400, param=param, code="invalid_prompt")
        room = self.max_model_len - len(ids)
        max_tokens = params.max_tokens
        if request.continuation and room >= 1 and max_tokens is not None:
            # The text already sent can take more tokens re-tokenized than it took to
            # generate; a failed-over stream ends early rather than failing.
            max_tokens = min(max_tokens, room)
        if room < 1 or (max_tokens is not None and max_tokens > room):
            asked = len(ids) + (params.max_tokens or 1)
            raise EngineError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, "
                f"you requested {asked} tokens ({len(ids)} in the {param}, "
                f"{params.max_tokens or 1} in the completion). Please reduce the length of the "
                f"{param} or completion.",
                status=400, param=param, code="context_length_exceeded")
        generator = self._rng
        if params.seed is not None:
            generator = torch.Generator().manual_seed(params.seed)
        self._waiting.append(_Sequence(
            key=key, prompt_ids=ids, sampling=params,
            max_tokens=max_tokens if max_tokens is not None else room,
            generator=generator, detok=IncrementalDetokenizer(self.tokenizer, ids),
            text=StopStringBuffer(params.stop), adjust=adjust,
            client_prompt_tokens=client_prompt_tokens(self.tokenizer, request, ids)))

    def abort(self, key: Hashable) -> list[Event]:
        """Forget a request; its final delta says ``abort`` (none if it was unknown)."""
        # counted before it leaves the queue: whoever reads the stats never sees the
        # request gone (running 0) and not yet counted
        for seq in self._waiting:
            if seq.key == key:
                with self._stats.lock:
                    self._stats.requests_aborted += 1
                self._waiting.remove(seq)
                break
        else:
            rows = [i for i, s in enumerate(self._running) if s.key == key]
            if not rows:
                return []
            seq = self._running[rows[0]]
            seq.finish_reason = "abort"
            with self._stats.lock:
                self._stats.requests_aborted += 1
            self._drop_finished()
        return [(key, GenerateDelta(finish_reason="abort", usage=seq.usage()))]

    def fail_all(self) -> list[Hashable]:
        """Drop every request (after an engine failure); returns their keys."""
        keys = [s.key for s in (*self._waiting, *self._running)]
        self._waiting.clear()
        self._running, self._cache, self._mask = [], None, None
        return keys

    def has_work(self) -> bool:
        return bool(self._waiting or self._running)

    # -- generation ------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> list[Event]:
        """Admit waiting requests (prefill), then one decode step for the batch."""
        events: list[Event] = []
        while self._waiting and len(self._running) < self.max_batch:
            # Left in the queue until prefilled: if this step fails, fail_all answers it.
            self._prefill(self._waiting[0], events)
            self._waiting.popleft()
        if self._running:
            self._decode(events)
        return events

    def _prefill(self, seq: _Sequence, events: list[Event]) -> None:
        cache = DynamicCache()
        ids = torch.tensor([seq.prompt_ids], device=self._device)
        out = self.model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        seq.num_cached = len(seq.prompt_ids)
        with self._stats.lock:
            self._stats.prefills += 1
            self._stats.prompt_tokens += len(seq.prompt_ids)
        self._accept(seq, self._sample(seq, out.logits[0, -1].float()), events)
        if seq.finish_reason is None:
            self._join(seq, cache)

    def _decode(self, events: list[Event]) -> None:
        rows = len(self._running)
        ids = torch.tensor([[s.output_ids[-1]] for s in self._running], device=self._device)
        positions = torch.tensor([[s.num_cached] for s in self._running], device=self._device)
        mask = torch.cat([self._mask, self._mask.new_ones(rows, 1)], dim=1)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                         past_key_values=self._cache, use_cache=True)
        self._mask = mask
        logits = out.logits[:, -1].float()
        with self._stats.lock:
            self._stats.decode_steps += 1
            self._stats.decode_steps_by_batch_size[rows] += 1
        for row, seq in enumerate(self._running):
            seq.num_cached += 1
            self._accept(seq, self._sample(seq, logits[row]), events)
        self._drop_finished()

    @staticmethod
    def _sample(seq: _Sequence, logits: torch.Tensor) -> int:
        if seq.adjust is not None:
            logits = seq.adjust(logits)
        token = sample(logits, seq.sampling, seq.generator)
        if seq.adjust is not None:
            seq.adjust.record(token)
        return token

    def _accept(self, seq: _Sequence, token: int, events: list[Event]) -> None:
        """Record a generated token, decide whether the request is done, emit text."""
        seq.output_ids.append(token)
        seq.unsent_tokens += 1
        finish, hit_stop = None, False
        if token in self.eos_token_ids and not seq.sampling.ignore_eos:
            finish = "stop"
        elif hit_stop := seq.text.append(seq.detok.push(token)):
            finish = "stop"
        if finish is None and len(seq.output_ids) >= seq.max_tokens:
            finish = "length"
        if finish is not None and not hit_stop and seq.text.append(seq.detok.flush()):
            finish = "stop"  # the held-back tail completed a stop string
        text = seq.text.take(final=finish is not None)
        if text or finish:
            # The first delta carries the usage so far too (its prompt tokens), so a
            # client that asked for usage on every chunk has it from the start.
            events.append((seq.key, GenerateDelta(
                text=text, num_tokens=seq.unsent_tokens, finish_reason=finish,
                usage=seq.usage() if finish or not seq.reported else None)))
            seq.unsent_tokens, seq.reported = 0, True
        seq.finish_reason = finish
        with self._stats.lock:
            self._stats.tokens_generated += 1
            self._stats.requests_finished += finish is not None

    # -- the batch's KV cache ----------------------------------------------------------

    def _join(self, seq: _Sequence, cache: DynamicCache) -> None:
        """Append a prefilled sequence as a new row, left-padding to a common length."""
        new_mask = torch.ones(1, seq.num_cached, dtype=torch.long, device=self._device)
        if self._cache is None:
            self._cache, self._mask, self._running = cache, new_mask, [seq]
            return
        width = max(self._mask.shape[1], seq.num_cached)
        for layer, new in zip(self._cache.layers, cache.layers, strict=True):
            layer.keys = torch.cat([_pad_left(layer.keys, width), _pad_left(new.keys, width)])
            layer.values = torch.cat([_pad_left(layer.values, width), _pad_left(new.values, width)])
        self._mask = torch.cat([_pad_left(self._mask, width), _pad_left(new_mask, width)])
        self._running.append(seq)

    def _drop_finished(self) -> None:
        keep = [i for i, s in enumerate(self._running) if s.finish_reason is None]
        if len(keep) == len(self._running):
            return
        if not keep:
            self._running, self._cache, self._mask = [], None, None
            return
        index = torch.tensor(keep, device=self._device)
        mask = self._mask.index_select(0, index)
        first = int(mask.any(dim=0).nonzero()[0])  # columns before it are padding in every row
        for layer in self._cache.layers:
            layer.keys = layer.keys.index_select(0, index)[:, :, first:]
            layer.values = layer.values.index_select(0, index)[:, :, first:]
        self._mask = mask[:, first:]
        self._running = [self._running[i] for i in keep]

    # -- observability ---------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Counters for tests and operators; ``decode_steps_by_batch_size`` keys are str."""
        s = self._stats
        with s.lock:
            return {
                "running": len(self._running),
                "waiting": len(self._waiting),
                "max_batch": self.max_batch,
                "decode_steps": s.decode_steps,
                "decode_steps_by_batch_size": {
                    str(k): v for k, v in sorted(s.decode_steps_by_batch_size.items())},
                "prefills": s.prefills,
                "prompt_tokens": s.prompt_tokens,
                "tokens_generated": s.tokens_generated,
                "requests_finished": s.requests_finished,
                "requests_aborted": s.requests_aborted,
            }


def _pad_left(t: torch.Tensor, width: int) -> torch.Tensor:
    """Zero-pad the sequence dimension (-2 for KV [B,H,T,D], -1 for masks) to ``width``."""
    if t.dim() == 2:
        return F.pad(t, (width - t.shape[-1], 0))
    return F.pad(t, (0, 0, width - t.shape[-2], 0))


def _check_sampling(params: SamplingParams) -> None:
    if params.temperature is not None and params.temperature < 0:
        raise EngineError("temperature must be >= 0", status=400, param="temperature",
                          code="invalid_value")
    if params.top_p is not None and not 0 < params.top_p <= 1:
        raise EngineError("top_p must be in (0, 1]", status=400, param="top_p", code="invalid_value")
    if params.max_tokens is not None and params.max_tokens < 1:
        raise EngineError("max_tokens must be >= 1", status=400, param="max_tokens",
                          code="invalid_value")
