"""What every engine does with an ``EmbedRequest``'s inputs before it embeds them,
so that the ZMQ and vLLM engines tokenize alike and refuse the same inputs with the
same 400s (an input over the context is ``context_length_exceeded``, as in chat).
"""

from __future__ import annotations

from typing import Any

from serve_app.protocol import EngineError


def token_ids(tokenizer: Any, inputs: list[str | list[int]]) -> list[list[int]]:
    """Texts tokenized with the model's special tokens (as sentence-transformers and
    vLLM do), in one batched call; token-id inputs as they are."""
    texts = [i for i, item in enumerate(inputs) if isinstance(item, str)]
    encoded = tokenizer([inputs[i] for i in texts])["input_ids"] if texts else []
    by_index = dict(zip(texts, encoded))
    return [list(by_index.get(i, item)) for i, item in enumerate(inputs)]


def check_inputs(inputs: list[list[int]], max_model_len: int, vocab_size: int) -> None:
    """EngineError (400, ``param: input``) for the first input that cannot be embedded."""
    for index, ids in enumerate(inputs):
        where = f"input[{index}]" if len(inputs) > 1 else "the input"
        if not ids:
            raise EngineError(f"{where} is empty.", param="input", code="invalid_value")
        if len(ids) > max_model_len:
            raise EngineError(
                f"This model's maximum context length is {max_model_len} tokens. However, "
                f"you requested {len(ids)} tokens in {where}. Please reduce the length of "
                f"the input.", param="input", code="context_length_exceeded")
        bad = next((t for t in ids if not 0 <= t < vocab_size), None)
        if bad is not None:
            raise EngineError(f"Token id {bad} in {where} is out of vocabulary "
                              f"[0, {vocab_size}).", param="input", code="invalid_value")


def check_dimensions(dimensions: int | None, size: int, matryoshka: bool,
                     allowed: list[int] | None = None) -> None:
    """``dimensions`` shortens the vectors of a Matryoshka model only (vLLM's rule)."""
    if dimensions is None:
        return
    if not matryoshka:
        raise EngineError(f"This model does not support 'dimensions': it is not a Matryoshka "
                          f"model (its embeddings have {size} dimensions).",
                          param="dimensions", code="unsupported_parameter")
    if not 1 <= dimensions <= size or (allowed and dimensions not in allowed):
        choices = allowed or f"1 to {size}"
        raise EngineError(f"'dimensions' must be one of {choices}, got {dimensions}.",
                          param="dimensions", code="invalid_value")
