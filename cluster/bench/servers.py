"""The two servers ``scripts/bench-compare`` sets side by side, started and stopped by PID.

Bare vLLM (``python -m vllm.entrypoints.openai.api_server`` in a process group of
its own) and hpcserve (``hpcserve up --home TMP`` ... ``hpcserve down --home TMP``,
then whatever of its sessions is still alive, by PID), with the same model,
context, KV cache and engine environment.  Nothing is stopped by name, and ``ray
stop`` is never run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import yaml

from cluster.ports import free_port

REPO = Path(__file__).resolve().parents[2]
HPCSERVE = ([str(REPO / ".venv" / "bin" / "hpcserve")] if (REPO / ".venv" / "bin" / "hpcserve").exists()
            else [sys.executable, "-m", "cluster.cli"])
MAX_MODEL_LEN = 1024
KV_CACHE_BYTES = 64 * 1024 * 1024
T0 = time.monotonic()  # the run's start, for the log's timestamps


def log(msg: str) -> None:
    print(f"[bench-compare {time.monotonic() - T0:6.1f}s] {msg}", flush=True)


def loadavg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def vllm_env(cache_root: Path, small_node: bool = True) -> dict[str, str]:
    """Both sides' engine environment: by default the tiny model's small-node one
    (in-process executor, one OpenMP thread), as hpcserve gives the tiny model;
    ``small_node=False`` leaves vLLM's spinning multiprocess executor."""
    from serve_app.engines.vllm import SMALL_NODE_ENV

    return {"HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "VLLM_CACHE_ROOT": str(cache_root),
            **(SMALL_NODE_ENV if small_node else {})}


def shm_users() -> set[str]:
    """/dev/shm paths some live process still has open or mapped."""
    used: set[str] = set()
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                try:
                    used.add(os.readlink(f"/proc/{pid}/fd/{fd}"))
                except OSError:
                    pass
            with open(f"/proc/{pid}/maps") as maps:
                used.update(line.split(None, 5)[-1].strip() for line in maps if "/dev/shm/" in line)
        except OSError:
            continue
    return {u.removesuffix(" (deleted)") for u in used}


class BareVLLM:
    """`python -m vllm.entrypoints.openai.api_server` in its own process group."""

    def __init__(self, model_dir: Path, workdir: Path, engine_args: dict[str, str],
                 small_node: bool = True) -> None:
        self.model_dir, self.workdir, self.engine_args = model_dir, workdir, engine_args
        self.small_node = small_node
        self.process: subprocess.Popen | None = None
        self.port = 0
        self.log = workdir / "bare-vllm.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> None:
        self.port = free_port()
        self.log = self.workdir / f"bare-vllm-{self.port}.log"
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server",
               "--model", str(self.model_dir), "--served-model-name", "tiny",
               "--host", "127.0.0.1", "--port", str(self.port), "--enforce-eager",
               "--max-model-len", str(MAX_MODEL_LEN),
               "--kv-cache-memory-bytes", str(KV_CACHE_BYTES), "--disable-log-stats"]
        for key, value in self.engine_args.items():
            cmd += [f"--{key.replace('_', '-')}", value]
        env = {**os.environ, **vllm_env(self.workdir / "vllm-cache-bare", self.small_node)}
        with open(self.log, "wb") as out:
            self.process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env,
                                            start_new_session=True, cwd=self.workdir)
        log(f"bare vLLM starting: pid {self.process.pid}, port {self.port}, log {self.log}")

    def wait_ready(self, timeout: float = 240) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return False
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=2).status_code == 200:
                    return True
            except httpx.HTTPError:
                pass
            time.sleep(1)
        return False

    def stop(self) -> None:
        """SIGTERM its process group (the server and its EngineCore), then SIGKILL."""
        p = self.process
        if p is None:
            return
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGTERM)
                p.wait(timeout=30)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
        try:
            os.killpg(p.pid, signal.SIGKILL)  # children that outlived it
        except ProcessLookupError:
            pass
        p.wait()
        log(f"bare vLLM (process group {p.pid}) stopped")
        self.process = None


