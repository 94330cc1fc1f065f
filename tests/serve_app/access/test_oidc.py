"""OIDC bearer tokens, with real signatures from a local test issuer (no mocks)."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from serve_app.access.config import OIDCConfig
from serve_app.access.oidc import OIDCVerifier, TokenError, looks_like_jwt
from tests.serve_app.access.oidc_issuer import Issuer, new_private_key

PROJECTS = {"proj-a", "proj-b", "chem"}


@pytest.fixture
def issuer(tmp_path):
    with Issuer(tmp_path) as iss:
        yield iss


def verifier(iss: Issuer, source: str = "file", projects=PROJECTS, **cfg) -> OIDCVerifier:
    v = OIDCVerifier(OIDCConfig(**iss.oidc_config(source, **cfg)), set(projects),
                     min_refresh_interval_s=0.1)
    return v


def refused(v: OIDCVerifier, token: str) -> str:
    with pytest.raises(TokenError) as e:
        v.verify(token)
    assert token not in str(e.value)
    return str(e.value)


async def until(cond, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


@pytest.mark.parametrize("source", ["file", "url"])
@pytest.mark.parametrize("kid", ["rsa-1", "ec-1"])
def test_good_tokens(issuer, source, kid):
    issuer.serve()
    v = verifier(issuer, source)
    assert v.load_now() and v.last_error is None and v.last_refresh > 0
    assert sorted(v.key_ids) == ["ec-1", "rsa-1"]
    token = issuer.token(kid=kid)
    assert looks_like_jwt(token)
    user, project, claims = v.verify(token)
    assert (user, project) == ("alice", "proj-a")
    assert claims["iss"] == issuer.issuer and claims["sub"] == "f3a1-alice"
    # audience as a list containing ours
    assert v.verify(issuer.token(kid=kid, aud=["other", issuer.audience]))[0] == "alice"


def test_bad_tokens_say_which_check_failed(issuer):
    v = verifier(issuer)
    v.load_now()
    now = int(time.time())
    cases = {
        "The token's algorithm is not accepted.": [
            issuer.token(alg="none"),
            issuer.token(alg="HS256", key=issuer.public_pem("rsa-1")),
            issuer.token(alg="HS256", key=issuer.public_pem("rsa-1"), kid=None),
        ],
        "The token's signature is invalid.": [
            issuer.token(kid="rsa-1", key=new_private_key("rsa")),
            issuer.token(kid="ec-1", key=new_private_key("ec")),
            # a valid token whose payload was swapped for another one's
            ".".join([issuer.token().split(".")[0],
                      issuer.token(preferred_username="root").split(".")[1],
                      issuer.token().split(".")[2]]),
        ],
        "The token's issuer is not accepted.": [
            issuer.token(iss="https://evil.example.org/realms/hpc")],
        "The token's audience is not accepted.": [
            issuer.token(aud="someone-else"), issuer.token(aud=["a", "b"])],
        "The token has expired.": [issuer.token(exp=now - 3600)],
        "The token is not yet valid.": [issuer.token(nbf=now + 3600)],
        "The token has no 'exp' claim.": [issuer.token(exp=None)],
        "The token has no 'aud' claim.": [issuer.token(aud=None)],
        "The token is signed with an unknown key.": [
            issuer.token(kid="never-published"), issuer.token(kid=None)],
        "The token's algorithm does not match its signing key.": [
            issuer.token(kid="rsa-1", key=issuer.keys["ec-1"][0], alg="ES256")],
        "The token is malformed.": [
            "a.b.c", "not-a-jwt", issuer.token()[:-1] + "!", "x" * 20000],
        "The token names no project this service knows.": [
            issuer.token(groups=["/physics"]), issuer.token(groups=None),
            issuer.token(groups=42)],
        "The token names no user.": [issuer.token(preferred_username=None, sub=None)],
    }
    for message, tokens in cases.items():
        for token in tokens:
            assert refused(v, token) == message, token


def test_leeway(issuer):
    v = verifier(issuer, leeway_s=60)
    v.load_now()
    assert v.verify(issuer.token(exp=int(time.time()) - 30))[0] == "alice"
    assert refused(v, issuer.token(exp=int(time.time()) - 90)) == "The token has expired."


def test_no_kid_uses_the_only_key(tmp_path, issuer):
    issuer.publish("ec-1")
    v = verifier(issuer)
    v.load_now()
    assert v.verify(issuer.token(kid=None, key=issuer.keys["ec-1"][0]))[1] == "proj-a"


def test_algorithms_are_configured(issuer):
    v = verifier(issuer, algorithms=["ES256"])
    v.load_now()
    assert v.verify(issuer.token(kid="ec-1"))[0] == "alice"
    assert refused(v, issuer.token(kid="rsa-1")) == "The token's algorithm is not accepted."
    with pytest.raises(ValueError):
        OIDCConfig(**issuer.oidc_config("file", algorithms=["RS256", "HS256"]))


def test_project_mapping(issuer):
    v = verifier(issuer, project_map={"/hpc/chemistry": "chem", "physics-2024": "proj-b"})
    v.load_now()
    # the first value that is (or maps to) a known project wins
    assert v.verify(issuer.token(groups=["/staff", "/proj-b", "/proj-a"]))[1] == "proj-b"
    assert v.verify(issuer.token(groups=["/hpc/chemistry"]))[1] == "chem"
    assert v.verify(issuer.token(groups=["/physics-2024"]))[1] == "proj-b"
    assert v.verify(issuer.token(groups="proj-a"))[1] == "proj-a"
    assert refused(v, issuer.token(groups=["/staff", "/hpc/physics"])) == \
        "The token names no project this service knows."
    # other claims for user and project
    v = verifier(issuer, user_claim="email", project_claim="project")
    v.load_now()
    user, project, _ = v.verify(issuer.token(email="alice@example.org", project="chem"))
    assert (user, project) == ("alice@example.org", "chem")
    assert v.verify(issuer.token(project="chem"))[0] == "f3a1-alice"   # falls back to sub
    # no projects configured: the first value is the project
    v = verifier(issuer, projects=set())
    v.load_now()
    assert v.verify(issuer.token(groups=["/physics", "/proj-a"]))[1] == "physics"


def test_looks_like_jwt(issuer):
    assert looks_like_jwt(issuer.token()) and looks_like_jwt(issuer.token(alg="none"))
    for s in ["sk-abc123", "a.b.c", "", "..", "hpc_" + "x" * 40, "eyJhbGciOi.x.y"]:
        assert not looks_like_jwt(s), s


def test_jwks_down_at_start_then_back(issuer):
    async def main():
        issuer.serve()
        issuer.stop()                               # the URL is known but refused
        v = verifier(issuer, "url", jwks_refresh_s=0.2)
        v.start()
        await until(lambda: v.last_error is not None)
        assert v.key_ids == [] and "jwks.json" in v.last_error
        assert refused(v, issuer.token()) == "The token is signed with an unknown key."
        issuer.serve()                              # same port
        await until(lambda: v.last_error is None)
        assert v.verify(issuer.token())[0] == "alice"
        # down again: the cached keys keep working, the failure is visible
        issuer.stop()
        await until(lambda: v.last_error is not None)
        assert v.verify(issuer.token(kid="ec-1"))[0] == "alice"
        v.stop()
    asyncio.run(main())


def test_rotation_via_unknown_kid(issuer):
    async def main():
        issuer.serve()
        v = verifier(issuer, "url", jwks_refresh_s=3600)
        v.start()
        await until(lambda: v.last_refresh > 0)
        fetched = issuer.requests
        issuer.add_key("rsa-2", "rsa")              # the issuer rotates
        issuer.publish("rsa-2", "ec-1")             # and retires rsa-1
        token = issuer.token(kid="rsa-2")
        # refused at once (no fetch on the request path) ...
        assert refused(v, token) == "The token is signed with an unknown key."
        # ... and picked up by the early refresh, long before jwks_refresh_s
        await until(lambda: "rsa-2" in v.key_ids)
        assert v.verify(token)[0] == "alice"
        assert "rsa-1" not in v.key_ids
        # made-up kids are rate-limited: one fetch per min_refresh_interval_s at most
        bogus = [issuer.token(kid=f"bogus-{i}") for i in range(200)]
        fetched, t0 = issuer.requests, time.monotonic()
        for token in bogus:
            refused(v, token)
            await asyncio.sleep(0.005)
        await asyncio.sleep(0.2)
        elapsed = time.monotonic() - t0
        assert issuer.requests - fetched <= elapsed / v.min_refresh_interval_s + 1
        v.stop()
    asyncio.run(main())


def test_file_refresh_failure_keeps_keys(issuer):
    v = verifier(issuer)
    assert v.load_now()
    issuer.jwks_file.write_text("{not json")
    assert not v.load_now() and "JSONDecodeError" in v.last_error
    issuer.jwks_file.write_text('{"keys": [{"kty": "oct", "k": "c2VjcmV0", "use": "enc"}]}')
    assert not v.load_now() and "no usable signing key" in v.last_error
    assert v.verify(issuer.token())[0] == "alice"


def test_keys_without_declared_alg(issuer):
    """Many JWKS leave out "alg": the header's algorithm is then checked against the
    key's type by the signature library, and symmetric keys are never loaded."""
    jwks = issuer.jwks()
    for k in jwks["keys"]:
        del k["alg"]
    jwks["keys"].append({"kty": "oct", "kid": "hs", "k": "c2VjcmV0"})
    issuer.jwks_file.write_text(json.dumps(jwks))
    v = verifier(issuer, algorithms=["RS256", "ES256", "PS256"])
    assert v.load_now() and sorted(v.key_ids) == ["ec-1", "rsa-1"]
    assert v.verify(issuer.token(kid="ec-1"))[0] == "alice"
    assert v.verify(issuer.token(kid="rsa-1", alg="PS256", key=issuer.keys["rsa-1"][0]))
    assert refused(v, issuer.token(kid="rsa-1", key=issuer.keys["ec-1"][0], alg="ES256")) \
        == "The token's algorithm does not match its signing key."
