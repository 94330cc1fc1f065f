"""Processes hpcserve starts itself, and the ports they listen on.

Everything hpcserve starts (Ray nodes, engine processes, Triton servers, local
jobs) is stopped by the PID it recorded -- never by name -- so several services,
tests and users can share one machine.  These are the few primitives for that.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import time

from serve_app import port_claims


def pid_alive(pid: int | None) -> bool:
    """True while ``pid`` exists (a zombie child of ours is reaped and counts as gone)."""
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
        return done == 0
    except ChildProcessError:  # not our child: it exists
        return True


def terminate(process: subprocess.Popen, timeout: float = 10.0) -> int | None:
    """SIGTERM ``process``, SIGKILL it after ``timeout``; its exit code."""
    if process.poll() is None:
        try:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        except ProcessLookupError:
            pass
    return process.returncode


def stop_process_group(pgid: int, grace_s: float = 5.0) -> None:
    """SIGTERM the group led by ``pgid`` (started with its own session), then SIGKILL."""
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                return
            try:  # reap it if it is our child
                os.waitpid(pgid, os.WNOHANG)
            except ChildProcessError:
                pass
            time.sleep(0.2)


def session_members(sid: int) -> list[int]:
    """PIDs in session ``sid`` (a session we created with start_new_session).

    Some children leave their parent's process group (Serve's HAProxy does), but
    not the session, so a session sweep finds everything a start ever spawned.
    """
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] not in "ZX" and int(fields[3]) == sid:  # state, ..., session
            pids.append(int(entry))
    return pids


def stop_session(sid: int, grace_s: float = 5.0) -> None:
    """Stop the group led by ``sid``, then anything else left in its session."""
    stop_process_group(sid, grace_s)
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 2.0)):
        members = session_members(sid)
        if not members:
            return
        for pid in members:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and session_members(sid):
            time.sleep(0.2)


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


# Listeners bound a while after their port is chosen (HAProxy's ports at the first
# deploy, engines, test servers) must not come from the kernel's ephemeral range:
# in between, any outgoing connection (Ray opens many) may take the port as its
# source port and the later bind fails with "Address already in use".  Single ports
# therefore come from 31000-32767 and 61000-65535, outside Linux's default
# ephemeral range (32768-60999), Ray's defaults (Serve's direct-ingress ports are
# 30000-30999 in a stock Ray) and our port ranges (20000-29999).
_LISTENER_POOLS = (range(31000, 32768), range(61000, 65536))
_warned: list[bool] = []

def _ephemeral_range() -> range:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            lo, hi = map(int, f.read().split())
        return range(lo, hi + 1)
    except (OSError, ValueError):
        return range(32768, 61000)


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """``n`` distinct ports free right now, outside the ephemeral range.

    A port handed out is not handed out again by any hpcserve process of this user
    on this host while its claim holds (``port_claims``).  Falls back to the kernel's choice if
    the pools are exhausted or lie inside a widened ephemeral range.
    """
    ephemeral = _ephemeral_range()
    pool = [p for r in _LISTENER_POOLS for p in r if p not in ephemeral]
    if not pool and not _warned:
        _warned.append(True)
        import logging
        logging.getLogger("hpcserve").warning(
            "the kernel's ephemeral port range %s-%s covers hpcserve's listener ports: "
            "ports are the kernel's choice, which an outgoing connection may take before "
            "they are bound", ephemeral.start, ephemeral.stop - 1)
    rng = random.Random()
    ports: list[int] = []
    for _ in range(50 * n):
        if len(ports) == n or not pool:
            break
        p = rng.choice(pool)
        if p not in ports and port_free(p, host) and port_claims.claim(p):
            ports.append(p)
    while len(ports) < n:  # the kernel's choice: free now, but ephemeral
        with socket.socket() as s:
            s.bind((host, 0))
            if (p := s.getsockname()[1]) not in ports and port_claims.claim(p):
                ports.append(p)
    return ports


def free_port(host: str = "127.0.0.1") -> int:
    """A port free right now that outgoing connections will not take meanwhile."""
    return free_ports(1, host)[0]
