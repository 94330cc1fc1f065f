"""The tiny model builds offline, loads through the stock transformers code, and
is safe to build from several processes at once."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from serve_app.tiny_model import MODEL_NAME, ensure_tiny_model


def _digest(model_dir: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(model_dir.iterdir())}


def test_loads_with_auto_classes_and_has_a_standard_config(tiny_model_dir: Path) -> None:
    assert tiny_model_dir.name == MODEL_NAME
    config = json.loads((tiny_model_dir / "config.json").read_text())
    assert config["architectures"] == ["Qwen2ForCausalLM"]
    assert 2 <= config["num_hidden_layers"] <= 4 and 128 <= config["hidden_size"] <= 256
    assert config["max_position_embeddings"] == 2048
    assert "auto_map" not in config  # no custom code: vLLM must load it as plain Qwen2
    with safe_open(tiny_model_dir / "model.safetensors", "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    assert (tiny_model_dir / "generation_config.json").exists()

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert 2000 <= len(tokenizer) <= 4096 and model.config.vocab_size >= len(tokenizer)
    assert tokenizer.eos_token == "<|im_end|>"
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id

    ids = tokenizer("hello world")["input_ids"]
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits
    assert logits.shape == (1, len(ids), model.config.vocab_size)


def test_chat_template_is_chatml_with_generation_prompt(tiny_model_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n"
                    "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    no_prompt = tokenizer.apply_chat_template(messages, tokenize=False)
    assert not no_prompt.endswith("assistant\n")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids.count(tokenizer.convert_tokens_to_ids("<|im_start|>")) == 3  # one token each
    assert tokenizer.decode(ids) == text


def test_byte_level_tokenizer_round_trips_any_text(tiny_model_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    text = "héllo wörld — 日本語 🙂 tabs\tand\nnewlines"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text


def test_concurrent_builds_agree_and_rebuild_is_reproducible(
        tmp_path: Path, tiny_model_dir: Path) -> None:
    """Two processes race on an empty cache: one builds, the other waits for it."""
    cmd = [sys.executable, "-m", "serve_app.tiny_model", "--cache-dir", str(tmp_path)]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=120)[0].strip() for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    built = tmp_path / "models" / MODEL_NAME
    assert outputs == [str(built), str(built)]
    assert [p.name for p in (tmp_path / "models").iterdir() if not p.name.endswith(".lock")] \
        == [MODEL_NAME]  # no temp dirs left behind
    assert _digest(built) == _digest(tiny_model_dir)  # fixed seeds: same bytes every build

    started = time.monotonic()
    assert ensure_tiny_model(tmp_path) == built
    assert time.monotonic() - started < 0.1
