"""Bearer tokens that are JWTs from the centre's OIDC issuer (Keycloak, Globus Auth).

``verify()`` runs on the request path, so it only reads keys already in memory: the
issuer's JWKS is loaded and refreshed by ``run()`` in the background (the fetch in a
thread, with a timeout).  A JWKS that cannot be fetched keeps the keys we have and is
reported through ``last_error``; a token signed with a key we do not know yet (the
issuer rotated) is refused at once and wakes the refresher early, at most once per
``min_refresh_interval_s`` so that made-up ``kid``s cannot make us hammer the issuer.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import time
import urllib.request
from pathlib import Path
from typing import Any

import jwt

from serve_app.access.config import OIDCConfig

FETCH_TIMEOUT_S = 10.0
RETRY_S = 30.0                # after a failed load, retry sooner than jwks_refresh_s
MAX_JWKS_BYTES = 1 << 20
MAX_TOKEN_CHARS = 16384       # parsing is cheap, but not for megabyte headers

# PyJWT's exceptions (most specific first) -> what the client is told.
_MESSAGES: list[tuple[type[Exception], str]] = [
    (jwt.ExpiredSignatureError, "The token has expired."),
    (jwt.ImmatureSignatureError, "The token is not yet valid."),
    (jwt.InvalidSignatureError, "The token's signature is invalid."),
    (jwt.InvalidIssuerError, "The token's issuer is not accepted."),
    (jwt.InvalidAudienceError, "The token's audience is not accepted."),
    (jwt.InvalidAlgorithmError, "The token's algorithm is not accepted."),
    (jwt.DecodeError, "The token is malformed."),
]


class TokenError(Exception):
    """A refused token; ``str()`` says which check failed and is safe to send back."""


def _b64json(segment: str) -> Any:
    return json.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))


def looks_like_jwt(token: str) -> bool:
    """Whether a bearer credential is a JWT (rather than an API key), cheaply: three
    base64url segments whose first decodes to a JSON header naming an ``alg``.  An
    unsigned token (empty third segment) counts, so that it is refused as a token."""
    parts = token.split(".")
    if len(parts) != 3 or not parts[0] or not parts[1] or len(token) > MAX_TOKEN_CHARS:
        return False
    try:
        header = _b64json(parts[0])
    except (ValueError, binascii.Error):
        return False
    return isinstance(header, dict) and "alg" in header


class OIDCVerifier:
    """Checks tokens against one issuer's keys and tells who and which project."""

    def __init__(self, cfg: OIDCConfig, projects: set[str] | frozenset[str] = frozenset(),
                 *, min_refresh_interval_s: float = 10.0) -> None:
        self.cfg = cfg
        self.projects = frozenset(projects)
        self.min_refresh_interval_s = min_refresh_interval_s
        self.last_error: str | None = None   # the last load's failure, None once it works
        self.last_refresh: float = 0.0       # time.time() of the last successful load
        # kid -> (public key, the JWK's declared "alg" or None); replaced whole, never mutated
        self._keys: dict[str | None, tuple[Any, str | None]] = {}
        self._last_attempt = float("-inf")   # time.monotonic() of the last load attempt
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None

    # ---- keys: loaded off the request path -------------------------------------------

    @property
    def key_ids(self) -> list[str | None]:
        return list(self._keys)

    def _read_jwks(self) -> dict[str | None, tuple[Any, str | None]]:
        if self.cfg.jwks_file is not None:
            with open(Path(self.cfg.jwks_file).expanduser(), "rb") as f:
                raw = f.read(MAX_JWKS_BYTES + 1)
        else:
            req = urllib.request.Request(self.cfg.jwks_url, headers={"Accept": "application/json"})
            with urllib.request.urlopen(req, timeout=FETCH_TIMEOUT_S) as resp:
                raw = resp.read(MAX_JWKS_BYTES + 1)
        if len(raw) > MAX_JWKS_BYTES:
            raise ValueError("JWKS larger than 1 MiB")
        doc = json.loads(raw)
        if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
            raise ValueError("not a JWKS (no 'keys' list)")
        # Encryption keys are published alongside signing keys, and we never accept
        # symmetric ("oct") ones: neither may verify a token.
        keys = {}
        for k in doc["keys"]:
            if not isinstance(k, dict) or k.get("use") == "enc" or k.get("kty") == "oct":
                continue
            try:
                keys[k.get("kid")] = (jwt.PyJWK(k).key, k.get("alg"))
            except jwt.PyJWTError:   # a key type or algorithm we do not support: skip it
                continue
        if not keys:
            raise ValueError("the JWKS holds no usable signing key")
        return keys

    def load_now(self) -> bool:
        """Load the keys synchronously (startup, tests).  A failure keeps the keys held
        and is recorded in ``last_error``; it never raises."""
        self._last_attempt = time.monotonic()
        try:
            keys = self._read_jwks()
        except Exception as e:   # noqa: BLE001 - any failure: keep serving on old keys
            source = self.cfg.jwks_file or self.cfg.jwks_url
            self.last_error = f"loading JWKS from {source}: {type(e).__name__}: {e}"
            return False
        self._keys, self.last_error, self.last_refresh = keys, None, time.time()
        return True

    async def run(self) -> None:
        """Load the keys now and every ``jwks_refresh_s`` (sooner after a failure, or
        when a token names an unknown key); runs until cancelled."""
        self._loop, self._wake = asyncio.get_running_loop(), asyncio.Event()
        while True:
            try:
                async with asyncio.timeout(FETCH_TIMEOUT_S + 1):  # not wait_for: it
                    ok = await asyncio.to_thread(self.load_now)   # can swallow a stop
            except asyncio.TimeoutError:
                ok, self.last_error = False, "loading JWKS: timed out"
            delay = self.cfg.jwks_refresh_s if ok else min(self.cfg.jwks_refresh_s, RETRY_S)
            try:
                async with asyncio.timeout(delay):
                    await self._wake.wait()
            except asyncio.TimeoutError:
                pass
            self._wake.clear()
            await asyncio.sleep(max(0.0, self._last_attempt + self.min_refresh_interval_s
                                    - time.monotonic()))

    def start(self) -> asyncio.Task:
        """``run()`` as a task of the running loop (kept here so it is not collected)."""
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self.run())
        return self._task

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    def _refresh_soon(self) -> None:
        if self._loop is not None and self._wake is not None and not self._wake.is_set():
            self._loop.call_soon_threadsafe(self._wake.set)   # run() applies the rate limit

    # ---- the request path: memory only ----------------------------------------------

    def verify(self, token: str) -> tuple[str, str, dict]:
        """``(user, project, claims)`` of a valid token, else ``TokenError``."""
        if len(token) > MAX_TOKEN_CHARS:
            raise TokenError("The token is malformed.")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise TokenError("The token is malformed.") from None
        alg, kid = header.get("alg"), header.get("kid")
        if alg not in self.cfg.algorithms:   # before any key: no `none`, no HS* confusion
            raise TokenError("The token's algorithm is not accepted.")
        if kid is not None and not isinstance(kid, str):
            raise TokenError("The token is malformed.")
        keys = self._keys
        found = keys.get(kid) if kid is not None or len(keys) != 1 else next(iter(keys.values()))
        if found is None:
            self._refresh_soon()
            raise TokenError("The token is signed with an unknown key.")
        key, key_alg = found
        if key_alg is not None and key_alg != alg:
            raise TokenError("The token's algorithm does not match its signing key.")
        try:
            claims = jwt.decode(
                token, key, algorithms=[alg], audience=self.cfg.audience,
                issuer=self.cfg.issuer, leeway=self.cfg.leeway_s,
                options={"require": ["exp", "iss", "aud"]})
        except jwt.MissingRequiredClaimError as e:
            raise TokenError(f"The token has no '{e.claim}' claim.") from None
        except (TypeError, ValueError, jwt.InvalidKeyError):   # e.g. ES256 header, RSA key
            raise TokenError("The token's algorithm does not match its signing key.") from None
        except jwt.PyJWTError as e:
            msg = next((m for t, m in _MESSAGES if isinstance(e, t)), "The token is invalid.")
            raise TokenError(msg) from None
        user = claims.get(self.cfg.user_claim) or claims.get("sub")
        if not isinstance(user, str) or not user:
            raise TokenError("The token names no user.")
        return user, self._project(claims), claims

    def _project(self, claims: dict) -> str:
        """The first value of the project claim that is, or maps to, a known project.
        Keycloak's group claim holds paths ("/proj-a"); the map may name either form."""
        values = claims.get(self.cfg.project_claim)
        if isinstance(values, str):
            values = [values]
        if not isinstance(values, list):
            values = []
        pmap = self.cfg.project_map
        for v in values:
            if not isinstance(v, str) or not v:
                continue
            bare = v[1:] if v.startswith("/") else v
            name = pmap.get(v) or pmap.get(bare) or bare
            if name and (not self.projects or name in self.projects):
                return name
        raise TokenError("The token names no project this service knows.")
