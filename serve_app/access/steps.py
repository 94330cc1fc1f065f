"""The pipeline's access steps: authenticate -> (body, model) -> account -> admit,
and after the engine, in reverse: release what admission took, record the usage.

``access_steps`` builds only the steps a config needs, so an app without
credentials runs none of them.  Every step reads replica-local state
(``serve_app.access.client``); none calls the head on the request path.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from typing import Any

from serve_app import continuation
from serve_app.access.client import AccessClient
from serve_app.access.config import AccessConfig, Limits
from serve_app.access.limits import format_duration
from serve_app.access.principal import LimitScope, Principal
from serve_app.api.pipeline import RequestContext
from serve_app.config import AppConfig
from serve_app.errors import APIError

STATIC_PROJECT = "default"
_DEFAULT_MAX_TOKENS = 1024  # the admission estimate when neither request nor model says


def unauthorized(message: str, code: str = "invalid_api_key") -> APIError:
    return APIError(401, message, code=code)


class StaticKeys:
    """``api_keys`` / ``api_keys_file``: keys of the default project, no limits."""

    def __init__(self, keys: list[str]):
        self.keys = [(f"api_keys[{i}]", k.encode()) for i, k in enumerate(keys)]

    def find(self, token: str) -> Principal | None:
        found = None
        for name, key in self.keys:  # every comparison runs: no early exit to time
            if hmac.compare_digest(token.encode(), key):
                found = name
        return None if found is None else Principal(key=found, project=STATIC_PROJECT)


class Authenticate:
    """Static keys, then managed keys (by their SHA-256), then OIDC tokens."""

    def __init__(self, access: AccessConfig, static: StaticKeys,
                 client: AccessClient | None, oidc: Any = None):
        self.access = access
        self.static = static
        self.client = client
        self.oidc = oidc
        self._started = False

    async def before(self, ctx: RequestContext) -> None:
        if not self._started:  # background work needs the replica's event loop
            self._started = True
            if self.client is not None:
                self.client.start()
            if self.oidc is not None:
                self.oidc.start()
                if self.client is not None:
                    self.client.probes["oidc"] = self._oidc_health
        scheme, _, token = ctx.request.headers.get("authorization", "").partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise unauthorized("Missing API key. Send 'Authorization: Bearer <key>'.")
        ctx.principal = self.static.find(token) or await self._managed(token) \
            or self._token(token)
        if ctx.principal is None:
            raise unauthorized("Incorrect API key provided.")

    async def _managed(self, token: str) -> Principal | None:
        if self.client is None or not self.access.managed_keys:
            return None
        if not self.client.synced.is_set():
            await self.client.first_sync()
        digest = hashlib.sha256(token.encode()).hexdigest()
        record = self.client.keys.get(digest)
        if record is None:
            return None
        if record["revoked_at"] is not None:
            raise unauthorized("This API key has been revoked.", "revoked_api_key")
        if record["expires_at"] is not None and record["expires_at"] < time.time():
            raise unauthorized("This API key has expired.", "expired_api_key")
        key_limits = Limits(rpm=record["rpm"], tpm=record["tpm"],
                            max_concurrent=record["max_concurrent"])
        return self._principal(record["name"], record["project"], "",
                               tuple(record["models"]), key_limits)

    def _token(self, token: str) -> Principal | None:
        from serve_app.access.oidc import TokenError, looks_like_jwt
        if self.oidc is None or not looks_like_jwt(token):
            return None
        try:
            user, project, _ = self.oidc.verify(token)
        except TokenError as err:
            raise unauthorized(str(err), "invalid_token") from None
        return self._principal(f"oidc:{user}", project, user, ("*",), None)

    def _principal(self, key: str, project: str, user: str, models: tuple[str, ...],
                   key_limits: Limits | None) -> Principal:
        scopes = []
        if key_limits is not None and key_limits.any():
            scopes.append(LimitScope(f"key:{key}", key_limits))
        project_cfg = self.access.projects.get(project)
        if project_cfg is not None and project_cfg.any():
            scopes.append(LimitScope(f"project:{project}", project_cfg))
        return Principal(key=key, project=project, user=user, models=models,
                         project_models=tuple(project_cfg.models) if project_cfg else ("*",),
                         scopes=tuple(scopes))

    def _oidc_health(self) -> dict[str, Any]:
        return {"ok": self.oidc.last_error is None, "error": self.oidc.last_error,
                "last_refresh": self.oidc.last_refresh}

    def after(self, ctx: RequestContext) -> None:
        pass


class AuthorizeModel:
    """A model the caller may not use is a 404, exactly as one that does not exist."""

    def __init__(self, model_config: Any):
        self.model_config = model_config  # OpenAIServer.model_config: raises the 404

    async def before(self, ctx: RequestContext) -> None:
        if ctx.model is not None:
            self.model_config(ctx.model, ctx.principal)

    def after(self, ctx: RequestContext) -> None:
        pass


def estimate_tokens(body: Any, max_model_len: int | None) -> int:
    """Prompt (about 4 characters a token) plus what the request may generate; an
    embeddings request (``inputs()``) generates nothing: its inputs are its cost."""
    inputs = getattr(body, "inputs", None)
    if callable(inputs):
        return sum(len(i) if isinstance(i, list) else len(i) // 4 + 1 for i in inputs())
    messages = getattr(body, "messages", None)
    if messages is not None:
        chars = sum(len(str(getattr(m, "content", "") or "")) + 16 for m in messages)
    else:
        chars = len(body.prompt_text()) if hasattr(body, "prompt_text") else 0
    prompt = chars // 4 + 1
    limit = getattr(body, "max_completion_tokens", None) or getattr(body, "max_tokens", None)
    if limit is None:
        limit = max_model_len - prompt if max_model_len else _DEFAULT_MAX_TOKENS
    return prompt + max(0, limit)


class Admit:
    """Take the request's cost from every limit of its key and project, locally."""

    def __init__(self, client: AccessClient, models: dict[str, Any]):
        self.client = client
        self.models = models

    async def before(self, ctx: RequestContext) -> None:
        principal = ctx.principal
        if not ctx.endpoint.generates or principal is None or not principal.scopes:
            return
        if ctx.state.get(continuation.RESUMED):  # admitted when its stream began
            return
        cfg = self.models[ctx.model]
        ctx.cost_estimate = estimate_tokens(ctx.body, cfg.max_model_len)
        costs = {"requests": 1, "tokens": ctx.cost_estimate, "concurrent": 1}
        taken = []
        for scope in principal.scopes:
            for metric, cost in costs.items():
                allowance = self.client.allowance(scope.id, metric)
                if allowance is None:
                    continue  # a limit the ledger has not announced yet
                if not allowance.try_take(cost):
                    for a, _, c in taken:
                        a.give_back(c)
                    self._headers(ctx, principal)
                    if metric != "concurrent" and scope is principal.scopes[0]:
                        ctx.response_headers[f"x-ratelimit-remaining-{metric}"] = "0"
                    raise _limited(scope, metric, allowance.wait_s(cost))
                taken.append((allowance, metric, cost))
        ctx.state["taken"] = taken
        self._headers(ctx, principal)

    def _headers(self, ctx: RequestContext, principal: Principal) -> None:
        scope = principal.scopes[0]
        for metric, suffix in (("requests", "requests"), ("tokens", "tokens")):
            allowance = self.client.allowance(scope.id, metric)
            if allowance is None:
                continue
            ctx.response_headers.update({
                f"x-ratelimit-limit-{suffix}": str(int(allowance.capacity)),
                f"x-ratelimit-remaining-{suffix}": str(int(allowance.remaining())),
                f"x-ratelimit-reset-{suffix}": format_duration(allowance.reset_s())})

    def after(self, ctx: RequestContext) -> None:
        usage = ctx.usage
        used = usage.prompt_tokens + usage.completion_tokens if usage else 0
        for allowance, metric, cost in ctx.state.get("taken", ()):
            if metric == "concurrent":
                allowance.give_back(cost)              # the slot is free again
            elif metric == "tokens":
                allowance.give_back(cost - used)       # charge the real tokens


