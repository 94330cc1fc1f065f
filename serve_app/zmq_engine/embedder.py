"""Batched embeddings over a transformers encoder, pooled as sentence-transformers does.

Why batching works as it does: a forward pass over several inputs costs little more
than over one, and the engine's generation thread drains every message that arrived
while the previous pass ran before it calls ``step()`` again.  So the inputs of
concurrent requests wait in one queue, and each step embeds up to ``max_batch`` of
them (across requests, first come first served) in one padded forward pass; under
load the batches grow by themselves, and a lone request never waits for company.

Pooling follows the model directory's sentence-transformers config, the same files
``SentenceTransformer(dir)`` reads: ``modules.json`` lists the modules (Transformer,
Pooling, Normalize), ``1_Pooling/config.json`` (or the path modules.json gives)
says which pooling (``pooling_mode_mean_tokens``, ``_cls_token``, ``_max_tokens``,
``_mean_sqrt_len_tokens``, ``_lasttoken``), ``sentence_bert_config.json`` the
``max_seq_length``.  Without modules.json: mean pooling, no normalization (what
sentence-transformers does with a plain transformers model).  Other modules (Dense
layers, ...) are refused at start rather than silently skipped.

Single-threaded like ``Batcher``: one thread calls ``add``/``abort``/``step``; only
``stats`` may be called from another.
"""

from __future__ import annotations

import json
import threading
from collections import Counter, deque
from collections.abc import Hashable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from serve_app.embed_inputs import check_dimensions, check_inputs, token_ids
from serve_app.protocol import EmbedRequest, EmbedResult, EngineError
from serve_app.zmq_engine.batcher import context_length

Event = tuple[Hashable, EmbedResult]
_POOLING_MODES = ("cls_token", "mean_tokens", "max_tokens", "mean_sqrt_len_tokens",
                  "lasttoken")
_KNOWN_MODULES = {"Transformer", "Pooling", "Normalize"}


@dataclass(frozen=True)
class Pooling:
    mode: str = "mean_tokens"      # one of _POOLING_MODES
    normalize: bool = False
    max_seq_length: int | None = None
    matryoshka: bool = False
    dimensions: list[int] | None = None  # Matryoshka sizes the model was trained for

    @classmethod
    def from_model_dir(cls, model_dir: str | Path) -> Pooling:
        root = Path(model_dir)
        # Matryoshka, as vLLM reads it from config.json
        config = _read_json(root / "config.json") or {}
        sizes = config.get("matryoshka_dimensions")
        sizes = sizes if isinstance(sizes, list) else None
        matryoshka = bool(config.get("is_matryoshka") or sizes)
        modules = _read_json(root / "modules.json")
        if modules is None:
            return cls(matryoshka=matryoshka, dimensions=sizes)
        mode, normalize, max_len = "mean_tokens", False, None
        for module in modules:
            kind = str(module.get("type", "")).rsplit(".", 1)[-1]
            path = root / module.get("path", "")
            if kind not in _KNOWN_MODULES:
                raise ValueError(f"{root / 'modules.json'}: module {module.get('type')!r} is "
                                 f"not supported by the ZMQ engine (only {sorted(_KNOWN_MODULES)})")
            if kind == "Transformer":
                st = _read_json(path / "sentence_bert_config.json") or {}
                max_len = st.get("max_seq_length")
            elif kind == "Pooling":
                pooling = _read_json(path / "config.json") or {}
                modes = [m for m in _POOLING_MODES if pooling.get(f"pooling_mode_{m}")]
                if len(modes) != 1:
                    raise ValueError(f"{path / 'config.json'}: exactly one pooling mode is "
                                     f"supported, found {modes or 'none'}")
                mode = modes[0]
            else:
                normalize = True
        return cls(mode=mode, normalize=normalize, max_seq_length=max_len,
                   matryoshka=matryoshka, dimensions=sizes)


def _read_json(path: Path) -> Any:
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def pool(hidden: torch.Tensor, mask: torch.Tensor, pooling: Pooling) -> torch.Tensor:
    """[rows, tokens, dim] hidden states and [rows, tokens] mask -> [rows, dim]."""
    mask_f = mask.unsqueeze(-1).to(hidden.dtype)
    lengths = mask.sum(dim=1)
    if pooling.mode == "cls_token":
        out = hidden[:, 0]
    elif pooling.mode == "lasttoken":
        out = hidden[torch.arange(hidden.shape[0]), lengths - 1]
    elif pooling.mode == "max_tokens":
        out = hidden.masked_fill(mask_f == 0, torch.finfo(hidden.dtype).min).max(dim=1).values
    else:
        summed = (hidden * mask_f).sum(dim=1)
        denominator = lengths.clamp(min=1).unsqueeze(-1).to(hidden.dtype)
        out = summed / (denominator.sqrt() if pooling.mode == "mean_sqrt_len_tokens"
                        else denominator)
    return F.normalize(out, p=2, dim=1) if pooling.normalize else out


@dataclass(eq=False)
class _Job:
    key: Hashable
    inputs: list[list[int]]
    dimensions: int | None
    rows: list[np.ndarray | None] = field(default_factory=list)
    next: int = 0  # the next input to embed

    @property
    def prompt_tokens(self) -> int:
        return sum(len(ids) for ids in self.inputs)


