"""The workload must be reproducible (compare mode relies on it) and the arrivals must
really be Poisson (otherwise a "QPS sweep" measures some other load)."""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import pytest

from cluster.bench.workload import PromptFactory, poisson_arrivals


def test_poisson_mean_interarrival_matches_rate() -> None:
    qps = 4.0
    gaps = np.diff([0.0, *poisson_arrivals(qps, seed=7, count=20_000)])
    assert gaps.mean() == pytest.approx(1 / qps, rel=0.03)
    # Exponential gaps: std == mean, and P(gap < mean) = 1 - 1/e.
    assert gaps.std() == pytest.approx(1 / qps, rel=0.05)
    assert (gaps < 1 / qps).mean() == pytest.approx(1 - math.exp(-1), abs=0.015)
    assert (gaps > 0).all()


def test_poisson_is_deterministic_per_seed() -> None:
    a = poisson_arrivals(2.0, seed=3, count=100)
    assert a == poisson_arrivals(2.0, seed=3, count=100)
    assert a != poisson_arrivals(2.0, seed=4, count=100)
    assert poisson_arrivals(2.0, seed=[3, 1], count=10) == poisson_arrivals(2.0, seed=[3, 1], count=10)


def test_poisson_duration_bound() -> None:
    qps, duration = 10.0, 100.0
    counts = []
    for seed in range(5):
        offs = poisson_arrivals(qps, seed=seed, duration=duration)
        assert offs == sorted(offs) and 0 < offs[0] and offs[-1] < duration
        counts.append(len(offs))
    # Poisson(1000): 5 runs averaged, sd ≈ 14; 5 sd of slack.
    assert np.mean(counts) == pytest.approx(qps * duration, abs=70)
    assert len(set(counts)) > 1


@pytest.mark.parametrize("kwargs", [{"count": 3, "duration": 1.0}, {}])
def test_poisson_needs_exactly_one_bound(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        poisson_arrivals(1.0, seed=0, **kwargs)


def test_poisson_rejects_nonpositive_rate() -> None:
    with pytest.raises(ValueError):
        poisson_arrivals(0.0, seed=0, count=3)


def test_prompts_have_target_length_and_are_reproducible() -> None:
    f = PromptFactory(prompt_tokens=50, output_tokens=9, seed=1)
    a = f.request(0, 5)
    assert len(a.prompt.split()) == 50 and a.max_tokens == 9 and a.index == 5
    assert f.request(0, 5) == a
    assert f.request(0, 6).prompt != a.prompt
    assert f.request(1, 5).prompt != a.prompt
    assert PromptFactory(50, 9, seed=2).request(0, 5).prompt != a.prompt


class _CharTokenizer:
    """One token per character: makes "exact length with a tokenizer" checkable."""

    def encode(self, text: str, **kwargs: Any) -> list[int]:
        return [ord(c) for c in text]

    def decode(self, ids: Sequence[int], **kwargs: Any) -> str:
        return "".join(chr(i) for i in ids)


def test_prompt_is_cut_to_exact_length_with_tokenizer() -> None:
    tok = _CharTokenizer()
    spec = PromptFactory(prompt_tokens=333, output_tokens=4, tokenizer=tok).request(0, 0)
    assert len(tok.encode(spec.prompt)) == 333
