"""One HEAppE API session: session codes, timeouts, and HEAppE's errors as ours.

Kept apart from the provider so ``heappe.py`` reads as what it does with jobs,
and this as how it talks to HEAppE:

- Session codes expire (HEAppE: 401 "Session Code Authentication Problem"):
  a call re-authenticates once and retries.
- Each HTTP call has (connect, read) timeouts and at most one reconnect: a down
  or hung HEAppE is a ProviderError within seconds, never a stuck loop.
- Credentials from env or file are re-read at each authentication, so an
  external refresher can rotate them.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import pydantic
import urllib3
from py4heappe.heappe_v6 import core as hp
from py4heappe.heappe_v6.core import exceptions as hpx

from cluster.providers.base import ProviderError

if TYPE_CHECKING:
    from cluster.providers.heappe import HeappeConfig

T = TypeVar("T")


class HeappeRejected(ProviderError):
    """HEAppE refused the request itself (ids, limits, template): retrying cannot help."""
    retryable = False


class HeappeAuthError(HeappeRejected):
    """HEAppE refused our credentials (not merely an expired session code)."""


class HeappeNotFound(HeappeRejected):
    """HEAppE does not know the job (or task) id."""


class _SessionExpired(Exception):
    pass


class HeappeSession:
    """JobManagement calls with a valid session code, thread-safe."""

    def __init__(self, config: HeappeConfig) -> None:
        self.config = c = config
        conf = hp.Configuration(host=c.base_url.rstrip("/"))
        conf.verify_ssl = c.verify_ssl
        conf.ssl_ca_cert = c.ssl_ca_cert
        # One immediate reconnect; never re-send a request that reached the server.
        conf.retries = urllib3.Retry(total=1, connect=1, read=0, status=0, redirect=0, other=0)
        self._client = hp.ApiClient(conf)
        self._jobs = hp.JobManagementApi(self._client)
        self._users = hp.UserAndLimitationManagementApi(self._client)
        self._timeout = (float(c.connect_timeout_s), float(c.request_timeout_s))
        self._lock = threading.Lock()
        self._session: str | None = None
        self.authentications = 0       # how many session codes we obtained (observability)

    def jm(self, op: str, model: Callable[..., Any] | None = None, **values: Any) -> Any:
        """One JobManagement call: the session code goes into the body model or the query."""
        method = getattr(self._jobs, f"heappe_job_management_{op}")
        what = "".join(w.title() for w in op.split("_")[:-1])
        if model is None:
            return self._call(what, lambda s: method(session_code=s, **values,
                                                     _request_timeout=self._timeout))
        return self._call(what, lambda s: method(model(session_code=s, **values),
                                                 _request_timeout=self._timeout))

    def _call(self, what: str, fn: Callable[[str], T]) -> T:
        """Run one API call with a session code; re-authenticate once if it expired."""
        session = self._session or self._authenticate(stale=None)
        try:
            return self._guard(what, lambda: fn(session))
        except _SessionExpired:
            session = self._authenticate(stale=session)
        try:
            return self._guard(what, lambda: fn(session))
        except _SessionExpired as exc:
            raise HeappeAuthError(f"{what}: HEAppE refused a fresh session code: {exc}") from exc

    def _authenticate(self, stale: str | None) -> str:
        with self._lock:
            if self._session is not None and self._session != stale:
                return self._session      # another thread renewed it meanwhile
            c = self.config
            if c.username and (c.password is not None or c.password_env):
                what, model = "AuthenticateUserPassword", hp.AuthenticateUserPasswordModel(
                    credentials=hp.PasswordCredentialsExt(username=c.username, password=self._secret(
                        c.password, c.password_env, None)))
            else:
                kind = "LexisToken" if c.token_kind == "lexis" else "UserOpenId"
                creds = (hp.LexisCredentialsExt if kind == "LexisToken" else hp.OpenIdCredentialsExt)(
                    username=c.username, open_id_access_token=self._secret(
                        c.access_token, c.access_token_env, c.access_token_file))
                what = f"Authenticate{kind}"
                model = getattr(hp, f"Authenticate{kind}Model")(credentials=creds)
            snake = re.sub(r"(?<!^)(?=[A-Z])", "_", what).lower()
            method = getattr(self._users, f"heappe_user_and_limitation_management_{snake}_post")
            try:
                code = self._guard(what, lambda: method(model, _request_timeout=self._timeout))
            except (_SessionExpired, HeappeNotFound) as exc:
                raise HeappeAuthError(f"HEAppE at {c.base_url} refused our credentials: {exc}") from exc
            if not isinstance(code, str) or not code.strip():
                raise ProviderError(f"{what} returned no session code: {code!r}")
            self._session = code.strip()
            self.authentications += 1
            return self._session

    @staticmethod
    def _secret(value: str | None, env: str | None, path: str | None) -> str:
        """Read at each authentication, so an external refresher can rotate it."""
        if path:
            try:
                return Path(os.path.expanduser(path)).read_text().strip()
            except OSError as exc:
                raise HeappeAuthError(f"heappe credential file unreadable: {exc}") from exc
        if value is not None:
            return value
        if env and env in os.environ:
            return os.environ[env]
        raise HeappeAuthError(f"heappe credential variable {env!r} is not set on the head")

    def _guard(self, what: str, call: Callable[[], T]) -> T:
        """Map every failure of one HTTP call to our error types."""
        base = self.config.base_url
        try:
            return call()
        except hpx.ApiException as exc:
            status, body = exc.status or 0, (exc.body or exc.reason or "").strip()
            brief = f"{what}: HEAppE answered {status}: {body[:300]}"
            if status == 401 or (status in (400, 403) and "session" in body.lower()):
                raise _SessionExpired(brief) from exc
            if status == 404:
                raise HeappeNotFound(brief) from exc
            if status == 0 or status == 429 or status >= 500:
                raise ProviderError(brief) from exc
            raise HeappeRejected(brief) from exc
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise ProviderError(f"{what}: HEAppE at {base} unreachable: {exc}") from exc
        except (pydantic.ValidationError, ValueError, TypeError) as exc:
            raise ProviderError(f"{what}: unexpected answer from HEAppE at {base}: {exc}") from exc
