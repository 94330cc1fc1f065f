"""Triton model repositories that ship with hpcserve.

``tiny_llm`` is the tiny local chat model (serve_app.tiny_model) as a decoupled
Python-backend model that follows the tensor convention of Triton's vLLM backend
(see tiny_llm/model.py).  It exists so ``TritonEngine`` can be tried and tested
against the real ``tritonserver`` binary on a laptop or CPU node, and as a worked
example of the layout Triton expects::

    REPO/tiny_llm/config.pbtxt
    REPO/tiny_llm/1/model.py

It ships in the package (not under tests/) because operators use it too: to check a
Triton install on a new cluster before pointing hpcserve at a real vLLM or
TensorRT-LLM repository.  ``python -m serve_app.triton_models.repository DEST`` writes it.
"""
