"""Start a ``tritonserver`` on this node, and make sure it goes away with its owner.

Used by ``TritonEngine`` when a replica owns its server.  Everything here is about
what bites on an HPC node (FIELD-NOTES, "Triton Inference Server on CPU"):

* The binary inside nvidia-pytriton ships its backends without the Python-backend
  stub; a backend directory of symlinks (libtriton_python.so, the utils module and
  the stub for this Python version) makes it complete without copying 20 MB.
* The stub embeds libpython: ``LD_LIBRARY_PATH`` must lead to *this* Python's LIBDIR
  (else it loads the system's and dies), and the stub takes its ``sys.path`` from
  the first ``python3`` on ``PATH`` (``python_env``).  The 2.51 stub is built
  against numpy 1: with numpy 2 it corrupts every BYTES input (text_input), so
  ``python_env`` must point to an env with numpy<2 (docs/triton.md shows how).
* A busy port shows up only as a confusing error from another server, so ports are
  checked before the start.
* The Python backend puts shared memory in /dev/shm under a prefix we choose, so
  exactly our segments are removed afterwards.
* A replica can be SIGKILLed (node drain, OOM): a tiny watchdog process stops the
  server by PID when the replica's PID is gone, and cleans up after it.
"""

from __future__ import annotations

import glob
import logging
import os
import secrets
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.request
from pathlib import Path

from serve_app.processes import free_port, port_free, terminate

log = logging.getLogger("hpcserve.triton")

# Runs under ``python -S``: stdlib only, starts in milliseconds.
_WATCHDOG = r"""
import glob, os, signal, sys, time
owner, server, prefix = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in "ZX"
    except OSError:
        return False
while alive(owner) and alive(server):
    time.sleep(1.0)
if alive(server):
    os.kill(server, signal.SIGTERM)
    deadline = time.monotonic() + 15
    while alive(server) and time.monotonic() < deadline:
        time.sleep(0.2)
    if alive(server):
        os.kill(server, signal.SIGKILL)
    time.sleep(0.5)
try:  # the server's backend stubs (its process group) outlive a server that died hard
    os.killpg(server, signal.SIGKILL)
except OSError:
    pass
for path in glob.glob("/dev/shm/" + glob.escape(prefix) + "*"):
    try:
        os.unlink(path)
    except OSError:
        pass
"""


def pytriton_dir() -> Path | None:
    """The Triton distribution inside nvidia-pytriton, if installed."""
    try:
        import pytriton
    except ImportError:
        return None
    return Path(pytriton.__file__).parent / "tritonserver"


def default_binary() -> str:
    dist = pytriton_dir()
    if dist is None:
        found = shutil.which("tritonserver")
        if found is None:
            raise FileNotFoundError("no tritonserver: install hpcserve[triton] (nvidia-pytriton) "
                                    "or set engine_args.binary")
        return found
    return str(dist / "bin" / "tritonserver")


def pytriton_backends(dest: Path) -> Path:
    """A backend directory for the pytriton binary, completed with this Python's stub."""
    dist = pytriton_dir()
    assert dist is not None
    python = dest / "python"
    python.mkdir(parents=True, exist_ok=True)
    for item in (dist / "backends" / "python").iterdir():
        if item.name != "__pycache__":
            (python / item.name).symlink_to(item)
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    (python / "triton_python_backend_stub").symlink_to(
        dist / "python_backend_stubs" / version / "triton_python_backend_stub")
    return dest


