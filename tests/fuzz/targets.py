"""Fuzz targets over the parsers the gateway owns: one function per parser, bytes in.

Each target feeds one input to a parser and checks its properties; it returns
normally when the input was handled (accepted, or refused with the parser's own
error), and raises anything else, which is a finding.  The same functions run
under hypothesis (``tests/test_fuzz_parsers.py``) and under atheris, the
coverage-guided fuzzer (``tests/fuzz/run.py``), so a crash either one finds
replays in the other.

What each parser may raise when it refuses (the gateway's own errors):

=========  ======================================  =====================================
target     parser                                  refusal
=========  ======================================  =====================================
codec      ``codec.decode``/``loads``/``media_type``  ``CodecError``
sse        ``SSEFramer.feed``/``flush``              ``SSETooLarge``
header     ``parse.decode_header_value``             ``HeaderMismatch`` (a ``GatewayError``)
config     ``yamlloc.load_text`` + ``parse_config``  problems / ``ConfigError``
policy     ``load_text`` + ``policy.load.build`` + lint  problems / ``ConfigError``
jwt        ``JwtVerifier.verify`` up to the key      ``AuthFailure``
=========  ======================================  =====================================
"""
from __future__ import annotations

import asyncio
import base64
import json
import math
import os
import tempfile
import time
from typing import Any, Callable

import orjson

from gateway import codec
from gateway.auth.config import IssuerConfig
from gateway.auth.keys import KeySet
from gateway.auth.verify import AuthFailure, JwtVerifier
from gateway.config.model import parse_config
from gateway.config.yamlloc import load_text
from gateway.errors import ConfigError, GatewayError
from gateway.inspect.sse import SSEFramer, SSETooLarge, encode_event
from gateway.policy.lint import lint
from gateway.policy.load import Sources, build
from gateway.stages.parse import decode_header_value

# Every input must be handled within this (seconds).  A parse takes ~1 ms; the bound is generous
# because shared CI machines (and atheris instrumentation) slow everything down tenfold.
TIME_BOUND = float(os.environ.get("FUZZ_TIME_BOUND", "5"))
MAX_LEN = 4096           # fuzz input size: past the parsers' interesting structure, under their limits


def codec_target(data: bytes) -> None:
    """Strict JSON-RPC codec: refuse with CodecError or agree with ``json`` and round-trip."""
    for raw in (data, data.decode("utf-8", "surrogatepass") if _utf8ish(data) else None):
        if raw is None:
            continue
        try:
            value, forward = codec.loads(raw)
        except codec.CodecError:
            continue
        # Agreement with the json module on what the codec accepts (the codec is a subset).
        text = raw if isinstance(raw, str) else raw.decode("utf-8")
        assert json.loads(text) == value, "codec value differs from json.loads"
        # What is forwarded parses, under both parsers, to the value that was checked.
        assert orjson.loads(forward) == value and json.loads(forward) == value
        assert codec.loads(forward) == (value, forward), "forwarded bytes are not a fixed point"
        try:
            msg = codec.classify(value, forward)
        except codec.CodecError:
            continue
        again = codec.decode(msg.raw)
        assert (again.kind, again.value, again.raw) == (msg.kind, msg.value, msg.raw)
        assert not codec.deeper_than(value, 255)
    kind, problem = codec.media_type(data.decode("latin-1"))
    assert (kind is None) != (problem is None)


def _utf8ish(data: bytes) -> bool:
    try:
        data.decode("utf-8", "surrogatepass")
        return True
    except UnicodeDecodeError:
        return False


SSE_LIMIT = 1024


def sse_target(data: bytes) -> None:
    """SSE framer: lossless, independent of chunk boundaries, bounded per event."""
    # The first byte picks the chunk size: upstream chunk boundaries must mean nothing.
    step = (data[0] % 17 + 1) if data else 1
    body = data[1:]
    whole = _frame([body])
    chunked = _frame([body[i:i + step] for i in range(0, len(body), step)])
    assert whole == chunked, "framing depends on chunk boundaries"
    events, tail, too_large = whole
    if not too_large:
        assert b"".join(events) + tail == body, "framing lost or invented bytes"


def _frame(chunks: list[bytes]) -> tuple[list[bytes], bytes, bool]:
    framer = SSEFramer(SSE_LIMIT)
    events: list[bytes] = []
    try:
        for chunk in chunks:
            for ev in framer.feed(chunk):
                assert ev.raw[-1:] in (b"\n", b"\r"), "an event came out before its blank line"
                events.append(ev.raw)
    except SSETooLarge:
        return events, b"", True
    last = framer.flush()
    return events, last.raw if last is not None else _tail_blank(chunks, events), False


def _tail_blank(chunks: list[bytes], events: list[bytes]) -> bytes:
    """What ``flush`` drops: an all-whitespace tail (nothing to relay)."""
    body = b"".join(chunks)
    rest = body[len(b"".join(events)):]
    assert not rest.strip(), "flush dropped a non-blank tail"
    return rest


