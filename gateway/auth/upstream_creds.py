"""Credentials the gateway presents to upstreams (never the client's token)."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..config.model import Config, ServerConfig
    from ..pipeline import Exchange

# Identity headers the gateway may set upstream; client-supplied copies are stripped.
IDENTITY_HEADERS: frozenset[str] = frozenset()


class StaticCredentials:
    """A fixed header value from ``env:``/``file:``, resolved once at start."""

    def __init__(self, header: str, ref: Any) -> None:
        self.header = header
        self._ref = ref
        self._value: dict[str, str] = {}

    async def start(self, http_session: Any) -> None:
        self._value = {self.header: self._ref.resolve()}

    async def close(self) -> None:
        self._value = {}

    async def headers(self, ex: "Exchange") -> dict[str, str]:
        return self._value


def make_credentials(server: "ServerConfig", config: "Config") -> Any:
    cred = server.credentials
    if cred is None:
        return None
    return StaticCredentials(cred.header, cred.value)
