"""Host-wide claims on ports chosen now and bound later.

A chosen port is not bound yet, so it looks free to the next process that chooses:
``hpcserve up`` choosing the Ray head's ports while the test that started it holds
the HTTP port it wrote into the config, or two worker jobs starting on one node.
So every hpcserve process of a user records what it hands out in one directory on
the host, a file per port whose modification time is when the claim expires.

What this does not cover, and the bind check in ``processes.free_ports`` still
does: other users, a per-job private ``/tmp``, and claims that have expired.
Where the directory cannot be used safely (not ours, open to others, read-only),
claims fall back to this process only, with a warning.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import stat
import time

MAX_HOLD_S = 600.0  # longer than any wait between choosing a port and binding it
_DIR = f"/tmp/hpcserve-ports-{os.getuid()}"
_checked: dict[str, bool] = {}  # directory -> usable (checked, and pruned, once)
_local: dict[int, float] = {}  # port -> expiry, where the directory is not usable

log = logging.getLogger("hpcserve")


def _usable(directory: str) -> bool:
    if directory in _checked:
        return _checked[directory]
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        st = os.lstat(directory)  # a symlink or someone else's directory is refused
        ok = stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid() and not st.st_mode & 0o077
        if ok:
            with _locked(directory):
                _prune(directory)
    except OSError:
        ok = False
    if not ok:
        log.warning("%s is not a private directory of this user: ports chosen are claimed "
                    "for this process only", directory)
    _checked[directory] = ok
    return ok


@contextlib.contextmanager
def _locked(directory: str):
    fd = os.open(os.path.join(directory, ".lock"), os.O_CREAT | os.O_RDWR, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _expired(expires: float, now: float) -> bool:
    # a time further ahead than any hold was not written by claim(): ignore it
    return not now < expires <= now + MAX_HOLD_S


def _prune(directory: str) -> None:
    """Drop expired claims so the directory stays small (under the lock)."""
    now = time.time()
    with os.scandir(directory) as entries:
        for entry in entries:
            if entry.name.isdigit() and _expired(entry.stat().st_mtime, now):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)


def claim(port: int, hold_s: float = MAX_HOLD_S) -> bool:
    """Claim ``port`` for ``hold_s`` unless another claim on it holds; True if claimed."""
    now = time.time()
    if _usable(_DIR):
        path = os.path.join(_DIR, str(port))
        try:
            with _locked(_DIR):
                with contextlib.suppress(FileNotFoundError):
                    if not _expired(os.stat(path).st_mtime, now):
                        return False
                with open(path, "w"):
                    pass
                os.utime(path, (now + hold_s, now + hold_s))
                return True
        except OSError as err:  # disk full, directory removed: this process only
            log.warning("port claims in %s failed (%s): claimed for this process only",
                        _DIR, err)
            _checked[_DIR] = False
    if not _expired(_local.get(port, 0.0), now):
        return False
    _local[port] = now + hold_s
    return True


def release(port: int) -> None:
    """Give back a claim that will not be used."""
    _local.pop(port, None)
    with contextlib.suppress(OSError):
        os.unlink(os.path.join(_DIR, str(port)))
