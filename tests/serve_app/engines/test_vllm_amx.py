"""vLLM loads hpcserve's AMX plugin in its processes, and a process that loaded it
may use AMX tiles (without it, vLLM's CPU attention dies with SIGILL on the first
request of an AMX machine: serve_app/engines/vllm_amx.py)."""

import platform
import subprocess
import sys
from importlib.metadata import entry_points

import pytest

XTILEDATA = 1 << 18  # the AMX tile data bit of the xsave feature mask

# A fresh process, as vLLM's EngineCore is: vLLM's own plugin loader, then the
# kernel's answer to "which xsave features may this process use".
PROBE = """
import ctypes, torch
from vllm.plugins import load_general_plugins
load_general_plugins()
mask = ctypes.c_ulong(0)
ctypes.CDLL(None, use_errno=True).syscall(158, 0x1022, ctypes.byref(mask))  # arch_prctl(ARCH_GET_XCOMP_PERM)
print(int(torch.cpu._is_amx_tile_supported()), mask.value)
"""


def test_the_plugin_is_registered_for_vllm():
    plugins = {ep.name: ep.value for ep in entry_points(group="vllm.general_plugins")}
    assert plugins.get("hpcserve_amx") == "serve_app.engines.vllm_amx:request_amx"


@pytest.mark.skipif(platform.machine() != "x86_64" or sys.platform != "linux",
                    reason="AMX and arch_prctl are x86-64 Linux")
def test_a_process_that_loads_vllm_plugins_may_use_amx_where_the_cpu_has_it():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                         timeout=300, check=True).stdout.split()
    has_amx, mask = int(out[-2]), int(out[-1])
    assert bool(mask & XTILEDATA) == bool(has_amx), (has_amx, hex(mask))
