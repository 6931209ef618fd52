"""Scope requirements written in the auth config (``servers.<name>.auth``).

Fires after parse (``ex.method``/``ex.name`` are known) and before authz.
``scopes`` apply to every request, ``method_scopes`` to JSON-RPC methods and
``tool_scopes`` to ``tools/call`` by tool name (both take ``fnmatch`` globs).
A caller whose token lacks any of them gets 403 ``insufficient_scope`` naming
*every* scope the operation needs, so one step-up is enough.  The policy
engine may raise ``InsufficientScope`` too; the error responder builds the
same challenge for both.
"""
from __future__ import annotations

from fnmatch import fnmatchcase
from typing import Any

from ..errors import InsufficientScope
from ..pipeline import Exchange


def required_scopes(auth: Any, method: str | None, name: str | None) -> tuple[str, ...]:
    need: dict[str, None] = dict.fromkeys(auth.scopes)
    if method is not None:
        for pattern, scopes in auth.method_scopes:
            if fnmatchcase(method, pattern):
                need.update(dict.fromkeys(scopes))
        if method == "tools/call" and name is not None:
            for pattern, scopes in auth.tool_scopes:
                if fnmatchcase(name, pattern):
                    need.update(dict.fromkeys(scopes))
    return tuple(need)


class Scopes:
    name = "scopes"

    def __init__(self, config: Any) -> None:
        self._active = {n for n, s in config.servers.items()
                        if s.auth is not None and (s.auth.scopes or s.auth.method_scopes or s.auth.tool_scopes)}

    @classmethod
    def make(cls, config: Any) -> "Scopes | None":
        """None when no server names scopes (or auth is off): then the stage costs nothing."""
        if config.auth.mode == "none":
            return None
        stage = cls(config)
        return stage if stage._active else None

    async def on_request(self, ex: Exchange) -> None:
        if ex.server.name not in self._active:
            return
        need = required_scopes(ex.server.auth, ex.method, ex.name)
        granted = ex.principal.scopes
        if any(s not in granted for s in need):
            raise InsufficientScope("the operation needs additional scopes", scopes=need)
