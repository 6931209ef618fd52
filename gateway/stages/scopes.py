"""Mount-wide scope requirements (``servers.<name>.auth.scopes``).

Fires after parse and before authz.  ``scopes`` apply to every request on the
mount (so ``tools/list`` and ``tools/call`` agree); which scopes a particular
tool, resource or prompt needs is decided by the policy engine alone.  A
caller whose token lacks any of them gets 403 ``insufficient_scope`` naming
every scope the mount needs; the error responder builds the same challenge
for the policy engine's step-ups.
"""
from __future__ import annotations

from typing import Any

from ..errors import InsufficientScope
from ..pipeline import Exchange


def required_scopes(auth: Any, method: str | None, name: str | None) -> tuple[str, ...]:
    return tuple(auth.scopes)


class Scopes:
    name = "scopes"

    def __init__(self, config: Any) -> None:
        self._active = {n for n, s in config.servers.items()
                        if s.auth is not None and s.auth.scopes}

    @classmethod
    def make(cls, config: Any) -> "Scopes | None":
        """None when no server names scopes (or auth is off): then the stage costs nothing."""
        if config.auth.mode == "none":
            return None
        stage = cls(config)
        return stage if stage._active else None

    async def on_request(self, ex: Exchange) -> None:
        self.check(ex)

    def check(self, ex: Exchange) -> None:
        """``on_request`` without a coroutine (see pipeline.py)."""
        if ex.server.name not in self._active:
            return
        need = required_scopes(ex.server.auth, ex.method, ex.name)
        granted = ex.principal.scopes
        if any(s not in granted for s in need):
            raise InsufficientScope("the operation needs additional scopes", scopes=need)
