"""Rate and concurrency limits as written in the policy files: parsed once, frozen.

A server section's ``limits`` list::

    limits:
      - id: search-per-user
        match: {tools: ["search_*"]}        # and/or methods: [...]
        key: [principal]                   # any of: principal, client, server, tool, global, claim:<name>
        windows:
          - {limit: 60, per: 1m, burst: 10}   # GCRA: 60 a minute sustained, 10 at once
        cost: 1                            # per call (default 1)
      - id: inflight-per-user
        match: {tools: ["*"]}
        key: [principal]
        concurrency: 4                     # calls in flight at once
        on_store_error: open               # default closed: 503 when the store cannot answer

Semantics of a window (GCRA, identical in the memory store and Redis): calls are
spaced ``T = per / limit`` apart on average, and up to ``burst`` (default
``limit``) may arrive at once; over any interval of length ``W`` at most
``burst + limit * W / per`` calls are admitted.
"""
from __future__ import annotations

import math

from dataclasses import dataclass
from typing import Any

from ..config.reader import Reader
from ..config.yamlloc import Loc
from ..errors import Problem
from ..policy.glob import GlobError, compile_glob

KEY_PARTS = ("principal", "client", "server", "tool", "global")
CLOSED, OPEN = "closed", "open"


@dataclass(frozen=True, slots=True)
class Window:
    limit: int
    per: float
    burst: int

    @property
    def interval(self) -> float:          # GCRA emission interval T
        return self.per / self.limit

    @property
    def tolerance(self) -> float:         # how far ahead of now the theoretical arrival time may run
        return self.interval * self.burst


@dataclass(frozen=True, slots=True, eq=False)
class Limit:
    id: str
    server: str
    loc: Loc
    tools: tuple[Any, ...] = ()          # globs over tools/call names
    methods: tuple[Any, ...] = ()        # globs over method names
    key: tuple[str, ...] = ("principal",)
    windows: tuple[Window, ...] = ()
    cost: int = 1
    concurrency: int | None = None
    on_store_error: str = CLOSED

    def applies(self, method: str | None, tool: str | None) -> bool:
        if tool is not None and method == "tools/call" and any(g.regex.fullmatch(tool) for g in self.tools):
            return True
        return method is not None and any(g.regex.fullmatch(method) for g in self.methods)

    def policy_name(self, window: Window | None) -> str:
        """The policy item's name: the id, or ``<id>/<n>`` for the n-th of several windows
        (each item of ``RateLimit-Policy`` needs its own name)."""
        if window is None or len(self.windows) < 2:
            return self.id
        return f"{self.id}/{self.windows.index(window)}"

    def policy_header(self) -> str:
        """This limit's IETF ``RateLimit-Policy`` item(s)."""
        return ", ".join(f'"{self.policy_name(w)}";q={w.limit};w={math.ceil(w.per)}' for w in self.windows)


def parse_limits(s: Reader, server: str) -> tuple[Limit, ...]:
    out = []
    items = s.list("limits")
    for i, item in enumerate(items):
        r = Reader(item, s.problems, f"{s.path}.limits[{i}]", items.at(i))
        limit = _limit(r, server)
        if limit is not None:
            out.append(limit)
    return tuple(out)


def _limit(r: Reader, server: str) -> Limit | None:
    if not r.ok:
        return None
    before = len(r.problems)
    from ..policy.parse import RULE_ID       # the same id syntax as rules (test cases name them)
    lid = r.str("id", required=True, pattern=RULE_ID)
    r.str("description")
    match = r.mapping("match", required=True)
    tools = _globs(match, "tools")
    methods = _globs(match, "methods")
    match.done()
    if not tools and not methods and match.ok:
        r.error("match", f"{r.path}.match needs tools and/or methods")
    key = r.str_list("key", ("principal",))
    for part in key:
        if part not in KEY_PARTS and not (part.startswith("claim:") and len(part) > 6):
            r.error("key", f"key part {part!r} must be one of {', '.join(KEY_PARTS)} or claim:<name>")
    windows = []
    wl = r.list("windows")
    for j, node in enumerate(wl):
        w = Reader(node, r.problems, f"{r.path}.windows[{j}]", wl.at(j))
        limit = w.int("limit", None, required=True, min=1)
        per = w.duration("per", 0.0, min=0.001)
        if not w.has("per"):
            w.error(None, f"{w.path}.per is required (e.g. 1s, 1m, 1h)")
        burst = w.int("burst", limit, min=1)
        w.done()
        if limit and per:
            windows.append(Window(int(limit), float(per), int(burst or limit)))
    cost = r.int("cost", 1, min=1)
    concurrency = r.int("concurrency", None, min=1)
    mode = r.str("on_store_error", CLOSED, choices=(CLOSED, OPEN)) or CLOSED
    if not windows and concurrency is None and r.ok:
        r.error(None, f"{r.path} needs windows and/or concurrency")
    r.done()
    if len(r.problems) > before or lid is None:
        return None
    return Limit(lid, server, r.loc, tools, methods, tuple(key), tuple(windows), int(cost or 1),
                 concurrency, mode)


def _globs(r: Reader, key: str) -> tuple[Any, ...]:
    names = r.str_list(key)
    out = []
    for text in names:
        try:
            out.append(compile_glob(text))
        except GlobError as exc:
            r.problems.append(Problem(r.at(key), f"invalid glob {text!r}: {exc}"))
    return tuple(out)
