"""The continuous batcher, in-process on the tiny model (no sockets)."""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from serve_app.protocol import EngineError, GenerateRequest, SamplingParams
from serve_app.templating import render_prompt
from serve_app.zmq_engine.batcher import Batcher
from serve_app.zmq_engine.detokenizer import IncrementalDetokenizer, StopStringBuffer

PROMPTS = ["Hello there", "Write some python code please", "a", "The cluster node queue " * 4,
           "日本語 héllo", "one two"]


@dataclass
class Result:
    text: str = ""
    num_tokens: int = 0
    finish_reason: str | None = None
    completion_tokens: int = 0
    prompt_tokens: int = 0


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_model_dir: Path):
    torch.set_num_threads(1)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    return model, tokenizer


@pytest.fixture
def batcher(model_and_tokenizer) -> Batcher:
    model, tokenizer = model_and_tokenizer
    return Batcher(model, tokenizer, max_batch=8)


def chat(text: str, request_id: str = "r", **sampling) -> GenerateRequest:
    sampling.setdefault("temperature", 0.0)
    return GenerateRequest(request_id=request_id, model="tiny",
                           messages=[{"role": "user", "content": text}],
                           sampling=SamplingParams(**sampling))


def run(batcher: Batcher, requests: dict[Hashable, GenerateRequest],
        join_every: int = 0) -> dict[Hashable, Result]:
    """Drive the batcher to completion; with ``join_every`` requests join mid-run."""
    results = {key: Result() for key in requests}
    pending = list(requests.items())
    if not join_every:
        for key, request in pending:
            batcher.add(key, request)
        pending = []
    steps = 0
    while batcher.has_work() or pending:
        if pending and steps % join_every == 0:
            batcher.add(*pending.pop(0))
        steps += 1
        for key, delta in batcher.step():
            r = results[key]
            assert r.finish_reason is None, "delta after the final one"
            r.text += delta.text
            r.num_tokens += delta.num_tokens
            if delta.finish_reason:
                r.finish_reason = delta.finish_reason
                r.completion_tokens = delta.usage.completion_tokens
                r.prompt_tokens = delta.usage.prompt_tokens
    return results


def test_greedy_is_identical_alone_and_batched_with_joins_and_leaves(batcher: Batcher) -> None:
    requests = {i: chat(p, max_tokens=8 + 3 * i) for i, p in enumerate(PROMPTS)}
    alone = {i: run(batcher, {i: r})[i] for i, r in requests.items()}
    assert batcher.stats()["decode_steps_by_batch_size"].keys() == {"1"}

    batched = run(batcher, requests, join_every=2)  # joins between decode steps, leaves at ends
    for i in requests:
        assert batched[i] == alone[i], f"request {i} differs when batched"
        assert alone[i].finish_reason == "length" and alone[i].completion_tokens == 8 + 3 * i
    sizes = {int(k) for k in batcher.stats()["decode_steps_by_batch_size"]}
    assert max(sizes) >= 4 and len(sizes) >= 3  # the batch grew and shrank


def test_seeded_sampling_is_reproducible_alone_and_batched(batcher: Batcher) -> None:
    def sampled(seed: int, rid: str) -> GenerateRequest:
        return chat("Tell me something", rid, temperature=0.9, top_p=0.9, seed=seed, max_tokens=12)

    alone = run(batcher, {"a": sampled(7, "a")})["a"]
    together = run(batcher, {"a": sampled(7, "a"), "b": sampled(8, "b"), "c": sampled(7, "c")})
    assert together["a"] == alone and together["c"] == alone
    assert together["b"].text != alone.text


def test_usage_counts_prompt_and_completion_tokens(batcher: Batcher) -> None:
    request = chat("Hello there", max_tokens=10)
    result = run(batcher, {"k": request})["k"]
    prompt = render_prompt(batcher.tokenizer, request)
    assert result.prompt_tokens == len(batcher.tokenizer(prompt, add_special_tokens=False)["input_ids"])
    assert result.completion_tokens == result.num_tokens == 10
    assert result.finish_reason == "length"


