"""Masking secrets in what an upstream answers, before it reaches the client (and the model).

Opt-in per server (``servers.<name>.mask_secrets``: true, or tool-name globs).  For a
masked ``tools/call`` the response hook walks every message the upstream sends for it
(the JSON body, or each SSE event): text content, structured content and an error's
message and data have every secret the redactor knows replaced by ``[REDACTED]``, and
values under secret-looking keys (``password``, ``token`` ...) replaced whole;
the count lands in the audit record (``masked``).  The text is scanned whole (no
16 KiB cut as for log lines): the patterns are linear, so a large result costs time
in proportion to its size, and only servers that opt in pay it.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Awaitable

from ..telemetry.redact import REDACTED, mask, sensitive_key

if TYPE_CHECKING:
    from ..config.model import Config
    from ..pipeline import Exchange

_MAX_DEPTH = 64     # messages are at most 254 levels deep (codec); secrets sit near the top


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
    count = 0
    for key in ("result", "error"):
        if key in message:
            message[key], n = _walk(message[key], 0)
            count += n
    if count:
        ex.audit["masked"] = ex.audit.get("masked", 0) + count
    return message


def _walk(value: Any, depth: int) -> tuple[Any, int]:
    if isinstance(value, str):
        return mask(value)
    if depth >= _MAX_DEPTH:
        return value, 0
    total = 0
    if isinstance(value, dict):
        for k, v in value.items():
            if isinstance(v, str) and v and v != REDACTED and sensitive_key(str(k)):
                value[k] = REDACTED          # {"password": "..."}: the whole value
                total += 1
            elif isinstance(v, (str, dict, list)):
                value[k], n = _walk(v, depth + 1)
                total += n
    elif isinstance(value, list):
        for i, v in enumerate(value):
            if isinstance(v, (str, dict, list)):
                value[i], n = _walk(v, depth + 1)
                total += n
    return value, total
