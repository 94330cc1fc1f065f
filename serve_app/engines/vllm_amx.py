"""A vLLM plugin: ask Linux for the AMX tile state before vLLM's CPU kernels use it.

vLLM's CPU attention picks its AMX kernel whenever the CPU reports AMX tiles
(``torch.cpu._is_amx_tile_supported``), but never asks the kernel for the tiles'
register state (``arch_prctl(ARCH_REQ_XCOMP_PERM)``): it relies on oneDNN having
done so on an earlier AMX matmul in the same process.  With a small model nothing
does, so on a Sapphire Rapids (or newer) node the EngineCore process dies with
SIGILL on its first request, silently, and the replica reports ``EngineDeadError``.

Registered under the entry point group ``vllm.general_plugins``
(``pyproject.toml``), which vLLM loads in every process it starts (EngineCore
included), so bare vLLM run from the same environment gets it too.
"""

from __future__ import annotations


def request_amx() -> None:
    import torch

    if torch.cpu._is_amx_tile_supported():
        torch.cpu._init_amx()  # idempotent: the permission is the process's
