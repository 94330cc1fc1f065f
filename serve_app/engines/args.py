"""The ``engine_args`` of the ZMQ and vLLM engines, as typed models.

Importable in the core install (no vLLM, no torch): ``hpcserve up``/``deploy`` check a
model's ``engine_args`` with these before anything starts, and the engine gets the
validated model.  Triton's is ``serve_app.engines.triton_requests.TritonEngineArgs``.

``task_errors(task)`` names arguments a task cannot do without (an embedding model
needs a model directory: the built-in tiny model is a chat model).
"""

from __future__ import annotations

import ast
import importlib.util
from functools import cache
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool


class ZmqEngineArgs(BaseModel):
    """hpcserve's own engine process (``serve_app.zmq_engine``)."""

    model_config = ConfigDict(extra="forbid")

    model_path: str | None = Field(None, description=(
        "a local Hugging Face model directory (default: the built-in tiny chat model). "
        "With `task: embed`, a sentence-transformers directory: its modules.json and "
        "1_Pooling/config.json choose the pooling"))
    address: str | None = Field(None, description=(
        "`tcp://HOST:PORT` of an engine something else started (e.g. the batch job); "
        "the replica starts none and leaves it alone"))
    max_batch: int = Field(32, ge=1, description=(
        "sequences decoded together (generate); inputs per forward pass (embed)"))
    max_model_len: int | None = Field(None, gt=0, description=(
        "caps the context (prompt + completion; an embedding input) below the model's "
        "own, for an engine the replica starts"))
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = Field(
        "float32", description="the weights' dtype in the engine process")
    threads: int | None = Field(None, ge=1, description="torch threads of the engine process")

    def task_errors(self, task: str) -> dict[str, str]:
        if task == "embed" and self.model_path is None and self.address is None:
            return {"model_path": "task 'embed' needs a model directory (an embedding "
                                  "model, e.g. a sentence-transformers one); the default "
                                  "is the tiny chat model"}
        return {}


class VLLMEngineArgs(BaseModel):
    """vLLM's ``AsyncEngineArgs`` (the api_server flags with ``_`` for ``-``), plus
    what the replica itself handles.  vLLM's own names pass through; where vLLM is
    installed the config check knows them too, so a misspelt one is named at deploy
    time (``engine_argument_names``), else the replica checks them when it starts."""

    model_config = ConfigDict(extra="allow")

    env: dict[str, str | int | float] = Field(default_factory=dict, description=(
        "environment variables set before vLLM starts (VLLM_CPU_KVCACHE_SPACE, ...)"))
    chat_template: str | None = Field(None, description="path or literal, as api_server's "
                                      "--chat-template")
    chat_template_content_format: str = Field("auto", description=(
        "as --chat-template-content-format"))
    default_chat_template_kwargs: dict | None = Field(None, description=(
        "as --default-chat-template-kwargs"))
    engine_metrics: StrictBool = Field(True, description=(
        "vLLM's vllm:* metrics through Ray to Prometheus"))

    @classmethod
    def serving_names(cls) -> set[str]:
        return set(cls.model_fields)

    @classmethod
    def engine_argument_names(cls) -> frozenset[str] | None:
        return vllm_engine_argument_names()

    def task_errors(self, task: str) -> dict[str, str]:
        if task == "embed" and not (self.model_extra or {}).get("model"):
            return {"model": "task 'embed' needs a model (an embedding model directory or "
                             "name); the default is the tiny chat model"}
        return {}


@cache
def vllm_engine_argument_names() -> frozenset[str] | None:
    """The fields of vLLM's ``AsyncEngineArgs``, read from its source without importing
    vLLM (which takes ~20 s and GBs of imports: too much for a config check).  None
    when vLLM is not installed here or its source is not in the expected shape; the
    replica then checks against the real dataclass (tests compare both)."""
    try:
        spec = importlib.util.find_spec("vllm.engine.arg_utils")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.origin:
        return None
    try:
        with open(spec.origin, encoding="utf-8") as f:
            tree = ast.parse(f.read())
    except (OSError, SyntaxError):
        return None
    names = set()
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name in ("EngineArgs", "AsyncEngineArgs"):
            for stmt in node.body:
                if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)
                        and "ClassVar" not in ast.unparse(stmt.annotation)):
                    names.add(stmt.target.id)
    return frozenset(names) if "model" in names else None