def _limited(scope: LimitScope, metric: str, wait_s: float) -> APIError:
    kind, _, name = scope.id.partition(":")
    value = {"requests": scope.limits.rpm, "tokens": scope.limits.tpm,
             "concurrent": scope.limits.max_concurrent}[metric]
    what = (f"{value} concurrent requests" if metric == "concurrent"
            else f"{value} {metric} per minute")
    retry = max(1, int(wait_s + 0.999))
    return APIError(429, f"Rate limit reached for {metric} of {kind} '{name}': limit "
                    f"{what}. Please try again in {retry}s.", code="rate_limit_exceeded",
                    headers={"Retry-After": str(retry)})


class Account:
    """Record the finished request in the ledger (tokens, status, latency; never text)."""

    def __init__(self, client: AccessClient):
        self.client = client

    async def before(self, ctx: RequestContext) -> None:
        pass

    def after(self, ctx: RequestContext) -> None:
        principal = ctx.principal
        if not ctx.endpoint.generates or principal is None:
            return
        if ctx.state.get(continuation.HANDED_OVER):  # the replica that resumes it records it
            return
        usage = ctx.usage
        self.client.record({
            "request_id": ctx.request_id, "ts": time.time(), "key": principal.key,
            "project": principal.project, "user": principal.user, "model": ctx.model or "",
            "endpoint": ctx.endpoint.name,
            "prompt_tokens": usage.prompt_tokens if usage else 0,
            "completion_tokens": usage.completion_tokens if usage else 0,
            "status": ctx.status, "latency_ms": (time.monotonic() - ctx.started) * 1000})


def access_steps(config: AppConfig, ledger: Any, models: dict[str, Any]) -> tuple[list, list]:
    """(steps before the body is read, steps after the model is known) for ``config``."""
    if not config.authenticated:
        return [], []
    access = config.access
    client = None
    if ledger is not None and config.ledger_on:
        client = AccessClient(ledger, access.sync_interval_s)
    oidc = None
    if access.oidc is not None:
        from serve_app.access.oidc import OIDCVerifier
        oidc = OIDCVerifier(access.oidc, set(access.projects))
        oidc.load_now()  # at replica start, so the first token finds the keys
    before = [Authenticate(access, StaticKeys(config.load_api_keys()), client, oidc)]
    after = [] if client is None else [Account(client), Admit(client, models)]
    return before, after