class Embedder:
    """Embeds requests' inputs in shared batches, up to ``max_batch`` inputs a pass."""

    task = "embed"

    def __init__(self, model: Any, tokenizer: Any, pooling: Pooling, *, max_batch: int = 32,
                 max_model_len: int | None = None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.pooling = pooling
        self.max_batch = max_batch
        limits = [n for n in (max_model_len, pooling.max_seq_length) if n]
        self.max_model_len = min([*limits, context_length(model.config)])
        self.dimensions = int(model.config.hidden_size)
        self.vocab_size = int(model.config.vocab_size)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self._device = next(model.parameters()).device
        self._queue: deque[_Job] = deque()
        self._lock = threading.Lock()
        self._batches: Counter[int] = Counter()           # inputs per forward pass
        self._batch_requests: Counter[int] = Counter()    # requests per forward pass
        self._requests = self._inputs = self._tokens = self._aborted = 0

    def add(self, key: Hashable, request: EmbedRequest) -> None:
        """Queue a request; raises ``EngineError`` (a 400) for input it cannot embed."""
        if any(job.key == key for job in self._queue):
            raise EngineError(f"request id {request.request_id!r} is already running",
                              param="request_id", code="duplicate_request_id")
        check_dimensions(request.dimensions, self.dimensions, self.pooling.matryoshka,
                         self.pooling.dimensions)
        inputs = token_ids(self.tokenizer, request.inputs)
        check_inputs(inputs, self.max_model_len, self.vocab_size)
        self._queue.append(_Job(key, inputs, request.dimensions, rows=[None] * len(inputs)))

    def abort(self, key: Hashable) -> list[Event]:
        """Forget a request (its client is gone); nothing is sent for it."""
        for job in self._queue:
            if job.key == key:
                self._queue.remove(job)
                with self._lock:
                    self._aborted += 1
                break
        return []

    def fail_all(self) -> list[Hashable]:
        keys = [job.key for job in self._queue]
        self._queue.clear()
        return keys

    def has_work(self) -> bool:
        return bool(self._queue)

    @torch.inference_mode()
    def step(self) -> list[Event]:
        """One forward pass over up to ``max_batch`` queued inputs; finished requests."""
        picked: list[tuple[_Job, int]] = []
        for job in self._queue:
            while job.next < len(job.inputs) and len(picked) < self.max_batch:
                picked.append((job, job.next))
                job.next += 1
            if len(picked) >= self.max_batch:
                break
        vectors = self._forward([job.inputs[i] for job, i in picked])
        for row, (job, i) in enumerate(picked):
            job.rows[i] = vectors[row]
        # Answered as soon as all of a request's inputs are done (a big request that
        # spans several passes does not hold back the small ones queued behind it).
        events = []
        for job in [j for j in self._queue if j.next == len(j.inputs)]:
            self._queue.remove(job)
            events.append((job.key, self._result(job)))
        with self._lock:
            self._batches[len(picked)] += 1
            self._batch_requests[len({id(job) for job, _ in picked})] += 1
            self._inputs += len(picked)
            self._tokens += sum(len(job.inputs[i]) for job, i in picked)
            self._requests += len(events)
        return events

    def _forward(self, batch: list[list[int]]) -> np.ndarray:
        width = max(len(ids) for ids in batch)
        ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, seq in enumerate(batch):
            ids[row, :len(seq)] = torch.tensor(seq)
            mask[row, :len(seq)] = 1
        ids, mask = ids.to(self._device), mask.to(self._device)
        hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
        return pool(hidden.float(), mask, self.pooling).cpu().numpy()

    def _result(self, job: _Job) -> EmbedResult:
        matrix = np.stack(job.rows).astype(np.float32, copy=False)
        if job.dimensions is not None and job.dimensions < matrix.shape[1]:
            matrix = matrix[:, :job.dimensions]
            if self.pooling.normalize:  # a shortened normalized vector is renormalized
                matrix = matrix / np.linalg.norm(matrix, axis=1, keepdims=True).clip(1e-12)
        return EmbedResult(embeddings=np.ascontiguousarray(matrix),
                           prompt_tokens=job.prompt_tokens)

    def stats(self) -> dict[str, Any]:
        """Counters; ``embed_batches_by_size``: forward passes by inputs in them
        (string keys), ``embed_batches_by_requests``: by requests in them."""
        with self._lock:
            return {
                "task": "embed", "waiting": len(self._queue), "max_batch": self.max_batch,
                "embed_batches_by_size": {str(k): v for k, v in sorted(self._batches.items())},
                "embed_batches_by_requests": {
                    str(k): v for k, v in sorted(self._batch_requests.items())},
                "embed_requests": self._requests, "embed_inputs": self._inputs,
                "embed_tokens": self._tokens, "requests_aborted": self._aborted,
            }


def load_embedder(model_dir: str, dtype: Any, max_batch: int,
                  max_model_len: int | None) -> Embedder:
    from transformers import AutoModel, AutoTokenizer

    pooling = Pooling.from_model_dir(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModel.from_pretrained(model_dir, dtype=dtype)
    return Embedder(model, tokenizer, pooling, max_batch=max_batch, max_model_len=max_model_len)
