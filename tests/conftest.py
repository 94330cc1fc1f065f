"""Session fixtures shared by the end-to-end tests.

``hpcserve_stack`` runs the real thing: ``hpcserve up`` with a config in a temp
home (its own ports, Ray temp dir, token), and ``hpcserve down`` afterwards, which
stops exactly what ``up`` started.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cluster.head import HeadInfo
from cluster.ports import free_port

HPCSERVE = [sys.executable, "-m", "cluster.cli"]
ROOT = Path(__file__).resolve().parents[1]


def default_config(models: list[dict] | None = None, pool: dict | None = None,
                   args: dict | None = None) -> dict:
    """Our config format with the local provider; override what a test needs."""
    return {
        "hpcserve": {"pools": [{"name": "local", "provider": "local", "min_allocations": 1,
                                "walltime_s": 3600, **(pool or {})}]},
        "proxy_location": "HeadOnly",
        "http_options": {"host": "127.0.0.1", "port": 0},
        "logging_config": {"enable_access_log": False},
        "applications": [{
            "name": "hpcserve", "route_prefix": "/", "import_path": "serve_app.app:build_app",
            "args": {"models": models or [{"name": "tiny", "engine": "zmq",
                                           "max_model_len": 2048}], **(args or {})}}],
    }


def non_loopback_address() -> str | None:
    """An IPv4 address of this machine that other hosts could reach, if it has one."""
    import socket

    import psutil
    for addrs in psutil.net_if_addrs().values():
        for a in addrs:
            if a.family == socket.AF_INET and not a.address.startswith("127."):
                return a.address
    return None


class Stack:
    def __init__(self, home: Path, config: dict, env: dict[str, str]):
        self.home, self.config, self.env = home, config, env
        self.port = config["http_options"]["port"]
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        keys = config["applications"][0]["args"].get("api_keys") or []
        self.api_key = keys[0] if keys else "none"
        self.up_output = ""
        self._down = False

    @property
    def head(self) -> HeadInfo:
        return HeadInfo.load(self.home / "run")

    def cli(self, *args: str, timeout: float = 120, check: bool = True):
        proc = subprocess.run([*HPCSERVE, *args, "--home", str(self.home)], env=self.env,
                              cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"hpcserve {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
        return proc

    def client(self, **kwargs):
        import openai
        return openai.OpenAI(base_url=self.base_url, api_key=self.api_key, max_retries=0,
                             timeout=kwargs.pop("timeout", 120), **kwargs)

    def down(self) -> None:
        if not self._down:
            self._down = True
            self.cli("down", timeout=180, check=False)


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory) -> str:
    cache = os.environ.get("HPCSERVE_CACHE") or str(tmp_path_factory.mktemp("hpcserve-cache"))
    os.environ["HPCSERVE_CACHE"] = cache  # engine tests in this process share the model
    return cache


@pytest.fixture(scope="session")
def hpcserve_stack(tmp_path_factory, model_cache):
    """Factory: ``hpcserve_stack(config | models=, pool=, args=, name=) -> Stack``."""
    stacks: list[Stack] = []

    def start(config: dict | str | None = None, name: str = "stack", timeout: float = 600,
              **overrides) -> Stack:
        """``config``: our YAML text or dict; else ``default_config(**overrides)``."""
        if isinstance(config, str):
            cfg = yaml.safe_load(config)
        else:
            cfg = config or default_config(**overrides)
        cfg.setdefault("http_options", {})["port"] = free_port()
        cfg["http_options"].setdefault("host", "127.0.0.1")
        home = tmp_path_factory.mktemp(name)
        (home / "config.yaml").write_text(yaml.safe_dump(cfg))
        env = {**os.environ, "HPCSERVE_CACHE": model_cache, "PYTHONUNBUFFERED": "1"}
        stack = Stack(home, cfg, env)
        stacks.append(stack)
        proc = stack.cli("up", "-c", str(home / "config.yaml"), "--timeout", str(timeout),
                         timeout=timeout + 120, check=False)
        stack.up_output = proc.stdout + proc.stderr
        if proc.returncode != 0:
            stack.down()
            raise AssertionError(f"hpcserve up failed:\n{stack.up_output}")
        return stack

    yield start
    for stack in stacks:
        stack.down()
