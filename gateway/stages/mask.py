"""Masking secrets in what an upstream answers, before it reaches the client (and the model).

Opt-in per server (``servers.<name>.mask_secrets``: true, or tool-name globs).  For a
masked ``tools/call`` the response hook walks every message the upstream sends for it
(the JSON body, or each SSE event): text content, structured content and an error's
message and data have every secret the redactor knows replaced by ``[REDACTED]``, and
values under secret-looking keys (``password``, ``token`` ...) replaced whole;
the count lands in the audit record (``masked``).  The patterns are linear but cost up
to ~0.7 µs per character on hostile text, so each message has a scanning budget
(``MASK_BUDGET`` characters, ~0.2 s at worst): a string that would exceed it is not
relayed unscanned but replaced whole (fail closed, counted like any masked value).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Awaitable

from ..telemetry.redact import REDACTED, mask, sensitive_key

if TYPE_CHECKING:
    from ..config.model import Config
    from ..pipeline import Exchange

_MAX_DEPTH = 64     # messages are at most 254 levels deep (codec); secrets sit near the top
MASK_BUDGET = 256 * 1024    # characters scanned per message; strings past it are replaced whole


class Mask:
    """The request phase registers the hook; the hook masks each message."""

    name = "mask"

    def __init__(self, config: "Config") -> None:
        self._globs = {name: s.mask_secrets for name, s in config.servers.items() if s.mask_secrets}
        self.idle = not self._globs

    def check(self, ex: "Exchange") -> Awaitable[None] | None:
        if ex.method == "tools/call":
            globs = self._globs.get(ex.server.name)
            if globs is not None and any(g.regex.fullmatch(ex.name or "") for g in globs):
                ex.response_hooks.append(_hook)
        return None

    async def on_request(self, ex: "Exchange") -> None:
        self.check(ex)


def _hook(ex: "Exchange", message: dict[str, Any]) -> dict[str, Any]:
    if "method" in message:               # a notification or a server request on the stream
        return message
    walk = _Walk()
    for key in ("result", "error"):
        if key in message:
            message[key] = walk.value(message[key], 0)
    if walk.count:
        ex.audit["masked"] = ex.audit.get("masked", 0) + walk.count
    return message


class _Walk:
    """Masks every string of one message, within ``MASK_BUDGET`` characters."""

    __slots__ = ("count", "budget")

    def __init__(self) -> None:
        self.count = 0
        self.budget = MASK_BUDGET

    def text(self, text: str) -> str:
        self.budget -= len(text)
        if self.budget < 0:
            self.count += 1
            return f"{REDACTED} ({len(text)} characters past the masking budget)"
        out, n = mask(text)
        self.count += n
        return out

    def value(self, value: Any, depth: int) -> Any:
        if isinstance(value, str):
            return self.text(value)
        if depth >= _MAX_DEPTH:
            return value
        if isinstance(value, dict):
            for k, v in value.items():
                if isinstance(v, str) and v and v != REDACTED and sensitive_key(str(k)):
                    value[k] = REDACTED          # {"password": "..."}: the whole value
                    self.count += 1
                elif isinstance(v, (str, dict, list)):
                    value[k] = self.value(v, depth + 1)
        elif isinstance(value, list):
            for i, v in enumerate(value):
                if isinstance(v, (str, dict, list)):
                    value[i] = self.value(v, depth + 1)
        return value
