"""The forwarder's memoised header filters agree with the plain per-header loop.

Requests: only allow-listed names (plus ``Mcp-Param-*`` and a server's ``forward_headers``)
reach an upstream, decided on the lower-case name, so a name spelled with ``_`` never
matches.  Responses: the drop list.
"""
from __future__ import annotations

import random

from multidict import CIMultiDict, CIMultiDictProxy

from gateway.upstream import _DROP_RESPONSE, _RESPONSE_FILTER, FORWARDED, _request_filter

NAMES = ["Host", "host", "Accept", "Content-Type", "Authorization", "AUTHORIZATION", "Cookie", "Mcp-Session-Id",
         "mcp-session-id", "Mcp_Session_Id", "X-Custom", "x-custom", "Content-Length", "Mcp-Method", "MCP_METHOD",
         "Set-Cookie", "Server", "Date", "Mcp-Param-Region", "X-Tenant", "Last-Event-ID", "X-Forwarded-For",
         "X_Forwarded_For", "traceparent"]


def _allowed(name: str) -> bool:
    n = name.lower()
    return n in FORWARDED or n in {"x-tenant"} or n.startswith("mcp-param-")


def test_memoised_plans_give_what_the_loop_gives() -> None:
    rng = random.Random(3)
    cases = [(_request_filter(frozenset({"x-tenant"})), _allowed),
             (_RESPONSE_FILTER, lambda n: n.lower() not in _DROP_RESPONSE)]
    for hf, keep in cases:
        shapes = [[rng.choice(NAMES) for _ in range(rng.randint(0, 9))] for _ in range(40)]
        for _ in range(3):          # cold, then from the memo
            for shape in shapes:
                headers = CIMultiDictProxy(CIMultiDict((n, f"{n}-{rng.random()}") for n in shape))
                kept = hf.keep(headers)
                assert list(kept) == [(k, v) for k, v in headers.items() if keep(k)]


def test_only_the_allow_list_reaches_an_upstream() -> None:
    hf = _request_filter(frozenset())
    headers = CIMultiDictProxy(CIMultiDict([(n, "v") for n in NAMES]))
    assert sorted({k.lower() for k, _ in hf.keep(headers)}) == [
        "accept", "content-type", "mcp-method", "mcp-param-region"]   # traceparent: rebuilt by tracing


def test_plans_are_bounded() -> None:
    hf = _request_filter(frozenset())
    for i in range(1000):
        hf.keep(CIMultiDictProxy(CIMultiDict([(f"X-{i}", "v"), ("Accept", "a"), ("Authorization", "secret")])))
        assert len(hf.plans) <= 256
    assert dict(hf.keep(CIMultiDictProxy(CIMultiDict([("Accept", "v"), ("Authorization", "s")])))) == {"Accept": "v"}
