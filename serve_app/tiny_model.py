"""A tiny, locally built chat model, so nothing in hpcserve needs a model hub.

Tests, benchmarks and first-time users need *a* model that every engine (the ZMQ
engine's transformers code, vLLM, Triton) loads through its normal code path, built
offline in seconds.  Its output is random text, so benchmarks send ``ignore_eos``;
because everything is seeded, the built files and greedy outputs are reproducible.

The model is standard on purpose: a byte-level BPE ``PreTrainedTokenizerFast`` with a
ChatML template and a random-weight ``Qwen2ForCausalLM`` in bf16 safetensors, no
custom code, so any loader that handles Qwen2 handles it.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import random
import shutil
import tempfile
from pathlib import Path

MODEL_NAME = "tiny-chat-v1"  # bump the suffix whenever the built files change
_SEED = 1234
_VOCAB_SIZE = 2048
_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string %}{{- message['content'] }}{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

_WORDS = (
    "the of and to in is it you that he was for on are with as his they be at one have "
    "this from or had by hot word but what some we can out other were all there when up "
    "use your how said an each she which do their time if will way about many then them "
    "write would like so these her long make thing see him two has look more day could go "
    "come did number sound no most people my over know water than call first who may down "
    "side been now find any new work part take get place made live where after back little "
    "only round man year came show every good me give our under name very through just form "
    "model token server batch engine request stream cluster node queue job slot allocation "
    "hello please thanks question answer help user assistant system code python compute"
).split()
_SYLLABLES = "ka lo mi ne ru sa te vo zi pa qu ex or an el is on ur ti ba de fo gu hi".split()


def default_cache_dir() -> Path:
    """``$HPCSERVE_CACHE`` or ``~/.cache/hpcserve``: shared by every hpcserve process."""
    env = os.environ.get("HPCSERVE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "hpcserve"


def ensure_tiny_model(cache_dir: str | Path | None = None) -> Path:
    """Return the tiny model's directory, building it once per cache dir.

    Safe under concurrency: builders serialise on a file lock and the finished
    directory appears by an atomic rename, so a reader never sees a half-built model
    and a second builder finds the first one's result.
    """
    models = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    models = models / "models"
    target = models / MODEL_NAME
    if target.is_dir():
        return target
    models.mkdir(parents=True, exist_ok=True)
    with open(models / f".{MODEL_NAME}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if target.is_dir():
                return target
            tmp = Path(tempfile.mkdtemp(prefix=f".{MODEL_NAME}.tmp-", dir=models))
            try:
                _build(tmp)
                _make_shareable(tmp)
                os.rename(tmp, target)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return target


def _corpus(rng: random.Random, lines: int = 6000) -> list[str]:
    """Pseudo-English plus ChatML-looking lines, so BPE learns useful merges."""
    out = []
    for _ in range(lines):
        words = []
        for _ in range(rng.randint(3, 14)):
            if rng.random() < 0.8:
                words.append(rng.choice(_WORDS))
            else:
                words.append("".join(rng.choices(_SYLLABLES, k=rng.randint(1, 3))))
        sentence = " ".join(words).capitalize() + rng.choice([".", "?", "!", ",", ":"])
        if rng.random() < 0.2:
            sentence += f" {rng.randint(0, 9999)}"
        if rng.random() < 0.2:
            role = rng.choice(["system", "user", "assistant"])
            sentence = f"<|im_start|>{role}\n{sentence}<|im_end|>"
        out.append(sentence)
    return out


def _build_tokenizer(rng: random.Random):
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=_VOCAB_SIZE,
        special_tokens=_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(rng), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
        chat_template=CHAT_TEMPLATE,
        model_max_length=2048,
        clean_up_tokenization_spaces=False,
    )


def _build(out: Path) -> None:
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM
    from transformers.utils import logging as hf_logging


    rng = random.Random(_SEED)
    tokenizer = _build_tokenizer(rng)
    tokenizer.save_pretrained(out)
    _portable_tokenizer_config(out / "tokenizer_config.json")

    pad_id = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    eos_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,  # head_dim 64: a size every CPU/GPU attention kernel has
        num_key_value_heads=2,
        max_position_embeddings=2048,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        bos_token_id=pad_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        use_sliding_window=False,
        # Wider than the usual 0.02: greedy output then varies instead of repeating one
        # token, which makes batching and stop-string tests meaningful.
        initializer_range=0.1,
    )
    torch.manual_seed(_SEED)
    model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    model.generation_config = GenerationConfig(
        bos_token_id=pad_id, eos_token_id=eos_id, pad_token_id=pad_id
    )
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a one-shard save needs no progress bar in logs
    try:
        model.save_pretrained(out, safe_serialization=True)
    finally:
        if bars:
            hf_logging.enable_progress_bar()


def _make_shareable(path: Path) -> None:
    """mkdtemp and safetensors create owner-only files; a shared cache must be readable."""
    path.chmod(0o755)
    for f in path.iterdir():
        f.chmod(0o644)


def _portable_tokenizer_config(path: Path) -> None:
    """Name the class transformers 4.x also knows (5.x writes ``TokenizersBackend``)."""
    cfg = json.loads(path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    path.write_text(json.dumps(cfg, indent=2))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Build (once) and print the tiny model's path.")
    parser.add_argument("--cache-dir", default=None, help="default: $HPCSERVE_CACHE or ~/.cache/hpcserve")
    args = parser.parse_args(argv)
    print(ensure_tiny_model(args.cache_dir))


if __name__ == "__main__":
    main()
