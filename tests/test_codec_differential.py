"""Differential properties of the one codec: what is checked is what every parser downstream reads.

For generated JSON texts, including the spellings parsers disagree on (duplicate
keys, NaN, huge exponents and integers, escapes, whitespace, a byte-order mark,
invalid UTF-8), either ``codec.loads`` refuses, or the bytes it forwards parse to
the very value it returned under orjson, the standard library, and a
first-key-wins parser.  The end-to-end property sends generated ``tools/call``
bodies through a running gateway to a recording upstream: either the gateway
refuses, or the upstream received bytes that all three parsers read as the value
the policy decided on.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.codec import CodecError, classify, loads
from tests.support.evil_upstream import EvilUpstream, http
from tests.support.gw_helpers import MODERN_VERSION, http_client, modern_headers

def first_key_wins(raw: bytes) -> Any:
    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in items:
            out.setdefault(k, v)
        return out
    return json.loads(raw, object_pairs_hook=pairs)


PARSERS = {"orjson": orjson.loads, "stdlib": json.loads, "first_key_wins": first_key_wins}

scalars = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2 ** 70), max_value=2 ** 70),
                    st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=8))
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=4), inner, max_size=4)), max_leaves=12)


def _spell_number(draw: Any, n: Any) -> str:
    if isinstance(n, bool) or n is None:
        return json.dumps(n)
    if isinstance(n, int):
        return draw(st.sampled_from([str(n), f"{n}.0", f"{n}e0", f"{n}E+0"])) if abs(n) < 2 ** 53 else str(n)
    return draw(st.sampled_from([repr(n), f"{n:e}", json.dumps(n)]))


@st.composite
def spelled(draw: Any, value: Any = None) -> bytes:
    """A JSON text for a generated value, spelled in one of the ways parsers disagree on."""
    if value is None:
        value = draw(values)

    def emit(v: Any) -> str:
        ws = draw(st.sampled_from(["", " ", "\n", "\t "]))
        if isinstance(v, dict):
            items = [f"{json.dumps(k, ensure_ascii=draw(st.booleans()))}{ws}:{ws}{emit(x)}" for k, x in v.items()]
            if items and draw(st.integers(0, 5)) == 0:               # a duplicate key, either order
                k = next(iter(v))
                dup = f"{json.dumps(k)}:{emit(draw(scalars))}"
                items.insert(draw(st.integers(0, len(items))), dup)
            return "{" + ws + ("," + ws).join(items) + ws + "}"
        if isinstance(v, list):
            return "[" + ",".join(emit(x) for x in v) + "]"
        if isinstance(v, str):
            return json.dumps(v, ensure_ascii=draw(st.booleans()))
        return _spell_number(draw, v)

    text = emit(value).encode()
    trick = draw(st.integers(0, 12))
    if trick == 0:
        text = b"\xef\xbb\xbf" + text
    elif trick == 1:
        text = text.replace(b"null", b"NaN", 1)
    elif trick == 2:
        text = text.replace(b"true", b"1e999", 1)
    elif trick == 3:
        text = text.replace(b"false", b"123456789012345678901234567890", 1)
    elif trick == 4:
        text = text + b"\xff"
    return text


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spelled())
def test_what_the_codec_forwards_parses_to_what_it_checked_under_every_parser(raw: bytes) -> None:
    try:
        value, forward = loads(raw)
    except CodecError:
        return
    for name, parse in PARSERS.items():
        assert parse(forward) == value, name
    # Where the input had no ambiguity, every parser already read it as the gateway did.
    if forward == raw:
        assert orjson.loads(raw) == value


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from(["jsonrpc", "id", "method", "params", "result", "error", "extra"]),
                       st.one_of(st.just("2.0"), st.integers(0, 3), st.text(max_size=3), st.just({}),
                                 st.just({"code": 1, "message": "m"}), st.none()), max_size=5))
def test_an_envelope_is_exactly_one_kind_or_refused(envelope: dict[str, Any]) -> None:
    try:
        msg = classify(envelope, orjson.dumps(envelope))
    except CodecError:
        return
    members = set(envelope)
    assert members <= {"jsonrpc", "id", "method", "params", "result", "error"}
    assert sum(k in members for k in ("method", "result", "error")) == 1


# -- end to end ------------------------------------------------------------------------

POLICY = """\
servers:
  rec:
    default: deny
    tools:
      - id: rec-echo-small
        match: echo
        destructive: allow
        arguments:
          type: object
          properties:
            count: {type: integer, maximum: 10}
"""


async def test_the_upstream_reads_exactly_what_the_policy_decided_on(gateway: Any, tmp_path: Path) -> None:
    up = await EvilUpstream().start()

    async def echo(evil: EvilUpstream, rid: Any, msg: dict[str, Any]) -> bytes:
        return http(200, json.dumps({"jsonrpc": "2.0", "id": rid, "result": {
            "content": [{"type": "text", "text": "ok"}]}}).encode())

    up.scripts["tools/call"] = echo
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "rec.yaml").write_text(POLICY)
    gw = await gateway.astart({"servers": {"rec": {"url": up.url, "pinning": {"mode": "off"}}},
                               "policies": str(tmp_path / "p")})
    bodies = []
    relayed = 0
    for n in (1, 11):                 # allowed, refused by the argument rule
        head = '{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"echo","arguments":'
        for args in (f'{{"count":{n}}}', f'{{"count":{n},"count":11}}', f'{{"count":11,"count":{n}}}',
                     f'{{"count":{n}.0}}', f'{{"count":{n}e0}}', '{"count":1e999}', '{"count":NaN}',
                     f'{{"count" : {n} }}', f'{{"\\u0063ount":{n}}}', f'{{"count":{n},"count":{n}}}',
                     '{"count":123456789012345678901234567890}'):
            bodies.append((head + args + "}}").encode())
    try:
        async with http_client() as client:
            for body in bodies:
                before = len(up.requests)
                async with client.post(gw.url("rec"), data=body, headers={
                        **modern_headers("tools/call", "echo"), "Accept": "application/json, text/event-stream",
                        "Content-Type": "application/json", "MCP-Protocol-Version": MODERN_VERSION}) as resp:
                    answer = await resp.read()
                forwarded = [b for m, _, b in up.requests[before:] if m == "POST"]
                if not forwarded:
                    continue          # refused (400) or denied by policy: nothing reached the upstream
                (sent,) = forwarded
                relayed += 1
                readings = {name: parse(sent) for name, parse in PARSERS.items()}
                assert len({json.dumps(r, sort_keys=True) for r in readings.values()}) == 1, (body, readings)
                n = readings["orjson"]["params"]["arguments"]["count"]
                assert isinstance(n, (int, float)) and n <= 10, (body, sent, answer)
        assert relayed >= 5      # the allowed spellings did reach the upstream: the property is not vacuous
    finally:
        await up.stop()