class TritonServerProcess:
    """A tritonserver this process started; ``stop`` ends exactly that PID."""

    def __init__(self, process: subprocess.Popen, run_dir: Path, shm_prefix: str,
                 http_url: str, grpc_url: str, watchdog: subprocess.Popen | None):
        self.process = process
        self.run_dir = run_dir
        self.shm_prefix = shm_prefix
        self.http_url = http_url
        self.grpc_url = grpc_url
        self.watchdog = watchdog
        self.stopped = False

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def log_path(self) -> Path:
        return self.run_dir / "tritonserver.log"

    @classmethod
    def spawn(cls, model_repository: str | Path, *, binary: str | None = None,
              host: str = "127.0.0.1", http_port: int | None = None,
              grpc_port: int | None = None, metrics_port: int | None = None,
              backend_directory: str | None = None, python_env: str | None = None,
              extra_args: list[str] | tuple[str, ...] = (), env: dict[str, str] | None = None,
              run_dir: Path | None = None, startup_timeout: float = 300.0) -> TritonServerProcess:
        """Start the server in its own session and wait until it (and its models) are ready."""
        run_dir = Path(run_dir or tempfile.mkdtemp(prefix="hpcserve-triton-"))
        binary = binary or default_binary()
        http_port = http_port or free_port(host)
        grpc_port = grpc_port or free_port(host)
        for name, port in (("http_port", http_port), ("grpc_port", grpc_port),
                           ("metrics_port", metrics_port)):
            if port is not None and not port_free(port, host):
                raise RuntimeError(f"{name} {port} on {host} is already in use")
        if backend_directory is None and pytriton_dir() is not None \
                and Path(binary).resolve() == Path(default_binary()).resolve():
            backend_directory = str(pytriton_backends(run_dir / "backends"))
        shm_prefix = f"hpcserve-triton-{os.getpid()}-{secrets.token_hex(3)}-"
        cmd = [binary, "--model-repository", str(model_repository),
               "--http-address", host, "--http-port", str(http_port),
               "--grpc-address", host, "--grpc-port", str(grpc_port),
               "--exit-timeout-secs", "5",
               "--backend-config", f"python,shm-region-prefix-name={shm_prefix}"]
        if metrics_port:
            cmd += ["--metrics-address", host, "--metrics-port", str(metrics_port)]
        else:
            cmd += ["--allow-metrics", "false"]
        if backend_directory:
            cmd += ["--backend-directory", backend_directory]
        cmd += list(extra_args)
        process = subprocess.Popen(cmd, env=_server_env(python_env, env), cwd=run_dir,
                                   stdin=subprocess.DEVNULL, start_new_session=True,
                                   stdout=open(run_dir / "tritonserver.log", "wb"),
                                   stderr=subprocess.STDOUT)
        watchdog = subprocess.Popen(
            [sys.executable, "-S", "-c", _WATCHDOG, str(os.getpid()), str(process.pid),
             shm_prefix], stdin=subprocess.DEVNULL, start_new_session=True)
        server = cls(process, run_dir, shm_prefix, f"{host}:{http_port}", f"{host}:{grpc_port}",
                     watchdog)
        log.info("started tritonserver pid %d (http %s, grpc %s, log %s)", process.pid,
                 server.http_url, server.grpc_url, server.log_path)
        try:
            server.wait_ready(startup_timeout)
        except BaseException:
            server.stop()
            raise
        return server

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"tritonserver exited with {self.process.returncode} during "
                                   f"start-up:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"http://{self.http_url}/v2/health/ready",
                                            timeout=2) as reply:
                    if reply.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.25)
        raise TimeoutError(f"tritonserver not ready after {timeout:g}s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM, SIGKILL after ``timeout``, then remove our /dev/shm segments and files."""
        if self.stopped:  # atexit and __del__ may both call it, late in shutdown
            return self.process.returncode
        self.stopped = True
        terminate(self.process, timeout)
        if self.watchdog is not None:  # it sees the server gone, cleans up and exits
            try:
                self.watchdog.wait(5)
            except subprocess.TimeoutExpired:
                self.watchdog.kill()
                self.watchdog.wait()
        for path in glob.glob("/dev/shm/" + glob.escape(self.shm_prefix) + "*"):
            try:
                os.unlink(path)
            except OSError:
                pass
        shutil.rmtree(self.run_dir, ignore_errors=True)
        return self.process.returncode


def _server_env(python_env: str | None, extra: dict[str, str] | None) -> dict[str, str]:
    """The stub's libpython and ``sys.path`` come from LD_LIBRARY_PATH and PATH."""
    env = dict(os.environ)
    prefix = Path(python_env or sys.prefix)
    libs = [sysconfig.get_config_var("LIBDIR")]
    dist = pytriton_dir()
    if dist is not None:
        libs.append(str(dist.parent.parent / "nvidia_pytriton.libs"))
    if env.get("LD_LIBRARY_PATH"):
        libs.append(env["LD_LIBRARY_PATH"])
    env["LD_LIBRARY_PATH"] = ":".join(libs)
    env["PATH"] = f"{prefix / 'bin'}:{env.get('PATH', '/usr/bin:/bin')}"
    env.pop("PYTHONPATH", None)  # the stub ignores it; don't let it mislead
    env.update(extra or {})
    return env