def test_a_continued_request_counts_only_the_clients_prompt(batcher: Batcher) -> None:
    """A failed-over stream: the text already sent is generated after, not prompted."""
    first = run(batcher, {"k": chat("Hello there", max_tokens=12)})["k"]
    continued = chat("Hello there", max_tokens=4)
    continued.continuation = first.text[: len(first.text) // 2]
    result = run(batcher, {"k": continued})["k"]
    assert continued.continuation.strip()
    assert result.prompt_tokens == first.prompt_tokens
    assert result.completion_tokens == 4


def test_a_continued_request_gets_at_most_the_room_left(model_and_tokenizer) -> None:
    """Re-tokenized, the text already sent may be longer than it was generated: the
    continuation then ends at the context limit instead of failing."""
    model, tokenizer = model_and_tokenizer
    continued = chat("Hello there", max_tokens=10)
    continued.continuation = " some text already sent"
    with_continuation = len(tokenizer(render_prompt(tokenizer, continued),
                                      add_special_tokens=False)["input_ids"])
    batcher = Batcher(model, tokenizer, max_batch=1, max_model_len=with_continuation + 4)
    result = run(batcher, {"k": continued})["k"]
    assert result.finish_reason == "length" and result.completion_tokens == 4
    with pytest.raises(EngineError):  # a request without continuation asking too much
        batcher.add("k2", chat("Hello there", max_tokens=with_continuation))


def test_stop_string_ends_the_text_before_it(batcher: Batcher) -> None:
    full = run(batcher, {"k": chat("Write some python code please", max_tokens=24)})["k"].text
    stop = full[7:11]  # four characters that usually span a token boundary
    cut = full.index(stop)
    result = run(batcher, {"k": chat("Write some python code please", max_tokens=24,
                                     stop=["never-generated", stop])})["k"]
    assert result.text == full[:cut]
    assert result.finish_reason == "stop"
    assert batcher.stats()["running"] == 0


def test_eos_ends_the_request_unless_ignore_eos(model_and_tokenizer) -> None:
    model, tokenizer = model_and_tokenizer
    probe = Batcher(model, tokenizer)
    probe.add("p", chat("Hello there", max_tokens=1))
    first_token = [d for _, d in probe.step()]
    greedy_first = tokenizer(first_token[0].text, add_special_tokens=False)["input_ids"]
    # Declaring the greedy first token an end-of-sequence token makes the model "stop".
    batcher = Batcher(model, tokenizer, eos_token_ids={greedy_first[0]})
    stopped = run(batcher, {"k": chat("Hello there", max_tokens=5)})["k"]
    assert (stopped.finish_reason, stopped.completion_tokens) == ("stop", 1)
    kept = run(batcher, {"k": chat("Hello there", max_tokens=5, ignore_eos=True)})["k"]
    assert (kept.finish_reason, kept.completion_tokens) == ("length", 5)


@pytest.mark.parametrize("kind", ["prompt", "messages"])
def test_too_long_for_the_context_is_rejected_before_any_token(batcher: Batcher, kind: str) -> None:
    long_text = "word " * 2100
    request = (chat(long_text) if kind == "messages" else
               GenerateRequest(request_id="r", model="tiny", prompt=long_text))
    with pytest.raises(EngineError) as info:
        batcher.add("k", request)
    assert (info.value.status, info.value.code, info.value.param) == (
        400, "context_length_exceeded", kind)
    with pytest.raises(EngineError) as info:
        batcher.add("k", chat("short", max_tokens=2048))
    assert info.value.code == "context_length_exceeded"
    assert not batcher.has_work()


def test_abort_frees_the_row_and_the_rest_continue(batcher: Batcher) -> None:
    alone = run(batcher, {"b": chat("one two", max_tokens=12)})["b"]
    batcher.add("a", chat("Hello there", max_tokens=500))
    batcher.add("b", chat("one two", max_tokens=12))
    text_b = ""
    for _ in range(3):
        text_b += "".join(d.text for k, d in batcher.step() if k == "b")
    [(key, delta)] = batcher.abort("a")
    assert (key, delta.finish_reason) == ("a", "abort")
    assert batcher.stats()["running"] == 1 and batcher.abort("a") == []
    while batcher.has_work():
        text_b += "".join(d.text for k, d in batcher.step() if k == "b")
    assert text_b == alone.text
    assert batcher.stats()["requests_aborted"] == 1


def test_a_step_that_fails_in_prefill_leaves_the_request_for_fail_all(batcher: Batcher) -> None:
    """The server answers fail_all()'s keys with an error; a request lost in between
    would hang its client (schemathesis found one through a sampler error)."""
    batcher.add("a", chat("Hello there", max_tokens=4))
    model = batcher.model
    batcher.model = lambda **kwargs: (_ for _ in ()).throw(RuntimeError("boom"))
    try:
        with pytest.raises(RuntimeError, match="boom"):
            batcher.step()
    finally:
        batcher.model = model
    assert batcher.fail_all() == ["a"] and not batcher.has_work()


def test_incremental_detokenizer_never_splits_a_character(model_and_tokenizer) -> None:
    _, tokenizer = model_and_tokenizer
    text = "naïve café — 日本語 🙂 done"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > len(text.split())  # multi-byte characters span several tokens
    detok = IncrementalDetokenizer(tokenizer, prompt_ids=tokenizer("Q:")["input_ids"])
    pieces = [detok.push(i) for i in ids]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) + detok.flush() == text


def test_stop_buffer_never_releases_part_of_a_stop_string() -> None:
    buffer = StopStringBuffer(["END", "x"])
    assert not buffer.append("abcE")
    assert buffer.take(final=False) == "ab"  # "cE" might begin "END"
    assert buffer.append("ND and more")
    assert buffer.take(final=True) == "c"
    assert buffer.text == "abc"