class Hpcserve:
    """`hpcserve up --home TMP -c CONFIG` ... `hpcserve down --home TMP`."""

    def __init__(self, home: Path, config: dict, env: dict[str, str]) -> None:
        self.home, self.config, self.env = home, config, env
        self.port = config["http_options"]["port"]
        self.started = False

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def up(self, timeout: float = 600) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        cfg_path = self.home / "config.yaml"
        cfg_path.write_text(yaml.safe_dump(self.config, sort_keys=False))
        cmd = [*HPCSERVE, "up", "--home", str(self.home), "-c", str(cfg_path), "--timeout", str(timeout)]
        log("$ " + " ".join(cmd))
        self.started = True  # from here on `down` is due, whatever `up` got to
        run_streamed(cmd, self.env, prefix="  up| ", timeout=timeout + 120)

    def down(self) -> None:
        if not self.started:
            return
        self.started = False
        sessions = self._sessions()
        cmd = [*HPCSERVE, "down", "--home", str(self.home)]
        log("$ " + " ".join(cmd))
        try:
            run_streamed(cmd, self.env, prefix="  down| ", timeout=240, check=False)
        except Exception as exc:  # noqa: BLE001 -- report, go on cleaning up
            log(f"hpcserve down failed: {exc}")
        self._stop_leftovers(sessions)

    def _sessions(self) -> set[int]:
        """Session ids of what `up` started: the Ray head's and each job's (all are
        started with their own session), read before `down` removes the records."""
        sids: set[int] = set()
        for f in [self.home / "run" / "head.json", *self.home.rglob("*.pid")]:
            try:
                text = f.read_text().strip()
                sids.add(int(json.loads(text)["pid"]) if f.suffix == ".json" else int(text))
            except (OSError, ValueError, KeyError):
                pass
        return sids

    def _stop_leftovers(self, sessions: set[int]) -> None:
        """Processes of those sessions still alive after `hpcserve down` (seen: the Serve
        HAProxy, which runs in its own process group): report them, stop them by PID."""
        def alive_in_sessions() -> list[int]:
            found = []
            for pid in os.listdir("/proc"):
                if pid.isdigit() and int(pid) != os.getpid():
                    try:
                        if os.getsid(int(pid)) in sessions and \
                                Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z":
                            found.append(int(pid))
                    except OSError:
                        pass
            return found

        deadline = time.monotonic() + 10  # Ray workers exit on their own shortly after `down`
        while (left := alive_in_sessions()) and time.monotonic() < deadline:
            time.sleep(0.5)
        if not left:
            return
        names = {pid: Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
                 for pid in left if Path(f"/proc/{pid}/cmdline").exists()}
        log(f"hpcserve down left {len(left)} process(es) running: "
            + ", ".join(f"{pid} {os.path.basename(n)}" for pid, n in names.items()) + "; stopping them")
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in left:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and set(alive_in_sessions()) & set(left):
                time.sleep(0.2)


def run_streamed(cmd: list[str], env: dict[str, str], prefix: str, timeout: float,
                 check: bool = True, heartbeat: str | None = None) -> int:
    """Run `cmd`, echoing its output line by line with `prefix` (or straight to the
    terminal with `prefix=None`); every 30 s, log `heartbeat` if one is given."""
    proc = subprocess.Popen(cmd, stdout=None if prefix is None else subprocess.PIPE,
                            stderr=None if prefix is None else subprocess.STDOUT, env=env,
                            cwd=REPO, text=True, bufsize=1)
    killer = threading.Timer(timeout, proc.kill)
    killer.start()
    done = threading.Event()
    t0 = time.monotonic()

    def beat() -> None:
        while not done.wait(30):
            log(f"{heartbeat}: {time.monotonic() - t0:.0f}s, load average {loadavg()}")

    if heartbeat:
        threading.Thread(target=beat, daemon=True).start()
    try:
        if proc.stdout is not None:
            for line in proc.stdout:
                print(prefix + line.rstrip("\n"), flush=True)
        rc = proc.wait()
    except BaseException:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=60)  # let `hpcserve up/bench` finish its own cleanup
            except subprocess.TimeoutExpired:
                proc.kill()
        raise
    finally:
        done.set()
        killer.cancel()
    if check and rc != 0:
        raise RuntimeError(f"{' '.join(cmd[:3])} ... exited with {rc}")
    return rc


def cleanup_shm(before: set[Path]) -> int:
    """Remove the ``/dev/shm/psm_*`` files vLLM left behind since ``before`` that no
    live process holds any more (only ours: the others existed before); how many."""
    leftovers = set(Path("/dev/shm").glob("psm_*")) - before
    if not leftovers:
        return 0
    in_use = shm_users()
    gone = [p for p in leftovers if str(p) not in in_use]
    for p in gone:
        p.unlink(missing_ok=True)
    return len(gone)
