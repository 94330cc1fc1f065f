"""A small OIDC issuer for tests: real key pairs, a JWKS file, the JWKS over real HTTP,
and tokens minted with whatever claims and headers a test needs (good and bad ones).

    with Issuer(tmp_path) as iss:
        url = iss.serve()                       # http://127.0.0.1:<port>/jwks.json
        good = iss.token(preferred_username="alice", groups=["/proj-a"])
        expired = iss.token(exp=time.time() - 3600)
        unsigned = iss.token(alg="none")
        confused = iss.token(alg="HS256", key=iss.public_pem("rsa-1"))

Keys: ``rsa-1`` (RS256) and ``ec-1`` (ES256) are published at the start; ``add_key()``
makes more (a rotation), ``publish()`` chooses which ones the JWKS shows.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

ISSUER = "https://sso.example-hpc.org/realms/hpc"
AUDIENCE = "hpcserve"
_ALG = {"rsa": "RS256", "ec": "ES256"}


def new_private_key(kind: str = "rsa"):
    """A fresh key pair's private key: ``"rsa"`` (2048 bit) or ``"ec"`` (P-256)."""
    if kind == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    if kind == "ec":
        return ec.generate_private_key(ec.SECP256R1())
    raise ValueError(f"unknown key kind {kind!r}")


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class Issuer:
    def __init__(self, directory: str | Path, issuer: str = ISSUER,
                 audience: str = AUDIENCE) -> None:
        self.issuer, self.audience = issuer, audience
        self.jwks_file = Path(directory) / "jwks.json"
        self.keys: dict[str, tuple[Any, str]] = {}   # kid -> (private key, alg)
        self.published: list[str] = []
        self.requests = 0                             # JWKS fetches served over HTTP
        self.port: int | None = None
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.add_key("rsa-1", "rsa", publish=False)
        self.add_key("ec-1", "ec", publish=False)
        self.publish("rsa-1", "ec-1")

    # ---- keys and the JWKS ------------------------------------------------------------

    def add_key(self, kid: str, kind: str = "rsa", publish: bool = True) -> str:
        """A new key pair under ``kid``; published (added to the JWKS) unless told not."""
        self.keys[kid] = (new_private_key(kind), _ALG[kind])
        if publish:
            self.publish(*self.published, kid)
        return kid

    def publish(self, *kids: str) -> None:
        """Make exactly these keys the JWKS (file and URL)."""
        self.published = list(kids)
        self.jwks_file.write_text(json.dumps(self.jwks()))

    def jwks(self) -> dict:
        out = []
        for kid in self.published:
            key, alg = self.keys[kid]
            jwk = json.loads(jwt.get_algorithm_by_name(alg).to_jwk(key.public_key()))
            out.append({**jwk, "kid": kid, "alg": alg, "use": "sig"})
        return {"keys": out}

    def public_pem(self, kid: str = "rsa-1") -> bytes:
        return self.keys[kid][0].public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)

    # ---- tokens -----------------------------------------------------------------------

    def claims(self, **claims: Any) -> dict:
        """Default claims of a valid token for user alice of group /proj-a, overridden by
        ``claims``; a claim given as None is left out (``exp=None``: no expiry)."""
        now = int(time.time())
        base = {"iss": self.issuer, "aud": self.audience, "sub": "f3a1-alice",
                "preferred_username": "alice", "groups": ["/proj-a"],
                "iat": now, "exp": now + 300}
        base.update(claims)
        return {k: v for k, v in base.items() if v is not None}

    def token(self, *, kid: str | None = "rsa-1", alg: str | None = None, key: Any = None,
              headers: dict | None = None, **claims: Any) -> str:
        """A token signed with the key ``kid`` (its own algorithm), or with ``key`` (a
        private key object, or bytes for HS*) and ``alg``.  ``kid=None`` omits the kid
        header (signed by rsa-1, as is an unknown kid); ``alg="none"`` makes an unsigned token; ``alg="HS256"`` with
        ``key=public_pem()`` makes the classic algorithm-confusion token."""
        # no kid or an unknown one: signed by rsa-1 unless told otherwise
        own_key, own_alg = self.keys.get(kid) or self.keys["rsa-1"]
        own_alg = own_alg if key is None else None
        key = own_key if key is None else key
        alg = alg or own_alg or ("ES256" if isinstance(key, ec.EllipticCurvePrivateKey)
                                 else "RS256")
        header = {"alg": alg, "typ": "JWT", **({"kid": kid} if kid is not None else {}),
                  **(headers or {})}
        payload = self.claims(**claims)
        if alg == "none" or alg.startswith("HS"):
            # PyJWT refuses to make these (rightly); build them by hand.
            signing_input = (_b64(json.dumps(header).encode()) + "."
                             + _b64(json.dumps(payload).encode()))
            if alg == "none":
                return signing_input + "."
            digest = {"HS256": hashlib.sha256, "HS384": hashlib.sha384,
                      "HS512": hashlib.sha512}[alg]
            mac = hmac.new(key, signing_input.encode(), digest).digest()
            return signing_input + "." + _b64(mac)
        return jwt.encode(payload, key, algorithm=alg, headers=header)

    # ---- the JWKS over HTTP -----------------------------------------------------------

    @property
    def jwks_url(self) -> str:
        if self.port is None:
            raise RuntimeError("call serve() first")
        return f"http://127.0.0.1:{self.port}/jwks.json"

    def serve(self) -> str:
        """Serve the JWKS on 127.0.0.1 (a free port the first time, the same port after a
        ``stop()``, so a test can take the issuer down and bring it back); its URL."""
        if self._server is not None:
            return self.jwks_url
        issuer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path != "/jwks.json":
                    self.send_error(404)
                    return
                issuer.requests += 1
                body = json.dumps(issuer.jwks()).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port or 0), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,),
                                        name="oidc-issuer", daemon=True)
        self._thread.start()
        return self.jwks_url

    def stop(self) -> None:
        """Stop serving (the port is refused until ``serve()`` again)."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(timeout=5)
            self._server = self._thread = None

    def oidc_config(self, source: str = "url", **overrides: Any) -> dict:
        """The app's ``access.oidc`` section for this issuer (``source``: url or file;
        url needs ``serve()`` once, but not a running server)."""
        src = ({"jwks_url": self.jwks_url} if source == "url"
               else {"jwks_file": str(self.jwks_file)})
        return {"issuer": self.issuer, "audience": self.audience, **src, **overrides}

    def __enter__(self) -> "Issuer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()
