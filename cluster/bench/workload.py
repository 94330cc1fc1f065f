"""What the benchmark sends, and when: prompts of a target length and Poisson arrivals.

Both are pure functions of a seed and a request index, so that in compare mode the
bare engine and the service receive the *same* prompts on the *same* schedule; any
difference in the numbers then comes from the endpoints, not from the workload.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, Sequence

import numpy as np

# Short, frequent English words: each is a single token (with its leading space) in
# the common BPE vocabularies (GPT, Llama, Qwen), so N words ≈ N tokens without a
# tokenizer. Random order keeps prompts unique, so prefix caching cannot flatter TTFT.
_WORDS: tuple[str, ...] = tuple(
    """the of and to in is was for on are with as at be by this had not but from or
    have an they which one you were all her she there would their we him been has when
    who will no more if out so said what up its about than into them can only other new
    some could time these two may then do first any my now such like our over man me
    even most made after also did many before must through back years where much your
    way well down should because each just those people how too little state good very
    make world still own see men work long get here between both life being under never
    day same another know while last might us great old year off come since against go
    came right used take three""".split()
)


class Tokenizer(Protocol):
    """The two calls we need from a Hugging Face tokenizer (or anything shaped like one)."""

    def encode(self, text: str, **kwargs: Any) -> list[int]: ...

    def decode(self, ids: Sequence[int], **kwargs: Any) -> str: ...


@dataclass(frozen=True)
class RequestSpec:
    """One request of the workload: its prompt and how many tokens to ask for."""

    index: int
    prompt: str
    max_tokens: int


class PromptFactory:
    """Deterministic prompts of roughly `prompt_tokens` tokens.

    Without a tokenizer a prompt is `prompt_tokens` single-token words, which lands
    within a few percent on common vocabularies; with one, the text is cut to the exact
    token count (a decode/encode round trip can still move it by a token or two).
    """

    def __init__(
        self,
        prompt_tokens: int,
        output_tokens: int,
        seed: int = 0,
        tokenizer: Tokenizer | None = None,
    ) -> None:
        if prompt_tokens < 1 or output_tokens < 1:
            raise ValueError("prompt_tokens and output_tokens must be >= 1")
        self.prompt_tokens = prompt_tokens
        self.output_tokens = output_tokens
        self.seed = seed
        self.tokenizer = tokenizer

    def request(self, stream: int, index: int) -> RequestSpec:
        """The `index`-th request of workload stream `stream` (a step/round identifier).

        Seeding by (seed, stream, index) rather than drawing from one shared generator
        makes the prompt independent of which virtual user happens to send it.
        """
        rng = np.random.default_rng([self.seed, stream, index])
        n_words = self.prompt_tokens if self.tokenizer is None else int(self.prompt_tokens * 1.3) + 8
        words = rng.choice(len(_WORDS), size=n_words)
        text = " ".join(_WORDS[w] for w in words)
        if self.tokenizer is not None:
            ids = self.tokenizer.encode(text, add_special_tokens=False)[: self.prompt_tokens]
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
        return RequestSpec(index=index, prompt=text, max_tokens=self.output_tokens)


def poisson_arrivals(
    qps: float,
    *,
    seed: int | Sequence[int],
    count: int | None = None,
    duration: float | None = None,
) -> list[float]:
    """Arrival offsets (seconds from the step start) of a Poisson process of rate `qps`.

    Open-loop arrivals are what a real service sees: requests keep coming whether or not
    earlier ones finished, so queueing shows up in latency instead of being hidden by a
    closed loop. Exactly one of `count` (that many arrivals) or `duration` (every arrival
    before it) bounds the schedule. The first request arrives after one inter-arrival
    gap, not at 0, so the process is memoryless from the step start.
    """
    if qps <= 0:
        raise ValueError("qps must be > 0")
    if (count is None) == (duration is None):
        raise ValueError("give exactly one of count or duration")
    rng = np.random.default_rng(seed)
    if count is not None:
        return np.cumsum(rng.exponential(1.0 / qps, size=count)).tolist()
    assert duration is not None
    offsets: list[float] = []
    t = 0.0
    # Draw in batches: the expected count is qps*duration, and the loop ends on the first
    # arrival past the horizon, so the sample is an exact Poisson process on [0, duration).
    while True:
        for gap in rng.exponential(1.0 / qps, size=max(16, int(qps * duration) + 16)):
            t += float(gap)
            if t >= duration:
                return offsets
            offsets.append(t)
