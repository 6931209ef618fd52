"""``virtual_servers:``: one MCP endpoint that publishes a namespaced union of several mounts.

Parsed once, after ``servers:`` (an include must name a mounted server).  Each
virtual server is also a protected resource of its own: ``mount`` is a
``ServerConfig`` with its own path and audience (``<public_url>/mcp/<name>``)
and no upstream URL; hygiene, authn and parse run against it, the origin's
stages run against the origin (``gateway/virtual/``).

Names are ``<prefix><origin name>``; two includes whose prefixes are equal, or
one a prefix of the other, could publish the same name for two origins, so
that is a configuration error (``check`` reports it), not a runtime surprise.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any

from ..errors import Problem
from .reader import Reader

PREFIX = r"[A-Za-z0-9_.-]{0,32}"
_UNSEEN = object()
_RESOLVED_MAX = 4096
_RESOLVED_NAME_MAX = 256


@dataclass(frozen=True, slots=True)
class Include:
    server: str                    # a key of ``servers:``
    prefix: str                    # prepended to tool and prompt names
    tools: tuple[Any, ...] | None  # compiled globs over the origin's names (None: all)
    prompts: tuple[Any, ...] | None
    loc: Any

    def publishes(self, globs: tuple[Any, ...] | None, name: str) -> bool:
        return globs is None or any(g.match(name) for g in globs)


@dataclass(frozen=True, slots=True)
class VirtualServerConfig:
    name: str
    description: str
    includes: tuple[Include, ...]
    mount: Any                     # ServerConfig: path, audience, auth; url is empty (never forwarded to)
    origin_timeout: float          # one origin's share of a fan-out list; past it, its items are omitted
    cursor_key: bytes              # HMAC key for merged-page cursors
    loc: Any
    # resolve()'s answers, by (name, prompt): names are client text, so bounded (_RESOLVED_MAX).
    _resolved: dict[tuple[str, bool], Any] = field(default_factory=dict, compare=False, repr=False)

    def include_for(self, server: str) -> Include | None:
        return next((i for i in self.includes if i.server == server), None)

    def resolve(self, name: str, *, prompt: bool = False) -> tuple[Include, str] | None:
        """The origin and original name of a published tool (or prompt) name; None: not published.

        At most one include can match: no prefix starts another (``_check_prefixes``)."""
        key = (name, prompt)
        found = self._resolved.get(key, _UNSEEN)
        if found is not _UNSEEN:
            return found
        found = None
        for inc in self.includes:
            if name.startswith(inc.prefix):
                original = name[len(inc.prefix):]
                if original and inc.publishes(inc.prompts if prompt else inc.tools, original):
                    found = inc, original
                    break
        if len(name) <= _RESOLVED_NAME_MAX:         # client text: short names only, and a bounded number
            if len(self._resolved) >= _RESOLVED_MAX:
                self._resolved.clear()
            self._resolved[key] = found
        return found


def parse_virtual_servers(r: Reader, servers: dict[str, Any], ctx: dict[str, Any]) -> dict[str, VirtualServerConfig]:
    from ..auth.config import parse_server_auth
    from .model import SERVER_NAME, ServerConfig

    if "virtual_servers" not in r.node:
        r.seen.add("virtual_servers")
        return {}
    sub = r.mapping("virtual_servers")
    out: dict[str, VirtualServerConfig] = {}
    public_url = ctx["public_url"]
    for name in list(sub.node):
        sub.seen.add(name)
        if not isinstance(name, str) or not re.fullmatch(SERVER_NAME, name):
            sub.error(name, f"virtual server name {name!r} must match {SERVER_NAME} (it becomes /mcp/<name>)")
            continue
        if name in servers:
            sub.error(name, f"virtual server {name!r} has the name of a mounted server: both would be /mcp/{name}")
            continue
        v = Reader(sub.node[name], r.problems, f"virtual_servers.{name}", sub.at(name))
        description = v.str("description", "") or ""
        timeout = v.duration("origin_timeout", 5.0, min=0.001)
        secret = v.secret("cursor_secret")
        includes: list[Include] = []
        items = v.list("include", required=True)
        for i, item in enumerate(items):
            path = f"virtual_servers.{name}.include[{i}]"
            inc = Reader(item, r.problems, path, items.at(i))
            origin = inc.str("server", "", required=True) or ""
            prefix = inc.str("prefix", f"{origin}__", pattern=PREFIX)
            globs: dict[str, tuple[Any, ...] | None] = {}
            for key in ("tools", "prompts"):
                if key not in inc.node:
                    inc.seen.add(key)
                    globs[key] = None
                    continue
                globs[key] = inc.glob_list(key)
            inc.done()
            if origin and origin not in servers:
                inc.error("server", f"{path}.server: {origin!r} is not one of servers: "
                          f"({', '.join(sorted(servers)) or 'none'})")
                continue
            if any(x.server == origin for x in includes):
                inc.error("server", f"{path}.server: {origin!r} is included twice")
                continue
            includes.append(Include(origin, prefix, globs["tools"], globs["prompts"], items.at(i)))
        if "include" in v.node and not items:
            v.error("include", f"virtual_servers.{name}.include must name at least one server")
        _check_prefixes(name, includes, r.problems)
        mount_path = f"/mcp/{name}"
        mount = ServerConfig(name=name, url="", mount_path=mount_path, resource_url=f"{public_url}{mount_path}",
                             loc=sub.at(name), auth=parse_server_auth(v, ctx))
        v.done()
        key = os.urandom(32)
        if secret is not None:
            why = secret.check() if ctx.get("check_secrets", True) else None
            if why:
                v.error("cursor_secret", f"virtual_servers.{name}.cursor_secret ({secret}): {why}")
            elif ctx.get("check_secrets", True):
                key = secret.resolve().encode()
        out[name] = VirtualServerConfig(name, description, tuple(includes), mount, timeout, key, sub.at(name))
    return out


def _check_prefixes(name: str, includes: list[Include], problems: list[Problem]) -> None:
    """Two prefixes where one starts the other could publish one name for two origins."""
    for i, a in enumerate(includes):
        for b in includes[i + 1:]:
            if a.prefix.startswith(b.prefix) or b.prefix.startswith(a.prefix):
                problems.append(Problem(b.loc, f"virtual_servers.{name}: prefixes {a.prefix!r} ({a.server}) and "
                                               f"{b.prefix!r} ({b.server}) could publish the same name for two "
                                               "origins; give each origin a prefix that does not start another"))
