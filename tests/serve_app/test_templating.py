"""Prompt rendering shared by the engines that tokenize themselves."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from serve_app.protocol import GenerateRequest
from serve_app.templating import render_prompt


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def test_a_prompt_is_used_as_is_with_the_continuation_appended(tokenizer) -> None:
    request = GenerateRequest(request_id="r", model="m", prompt="Once upon", continuation=" a time")
    assert render_prompt(tokenizer, request) == "Once upon a time"


def test_messages_go_through_the_chat_template_with_a_generation_prompt(tokenizer) -> None:
    request = GenerateRequest(
        request_id="r", model="m", continuation="Sure",
        messages=[{"role": "system", "content": "Be brief."},
                  {"role": "user", "content": [{"type": "text", "text": "Hi "},
                                               {"type": "image_url", "image_url": {"url": "x"}},
                                               {"type": "text", "text": "there"}]}])
    assert render_prompt(tokenizer, request) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\nSure")


def test_a_request_without_prompt_or_messages_is_refused(tokenizer) -> None:
    with pytest.raises(ValueError):
        render_prompt(tokenizer, GenerateRequest(request_id="r", model="m"))