def sse_roundtrip(data: str, event: str | None, event_id: str | None) -> None:
    """``encode_event`` then framing gives the same data, event and id back."""
    raw = encode_event(data, event=event, id=event_id)
    (ev,) = SSEFramer(len(raw) + 1).feed(raw)
    assert ev.raw == raw and ev.data == data and ev.event == event
    assert ev.id == (event_id if event_id is not None and "\x00" not in event_id else None)


def header_target(data: bytes) -> None:
    """``Mcp-*`` header decoding: refuse with HeaderMismatch, or give text that round-trips."""
    value = data.decode("latin-1")            # aiohttp hands header values over as latin-1 text
    for candidate in (value, "=?base64?" + value + "?="):
        try:
            decoded = decode_header_value(candidate)
        except GatewayError as exc:
            assert exc.status == 400 and exc.reason == "header_malformed"
            continue
        assert isinstance(decoded, str)
        if candidate.startswith("=?base64?") and candidate.endswith("?=") and len(candidate) >= 11:
            encoded = "=?base64?" + base64.b64encode(decoded.encode()).decode() + "?="
            assert decode_header_value(encoded) == decoded
    text = data.decode("utf-8", "replace")
    assert decode_header_value("=?base64?" + base64.b64encode(text.encode()).decode() + "?=") == text


_WORKDIR = tempfile.mkdtemp(prefix="gw-fuzz-")
_CONFIG_PATH = os.path.join(_WORKDIR, "gateway.yaml")


def config_target(data: bytes) -> None:
    """Config YAML (what ``mcp-gateway check`` and ``serve`` run): problems, never a crash."""
    text = _yaml_text(data)
    if text is None:
        return
    node, problems = load_text(text, _CONFIG_PATH)
    if node is None and problems:
        return
    try:
        parse_config(node, _CONFIG_PATH, problems, check_secrets=False)
    except ConfigError:
        pass
    assert all(p.loc.file for p in problems)


def policy_target(data: bytes) -> None:
    """Policy YAML: parsed, checked for duplicates, linted; problems, never a crash."""
    text = _yaml_text(data)
    if text is None:
        return
    path = os.path.join(_WORKDIR, "policy.yaml")
    try:
        policies, problems = build(Sources(_WORKDIR, ((path, text),), "fuzz"), ("up", "files"))
        if policies is not None:
            lint(policies, issuer_scopes=("read", "write"), server_scopes={"up": ("read",)})
    except ConfigError:
        pass


def _yaml_text(data: bytes) -> str | None:
    try:
        return data.decode("utf-8")            # load_file refuses non-UTF-8 before the parser
    except UnicodeDecodeError:
        return None


JWT_ISSUER = "https://issuer.fuzz.invalid"
_loop: asyncio.AbstractEventLoop | None = None
_verifier: JwtVerifier | None = None


def _jwt_verifier() -> tuple[asyncio.AbstractEventLoop, JwtVerifier]:
    """One verifier whose issuer has keys loaded and a long refetch cool-down: no network."""
    global _loop, _verifier
    if _verifier is None:
        from cryptography.hazmat.primitives.asymmetric import ec
        from gateway.auth.keys import Key
        _loop = asyncio.new_event_loop()
        keys = KeySet(IssuerConfig(issuer=JWT_ISSUER, jwks_cooldown=1e9), timeout=1.0)
        key = ec.generate_private_key(ec.SECP256R1()).public_key()
        keys.install([Key("k1", key, "ES256")])
        keys.kid_fetched_at = time.monotonic()  # cooling down: an unknown kid never fetches
        _verifier = JwtVerifier({JWT_ISSUER: keys})
    assert _loop is not None
    return _loop, _verifier


def _b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def jwt_target(data: bytes) -> None:
    """JWT header and claims parsing before the signature: refuse with AuthFailure, never crash.

    The first byte picks the form: a raw Authorization token, or header/claims/signature
    segments split from the rest and base64url-encoded (so mutations reach the JSON).
    """
    if not data:
        return
    mode, rest = data[0], data[1:]
    if mode % 2:
        token = rest.decode("latin-1")
    else:
        head, _, tail = rest.partition(b"\x00")
        claims, _, sig = tail.partition(b"\x00")
        token = f"{_b64url(head)}.{_b64url(claims)}.{_b64url(sig)}"
    loop, verifier = _jwt_verifier()
    try:
        loop.run_until_complete(verifier.verify(token, frozenset({JWT_ISSUER})))
    except AuthFailure as exc:
        assert exc.status in (400, 401, 503) and exc.reason.replace("_", "").isalnum()
        return
    raise AssertionError("a token with a random signature verified")


TARGETS: dict[str, Callable[[bytes], None]] = {
    "codec": codec_target, "sse": sse_target, "header": header_target,
    "config": config_target, "policy": policy_target, "jwt": jwt_target,
}


def timed(target: Callable[[bytes], None], data: bytes) -> None:
    """Run one input and hold it to the time bound."""
    start = time.perf_counter()
    target(data)
    elapsed = time.perf_counter() - start
    assert elapsed < TIME_BOUND, f"{len(data)}-byte input took {elapsed:.2f} s"
