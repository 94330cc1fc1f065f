"""The ``access`` section of an app's args: projects, managed keys, OIDC, the ledger."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Limits(_Strict):
    """Per minute, for the whole service (every replica together)."""

    rpm: int | None = Field(default=None, gt=0, description="requests per minute")
    tpm: int | None = Field(default=None, gt=0, description=(
        "tokens per minute, prompt + completion; admitted on the prompt and max_tokens, "
        "charged the real usage"))
    max_concurrent: int | None = Field(default=None, gt=0,
                                       description="requests in flight at once")

    def any(self) -> bool:
        return any(v is not None for v in (self.rpm, self.tpm, self.max_concurrent))


class ProjectConfig(Limits):
    models: list[str] = Field(default_factory=lambda: ["*"], description=(
        "glob patterns of the models the project's keys and tokens may use"))


class OIDCConfig(_Strict):
    issuer: str = Field(description="the `iss` every token must carry")
    audience: str = Field(description="the `aud` every token must contain")
    jwks_url: str | None = Field(default=None, description="where the issuer's signing "
                                 "keys are published (fetched in the background)")
    jwks_file: str | None = Field(default=None, description="the signing keys as a JWKS "
                                  "file (offline centres)")
    algorithms: list[str] = Field(default_factory=lambda: ["RS256", "ES256"],
                                  min_length=1, description="accepted signature algorithms")
    user_claim: str = Field(default="preferred_username")
    project_claim: str = Field(default="groups", description=(
        "claim naming the caller's project(s): a string or a list; the first one that "
        "is (or maps to) a configured project is used"))
    project_map: dict[str, str] = Field(default_factory=dict, description=(
        "claim value -> project name, e.g. a Keycloak group path to an HPC project"))
    jwks_refresh_s: float = Field(default=300.0, gt=0)
    leeway_s: float = Field(default=30.0, ge=0, description="clock skew allowed on exp/nbf")

    @model_validator(mode="after")
    def _one_key_source(self) -> "OIDCConfig":
        if (self.jwks_url is None) == (self.jwks_file is None):
            raise ValueError("set exactly one of jwks_url and jwks_file")
        if any(a.lower() == "none" or a.startswith("HS") for a in self.algorithms):
            raise ValueError("algorithms: only asymmetric signatures (RS*, ES*, PS*, EdDSA)")
        return self


class AccessConfig(_Strict):
    managed_keys: bool = Field(default=False, description=(
        "accept keys made with `hpcserve keys create` (stored hashed on the head)"))
    store: str | None = Field(default=None, description=(
        "the head's access database (keys, usage ledger); `hpcserve up` sets it to "
        "<home>/access.db"))
    oidc: OIDCConfig | None = None
    projects: dict[str, ProjectConfig] = Field(default_factory=dict, description=(
        "per-project model access and limits; a project not listed may use every model "
        "with no project limit"))
    ledger: bool = Field(default=True, description=(
        "record every request's usage on the head (with any credentials configured)"))
    shed_floods: bool = Field(default=True, description=(
        "a managed key over its rpm/tpm limit whose clients keep sending is refused by "
        "HAProxy, before any replica, until its bucket refills (docs/access.md)"))
    sync_interval_s: float = Field(default=0.25, gt=0, description=(
        "how often a replica settles limits and sends usage to the head; a replica that "
        "dies loses at most this much unsent usage"))
