"""Penalties and logit bias in the ZMQ engine: the math on plain tensors, then the
batcher on the tiny model against a step-by-step reference decode."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from serve_app.protocol import EngineError, GenerateRequest, SamplingParams
from serve_app.templating import prompt_token_ids, render_prompt
from serve_app.zmq_engine import wire
from serve_app.zmq_engine.batcher import Batcher
from serve_app.zmq_engine.sampling import LogitsAdjuster, apply_bias, apply_penalties, sample


def test_penalties_follow_openais_formula():
    logits = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    counts = torch.tensor([0.0, 1.0, 3.0, 0.0, 2.0])
    out = apply_penalties(logits, counts, presence=0.5, frequency=0.25)
    # logits[t] - presence * (count[t] > 0) - frequency * count[t]
    assert out.tolist() == [1.0, 2.0 - 0.5 - 0.25, 3.0 - 0.5 - 0.75, 4.0, 5.0 - 0.5 - 0.5]
    assert logits.tolist() == [1.0, 2.0, 3.0, 4.0, 5.0]  # a new tensor: the batch's is intact
    negative = apply_penalties(logits, counts, presence=-1.0, frequency=-2.0)  # encourages
    assert negative.tolist() == [1.0, 5.0, 10.0, 4.0, 10.0]


def test_bias_adds_to_the_named_tokens_only():
    out = apply_bias(torch.zeros(6), torch.tensor([1, 4]), torch.tensor([100.0, -3.5]))
    assert out.tolist() == [0.0, 100.0, 0.0, 0.0, -3.5, 0.0]


@pytest.mark.parametrize("params", [SamplingParams(temperature=0.7, top_p=5e-324),
                                    SamplingParams(temperature=1e-300),
                                    SamplingParams(temperature=0.0, top_p=0.5)])
def test_extreme_values_that_are_valid_sample_the_top_token(params):
    """top_p below float32's smallest value keeps the top token; a temperature that would
    overflow the division is greedy (vLLM: below 1e-5)."""
    logits = torch.tensor([0.5, 3.0, -1.0, 2.9])
    assert sample(logits, params, torch.Generator().manual_seed(0)) == 1


def test_adjuster_counts_generated_tokens_and_applies_both():
    adjust = LogitsAdjuster.from_options(
        {"presence_penalty": 1.0, "frequency_penalty": 0.5, "logit_bias": {"2": 10, "02": 3}}, 4)
    for token in (1, 1, 3):
        adjust.record(token)
    assert adjust.counts.tolist() == [0.0, 2.0, 0.0, 1.0]
    # "02" is token 2 too: the later key wins, as in vLLM's conversion
    assert adjust(torch.zeros(4)).tolist() == [0.0, -2.0, 3.0, -1.5]


@pytest.mark.parametrize("options", [{}, {"presence_penalty": 0, "frequency_penalty": 0.0},
                                     {"logit_bias": {}}, {"logit_bias": {"3": 0}}])
def test_no_op_options_cost_nothing(options):
    assert LogitsAdjuster.from_options(options, 16) is None


@pytest.mark.parametrize("options,param", [
    ({"logit_bias": {"16": 1}}, "logit_bias"),        # == vocab size: not a token
    ({"logit_bias": {"-1": 1}}, "logit_bias"),
    ({"logit_bias": {"x": 1}}, "logit_bias"),
    ({"logit_bias": {"1": 101}}, "logit_bias"),
    ({"logit_bias": {"1": "5"}}, "logit_bias"),
    ({"logit_bias": [1]}, "logit_bias"),
    ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"frequency_penalty": True}, "frequency_penalty"),
])
def test_invalid_options_are_a_400_naming_them(options, param):
    with pytest.raises(EngineError) as info:
        LogitsAdjuster.from_options(options, 16)
    assert info.value.status == 400 and info.value.param == param


def test_options_cross_the_wire_in_sampling():
    req = GenerateRequest(request_id="r", model="m", prompt="hi",
                          extras={"presence_penalty": 0.5, "logit_bias": {"7": -1.0},
                                  "logprobs": 2})
    frame = wire.decode(wire.encode(wire.submit_message(req)))
    assert frame["sampling"]["presence_penalty"] == 0.5
    assert frame["sampling"]["logit_bias"] == {"7": -1.0}
    back = wire.request_from_submit(frame, "m")
    assert back.extras == {"presence_penalty": 0.5, "logit_bias": {"7": -1.0}}
    assert back.sampling == req.sampling


# ---- the batcher on the tiny model ----------------------------------------------------

@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_model_dir: Path):
    torch.set_num_threads(1)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    return model, tokenizer


def request(text: str, key: str = "r", **extras) -> GenerateRequest:
    return GenerateRequest(request_id=key, model="tiny", prompt=text, extras=extras,
                           sampling=SamplingParams(temperature=0.0, max_tokens=12,
                                                   ignore_eos=True))


def run(batcher: Batcher, requests: dict[str, GenerateRequest]) -> dict[str, str]:
    for key, req in requests.items():
        batcher.add(key, req)
    text = dict.fromkeys(requests, "")
    while batcher.has_work():
        for key, delta in batcher.step():
            text[key] += delta.text
    return text


@torch.inference_mode()
def reference(model, tokenizer, req: GenerateRequest) -> str:
    """Greedy decoding without a KV cache, the formula applied by hand each step."""
    ids = prompt_token_ids(tokenizer, render_prompt(tokenizer, req), req)
    counts = torch.zeros(model.config.vocab_size)
    presence = req.extras.get("presence_penalty", 0.0)
    frequency = req.extras.get("frequency_penalty", 0.0)
    out = []
    for _ in range(req.sampling.max_tokens):
        logits = model(input_ids=torch.tensor([ids + out])).logits[0, -1].float()
        logits = logits - presence * (counts > 0).float() - frequency * counts
        for token, bias in (req.extras.get("logit_bias") or {}).items():
            logits[int(token)] += bias
        token = int(logits.argmax())
        counts[token] += 1
        out.append(token)
    return tokenizer.decode(out, skip_special_tokens=True)


def test_batcher_matches_the_reference_and_biases_only_its_own_row(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    batcher = Batcher(model, tokenizer, max_batch=8)
    (hello,) = tokenizer(" hello", add_special_tokens=False)["input_ids"]
    prompt = "The cluster node said"
    requests = {
        "plain": request(prompt),
        "biased": request(prompt, logit_bias={str(hello): 100}),
        # +15 beats every logit of this model (about +-5): 'hello' over and over...
        "repeat": request(prompt, logit_bias={str(hello): 15}),
        # ...until each use costs 2 (+1 once): the penalty makes the output vary
        "penalized": request(prompt, logit_bias={str(hello): 15}, frequency_penalty=2.0,
                             presence_penalty=1.0),
        "mixed": request("one two", frequency_penalty=-0.5, logit_bias={str(hello): 3.0}),
    }
    together = run(batcher, requests)
    for key, req in requests.items():
        assert together[key] == reference(model, tokenizer, req), key
    assert together["biased"] == together["repeat"] == tokenizer.decode([hello] * 12)
    assert 1 <= together["penalized"].count("hello") < 12
    assert together["plain"].count("hello") == 0
    assert run(batcher, {"plain": requests["plain"]}) == {"plain": together["plain"]}


def test_batcher_rejects_a_bias_outside_the_vocabulary(model_and_tokenizer):
    batcher = Batcher(*model_and_tokenizer, max_batch=2)
    with pytest.raises(EngineError) as info:
        batcher.add("k", request("hi", logit_bias={str(batcher.vocab_size): 1}))
    assert info.value.param == "logit_bias" and str(batcher.vocab_size) in info.value.message
    assert not batcher.has_work()
