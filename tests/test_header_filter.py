"""The forwarder's memoised header filter agrees with the plain per-header loop."""
from __future__ import annotations

import random

from multidict import CIMultiDict, CIMultiDictProxy

from gateway.upstream import _DROP_REQUEST, _DROP_RESPONSE, _HeaderFilter

NAMES = ["Host", "host", "Accept", "Content-Type", "Authorization", "AUTHORIZATION", "Cookie", "Mcp-Session-Id",
         "mcp-session-id", "X-Custom", "x-custom", "Content-Length", "Mcp-Method", "Set-Cookie", "Server", "Date"]


def _expected(headers: CIMultiDictProxy[str], drop: frozenset[str]) -> dict[str, str]:
    return {k: v for k, v in headers.items() if k.lower() not in drop}


def test_memoised_plans_give_what_the_loop_gives() -> None:
    rng = random.Random(3)
    for drop in (_DROP_REQUEST, _DROP_RESPONSE):
        hf = _HeaderFilter(drop)
        shapes = [[rng.choice(NAMES) for _ in range(rng.randint(0, 9))] for _ in range(40)]
        for _ in range(3):          # cold, then from the memo
            for shape in shapes:
                headers = CIMultiDictProxy(CIMultiDict((n, f"{n}-{rng.random()}") for n in shape))
                kept = hf.keep(headers)
                assert dict(kept) == _expected(headers, drop)
                assert list(CIMultiDict(kept).items()) == [(k, v) for k, v in headers.items()
                                                           if k.lower() not in drop]


def test_plans_are_bounded() -> None:
    hf = _HeaderFilter(_DROP_REQUEST)
    for i in range(1000):
        hf.keep(CIMultiDictProxy(CIMultiDict([(f"X-{i}", "v"), ("Authorization", "secret")])))
        assert len(hf.plans) <= 256
    assert dict(hf.keep(CIMultiDictProxy(CIMultiDict([("X-1", "v"), ("Authorization", "s")])))) == {"X-1": "v"}
