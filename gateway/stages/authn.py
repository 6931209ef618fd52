"""Authentication stage (token termination).  See gateway/auth/ for the resource server."""
from __future__ import annotations

from typing import Any

from ..pipeline import ANONYMOUS, Exchange


class Authn:
    name = "authn"

    def __init__(self, config: Any, deps: Any) -> None:
        self._config = config
        if config.auth.mode != "none":
            raise NotImplementedError("auth mode 'oauth' is provided by gateway.auth")

    async def on_request(self, ex: Exchange) -> None:
        ex.principal = ANONYMOUS
