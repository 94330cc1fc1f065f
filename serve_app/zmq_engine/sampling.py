"""Choosing the next token from a row of logits: penalties, logit bias, sampling.

Plain tensor functions, so the math is testable without a model.  OpenAI's
semantics (its API reference, "frequency and presence penalties"), over the tokens
generated so far for the request (not the prompt), as vLLM applies them:

    logits[t] -= presence_penalty * (count[t] > 0) + frequency_penalty * count[t]
    logits[t] += logit_bias[t]

Both are applied before temperature and top-p, so greedy decoding (temperature 0)
sees them too: a bias of +100 on one token makes greedy output that token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from serve_app.protocol import EngineError, SamplingParams


# Temperatures below this are greedy, as in vLLM (dividing by 1e-300 overflows to inf).
GREEDY_BELOW = 1e-5


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """One token from a row of logits: greedy at temperature 0, else nucleus sampling."""
    temperature = 1.0 if params.temperature is None else params.temperature
    top_p = 1.0 if params.top_p is None else params.top_p
    if temperature < GREEDY_BELOW:
        return int(logits.argmax())
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        keep = sorted_probs.cumsum(0) - sorted_probs < top_p
        keep[0] = True  # the top token, however small top_p is (5e-324 is 0 in float32)
        probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_probs[keep])
    return int(torch.multinomial(probs, 1, generator=generator))


def apply_penalties(logits: torch.Tensor, counts: torch.Tensor, presence: float,
                    frequency: float) -> torch.Tensor:
    """``logits`` less the penalties for tokens generated ``counts`` times (new tensor)."""
    return logits - frequency * counts - presence * (counts > 0).to(logits.dtype)


def apply_bias(logits: torch.Tensor, token_ids: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``logits`` with ``bias[i]`` added at ``token_ids[i]`` (new tensor)."""
    return logits.index_add(0, token_ids, bias)


@dataclass
class LogitsAdjuster:
    """One request's penalties and bias, and its generated-token counts."""

    presence: float
    frequency: float
    bias_ids: torch.Tensor | None
    bias_values: torch.Tensor | None
    counts: torch.Tensor | None  # [vocab], only when a penalty is set

    @classmethod
    def from_options(cls, options: dict[str, Any], vocab_size: int,
                     device: torch.device | str = "cpu") -> LogitsAdjuster | None:
        """Validated from ``GenerateRequest.extras`` (the wire protocol may bring
        anything, so this checks what the HTTP ingress already did); None: no effect."""
        presence = _number(options.get("presence_penalty"), "presence_penalty", 2.0)
        frequency = _number(options.get("frequency_penalty"), "frequency_penalty", 2.0)
        raw = options.get("logit_bias") or {}
        if not isinstance(raw, dict):
            raise _invalid("logit_bias", "must be a map of token ids to biases")
        bias: dict[int, float] = {}
        for key, value in raw.items():
            token = _token_id(key)
            if token is None or not 0 <= token < vocab_size:
                raise _invalid("logit_bias", f"key {key!r} is not a token id of this model "
                               f"(0 <= id < {vocab_size})")
            bias[token] = _number(value, "logit_bias", 100.0)
        bias = {t: b for t, b in bias.items() if b}
        if not (presence or frequency or bias):
            return None
        ids = values = counts = None
        if bias:
            ids = torch.tensor(list(bias), dtype=torch.long, device=device)
            values = torch.tensor(list(bias.values()), dtype=torch.float32, device=device)
        if presence or frequency:
            counts = torch.zeros(vocab_size, dtype=torch.float32, device=device)
        return cls(presence, frequency, ids, values, counts)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        if self.counts is not None:
            logits = apply_penalties(logits, self.counts[:logits.shape[-1]], self.presence,
                                     self.frequency)
        if self.bias_ids is not None:
            logits = apply_bias(logits, self.bias_ids, self.bias_values.to(logits.dtype))
        return logits

    def record(self, token: int) -> None:
        """Count a generated token (for the penalties)."""
        if self.counts is not None:
            self.counts[token] += 1


def _token_id(key: Any) -> int | None:
    if isinstance(key, int) and not isinstance(key, bool):
        return key
    if isinstance(key, str) and key.isascii() and key.isdigit():
        return int(key)
    return None


def _number(value: Any, param: str, limit: float) -> float:
    if value is None:
        return 0.0
    if isinstance(value, bool) or not isinstance(value, (int, float)) or \
            not -limit <= value <= limit:
        raise _invalid(param, f"must be a number in [-{limit:g}, {limit:g}], got {value!r}")
    return float(value)


def _invalid(param: str, message: str) -> EngineError:
    return EngineError(f"{param} {message}", status=400, param=param, code="invalid_value")
