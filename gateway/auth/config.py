"""The ``auth`` section and per-server credential settings.

With no ``auth`` key the gateway refuses to start: running without
authentication is a choice the operator writes down (``mode: none``), and on
a non-loopback listener it needs a second explicit flag.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..config.reader import Reader
from ..config.secrets import SecretRef


@dataclass(frozen=True, slots=True)
class AuthConfig:
    mode: str                                   # "none" | "oauth"
    allow_none_on_public_listener: bool = False
    issuers: tuple[Any, ...] = ()


@dataclass(frozen=True, slots=True)
class StaticCredential:
    header: str
    value: SecretRef


def parse_auth(r: Reader, ctx: dict[str, Any], listen: Any) -> AuthConfig:
    if not r.has("auth"):
        r.error(None, "auth is required: configure auth.issuers, or write 'auth: {mode: none}' "
                      "to run without authentication (local use only)")
        r.seen.add("auth")
        return AuthConfig(mode="none")
    sub = r.mapping("auth")
    mode = sub.str("mode", "oauth", choices=("none", "oauth"))
    allow_public = sub.bool("allow_none_on_public_listener", False)
    sub.list("issuers")
    sub.done()
    if mode == "none" and not listen.is_loopback and not allow_public:
        sub.error("mode", "auth mode 'none' on a non-loopback listener needs "
                          "'allow_none_on_public_listener: true' as well")
    return AuthConfig(mode=mode, allow_none_on_public_listener=allow_public)


def parse_server_credentials(s: Reader, ctx: dict[str, Any]) -> StaticCredential | None:
    if not s.has("credentials"):
        s.seen.add("credentials")
        return None
    sub = s.mapping("credentials")
    header = sub.str("header", "Authorization") or "Authorization"
    value = sub.secret("value", required=True)
    sub.done()
    if value is not None and ctx.get("check_secrets") and (why := value.check()):
        sub.error("value", f"{s.path}.credentials.value ({value}): {why}")
    return StaticCredential(header, value) if value else None


def parse_server_auth(s: Reader, ctx: dict[str, Any]) -> Any:
    s.seen.add("auth")
    return None
