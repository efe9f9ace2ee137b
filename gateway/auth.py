"""Who may call the gateway: API keys, each with an optional model allowlist and request rate.

`KeyRing.match` compares the given key against every configured key with
`hmac.compare_digest`, and never stops early, so the time taken tells nothing about which key
or prefix matched. The matched key rides in `CURRENT_KEY` (a context variable: one per request
task) so that `Supervisor.resolve` can refuse models outside its allowlist wherever a route
names a model. A restricted key (one with `models`) uses the inference routes and the model
listings only; the rate limit is a token bucket per key.
"""

from __future__ import annotations

import contextvars
import hmac
import ipaddress
import time

from mlx_gw.config import ApiKey, GatewayConfig, ModelConfig
from mlx_gw.gateway.errors import Forbidden, RateLimited
from mlx_gw.gateway.supervision.kinds import ROUTE_KINDS

CURRENT_KEY: contextvars.ContextVar[ApiKey | None] = contextvars.ContextVar("api_key",
                                                                            default=None)
# What a key with a model allowlist may call besides the inference routes: the listings.
RESTRICTED_EXTRA = ("/v1/models", "/api/tags", "/api/show", "/api/version")


class _Bucket:
    """`per_minute` requests a minute, up to `per_minute` in a burst."""

    def __init__(self, per_minute: int) -> None:
        self.capacity = float(per_minute)
        self.rate = per_minute / 60.0
        self.tokens = self.capacity
        self.at = time.monotonic()

    def take(self) -> float:
        """0 when a request may go now (and counts it); else the seconds until one may."""
        now = time.monotonic()
        self.tokens = min(self.capacity, self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate


class KeyRing:
    def __init__(self, keys: tuple[ApiKey, ...]) -> None:
        self.keys = keys
        self._buckets = {k.key: _Bucket(k.requests_per_minute)
                         for k in keys if k.requests_per_minute}

    def match(self, given: str) -> ApiKey | None:
        """The key `given` names, or None; compares against every key in constant time."""
        found = None
        raw = given.encode()
        for k in self.keys:
            if hmac.compare_digest(raw, k.key.encode()) and found is None:
                found = k
        return found

    def admit(self, key: ApiKey, path: str) -> None:
        """Raises Forbidden when a restricted key calls a route beyond inference and the
        listings, RateLimited (with Retry-After) past its request rate."""
        if key.models and path not in ROUTE_KINDS and not path.startswith(RESTRICTED_EXTRA):
            raise Forbidden(f"The API key '{key.name}' may only use its models' inference "
                            f"routes, not {path}")
        bucket = self._buckets.get(key.key)
        if bucket is not None and (wait := bucket.take()) > 0:
            raise RateLimited(f"The API key '{key.name}' is over its limit of "
                              f"{key.requests_per_minute} requests per minute",
                              retry_after=max(1.0, wait))


def is_loopback(host: str) -> bool:
    """Whether `host` (an address or name to listen on) reaches this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # another name: it may resolve to any interface


def allows(model: ModelConfig) -> bool:
    """Whether the request's key may use `model`: by its name or one of its aliases, and an
    adapter (`model.adapter` set) by its own names only (NAME or BASE:NAME)."""
    key = CURRENT_KEY.get()
    if key is None or not key.models:
        return True
    names = (model.adapter, f"{model.name}:{model.adapter}") if model.adapter \
        else (model.name, *model.aliases)
    return any(n in key.models for n in names)


def allows_name(name: str, base: ModelConfig) -> bool:
    """`allows` for a name in a listing: `base` itself, one of its aliases or adapters."""
    key = CURRENT_KEY.get()
    if key is None or not key.models:
        return True
    return name in key.models or (name in (base.name, *base.aliases) and allows(base))


def restricted() -> bool:
    """Whether the request's key has a model allowlist."""
    key = CURRENT_KEY.get()
    return key is not None and bool(key.models)


def check_pull_allowed(gateway: GatewayConfig) -> None:
    """POST /api/pull downloads into the server's disk: on only when `allow_pull` says so,
    or (unset) when the gateway listens on loopback only."""
    allowed = gateway.allow_pull if gateway.allow_pull is not None else is_loopback(gateway.host)
    if not allowed:
        raise Forbidden(f"Pulling models is off on a gateway that listens on {gateway.host}: "
                        "set gateway.allow_pull: true to allow it", code="pull_disabled")


def check_allowed(model: ModelConfig, name: str) -> None:
    if not allows(model):
        key = CURRENT_KEY.get()
        raise Forbidden(f"The API key '{key.name if key else ''}' may not use model '{name}'",
                        code="model_not_allowed", param="model")
