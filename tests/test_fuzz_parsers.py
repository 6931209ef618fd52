"""Fuzzing the parsers the gateway owns (targets in ``tests/fuzz/targets.py``).

Three layers, all bounded for CI:

* every file of the seed corpus ``tests/fuzz/corpus/<target>/`` (which holds each
  crash the fuzzers found, named ``crash-*``) replays through its target;
* hypothesis properties, derandomised, with generators that know each format
  (JSON-RPC envelopes, SSE events, base64 header values, JOSE headers, YAML trees);
* atheris, coverage-guided, one subprocess per target for ``FUZZ_SECONDS`` (default
  40 in CI, where the suite must stay under 15 minutes; ``make fuzz`` runs them for 600).

A target returns when the parser handled the input (accepted, or refused with its
own error) and raises anything else.
"""
from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.config.model import load_config
from gateway.errors import ConfigError, GatewayError
from gateway.inspect.sse import SSEFramer, SSETooLarge
from gateway.stages.parse import decode_header_value
from tests.fuzz import targets
from tests.fuzz.targets import TARGETS, timed

ROOT = Path(__file__).resolve().parent.parent
CORPUS = Path(__file__).parent / "fuzz" / "corpus"
FUZZ_SECONDS = int(os.environ.get("FUZZ_SECONDS", "40"))

BOUNDED = settings(max_examples=300, derandomize=True, deadline=None, database=None,
                   suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# -- the corpus, crashes included ---------------------------------------------------------

CASES = sorted((t, p.name) for t in TARGETS for p in (CORPUS / t).iterdir())


@pytest.mark.parametrize(("target", "name"), CASES, ids=[f"{t}/{n}" for t, n in CASES])
def test_every_corpus_input_is_handled_within_the_time_bound(target: str, name: str) -> None:
    timed(TARGETS[target], (CORPUS / target / name).read_bytes())


# -- regressions for the crashes found, each asserting the clear error it now gets --------

@pytest.mark.parametrize("value", ["=?base64?w6k?=", "=?base64?é?=", "=?base64?\udcff?=", "=?base64?//79?="])
def test_a_malformed_base64_header_value_is_a_400_header_malformed(value: str) -> None:
    with pytest.raises(GatewayError) as caught:
        decode_header_value(value)
    assert (caught.value.status, caught.value.reason) == (400, "header_malformed")


@pytest.mark.parametrize(("key", "value", "field"), [
    ("public_url", "http://127.0.0.1:8080 x", "public_url"),
    ("public_url", "http://[::1:8080", "public_url"),
    ("server_url", "http://[::1/mcp", "servers.up.url"),
    ("server_url", "http://127.0.0.1:99999/mcp", "servers.up.url"),
])
def test_a_url_urlsplit_refuses_is_a_config_problem_not_a_traceback(tmp_path: Path, key: str, value: str,
                                                                     field: str) -> None:
    config: dict[str, Any] = {"public_url": "http://127.0.0.1:8080", "auth": {"mode": "none"},
                              "servers": {"up": {"url": "http://127.0.0.1:3001/mcp"}}}
    if key == "public_url":
        config["public_url"] = value
    else:
        config["servers"]["up"]["url"] = value
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(ConfigError) as caught:
        load_config(str(path), check_secrets=False)
    assert any(field.split(".")[-1] in p.message or field in p.message for p in caught.value.problems)


# -- hypothesis: generators that know the formats -------------------------------------------

json_scalars = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2 ** 65), max_value=2 ** 65),
                         st.floats(), st.text(max_size=6))
json_values = st.recursive(json_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=3), inner, max_size=3)), max_leaves=10)
members = st.dictionaries(st.sampled_from(["jsonrpc", "id", "method", "params", "result", "error", "x"]),
                          st.one_of(st.just("2.0"), st.just("tools/call"), json_values), max_size=5)


@st.composite
def json_texts(draw: Any) -> bytes:
    """JSON-RPC-shaped texts, then damaged: truncated, a byte flipped, nested deep, or a NUL added."""
    text = json.dumps(draw(members), allow_nan=True).encode()
    how = draw(st.sampled_from(["as_is", "truncate", "flip", "deep", "nul", "bom", "dup"]))
    if how == "truncate" and text:
        return text[:draw(st.integers(0, len(text) - 1))]
    if how == "flip" and text:
        i = draw(st.integers(0, len(text) - 1))
        return text[:i] + bytes([draw(st.integers(0, 255))]) + text[i + 1:]
    if how == "deep":
        depth = draw(st.integers(250, 600))
        return b'{"jsonrpc":"2.0","id":1,"result":' + b"[" * depth + b"]" * depth + b"}"
    if how == "nul":
        return text.replace(b":", b":\x00", 1)
    if how == "bom":
        return b"\xef\xbb\xbf" + text
    if how == "dup":
        return text[:-1] + b',"id":1}' if text.endswith(b"}") and len(text) > 2 else text
    return text


@BOUNDED
@given(json_texts())
def test_codec_refuses_with_codec_error_or_agrees_with_json_and_round_trips(raw: bytes) -> None:
    timed(targets.codec_target, raw)


@BOUNDED
@given(st.binary(max_size=512))
def test_codec_handles_arbitrary_bytes(raw: bytes) -> None:
    timed(targets.codec_target, raw)


@pytest.mark.parametrize("step", [1, 100, 10_000])
def test_an_oversized_event_is_refused_whether_it_arrives_whole_or_in_pieces(step: int) -> None:
    """Regression (the other fuzz branch's chunking property): one chunk holding a whole
    oversized event passed the limit that the same bytes in pieces hit."""
    stream = b"data: " + b"a" * 5000 + b"\n\n"
    framer = SSEFramer(4096)
    with pytest.raises(SSETooLarge):
        for at in range(0, len(stream), step):
            framer.feed(stream[at:at + step])


sse_lines = st.lists(st.one_of(
    st.builds(lambda k, v: f"{k}:{v}", st.sampled_from(["data", "event", "id", "retry", "", "x"]),
              st.text(max_size=12)),
    st.sampled_from(["", ":comment", "data", "\ufeffdata: x"])), max_size=8)


@BOUNDED
@given(sse_lines, st.sampled_from(["\n", "\r\n", "\r"]), st.integers(0, 255), st.binary(max_size=8))
def test_sse_framing_is_lossless_and_independent_of_chunking(lines: list[str], eol: str, step: int,
                                                             junk: bytes) -> None:
    body = eol.join(lines).encode("utf-8", "surrogatepass") + eol.encode() * 2 + junk
    timed(targets.sse_target, bytes([step]) + body)


@BOUNDED
@given(st.text(max_size=40).filter(lambda s: "\r" not in s),
       st.one_of(st.none(), st.text(alphabet=st.characters(blacklist_characters="\r\n"), max_size=10)),
       st.one_of(st.none(), st.text(alphabet=st.characters(blacklist_characters="\r\n"), max_size=10)))
def test_an_encoded_sse_event_frames_back_to_its_fields(data: str, event: str | None, event_id: str | None) -> None:
    targets.sse_roundtrip(data, event, event_id)


@BOUNDED
@given(st.one_of(st.binary(max_size=64), st.text(max_size=32).map(lambda t: t.encode("utf-8", "surrogatepass")),
                 st.binary(max_size=48).map(lambda b: base64.b64encode(b))))
def test_header_values_decode_or_are_refused_as_header_malformed(raw: bytes) -> None:
    timed(targets.header_target, raw)


jose = st.dictionaries(st.sampled_from(["alg", "typ", "kid", "jwk", "jku", "x5u", "x5c", "crit", "b64"]),
                       st.one_of(st.sampled_from(["ES256", "RS256", "none", "HS256", "at+jwt", "JWT", "k1"]),
                                 json_values), max_size=5)
claims = st.dictionaries(st.sampled_from(["iss", "sub", "aud", "exp", "nbf", "iat", "scope"]),
                         st.one_of(st.just(targets.JWT_ISSUER), json_values), max_size=6)


@BOUNDED
@given(jose, claims, st.binary(max_size=80))
def test_a_forged_jwt_header_is_refused_with_an_auth_failure_before_any_key(header: dict, body: dict,
                                                                             sig: bytes) -> None:
    raw = json.dumps(header, allow_nan=True).encode() + b"\x00" + json.dumps(body, allow_nan=True).encode()
    timed(targets.jwt_target, b"\x00" + raw + b"\x00" + sig)


@BOUNDED
@given(st.text(alphabet="abcXYZ019-_.= \t\x00", max_size=80))
def test_a_malformed_compact_jws_is_refused(token: str) -> None:
    timed(targets.jwt_target, b"\x01" + token.encode())


yaml_scalars = st.one_of(st.none(), st.booleans(), st.integers(-2 ** 70, 2 ** 70), st.floats(allow_nan=False),
                         st.sampled_from(["no", "on", "1:30", "0777", "10s", "1 MiB", "http://[::1", "*", "!x"]),
                         st.text(max_size=10))
config_keys = st.sampled_from(["listen", "admin", "public_url", "store", "auth", "limits", "http", "logging",
                               "tracing", "servers", "policies", "pins", "host", "port", "mode", "url", "up",
                               "issuers", "issuer", "max_body_bytes", "read_timeout", "pinning", "tools",
                               "allow", "deny", "rules", "default", "server", "when", "arguments"])
yaml_trees = st.recursive(yaml_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(config_keys, inner, max_size=4)), max_leaves=14)


@BOUNDED
@given(yaml_trees)
def test_any_config_tree_gives_problems_never_a_traceback(tree: Any) -> None:
    timed(targets.config_target, yaml.safe_dump(tree, allow_unicode=True).encode())


@BOUNDED
@given(yaml_trees)
def test_any_policy_tree_gives_problems_never_a_traceback(tree: Any) -> None:
    timed(targets.policy_target, yaml.safe_dump(tree, allow_unicode=True).encode())


@BOUNDED
@given(st.sampled_from(sorted((CORPUS / "config").iterdir()) + sorted((CORPUS / "policy").iterdir())),
       st.integers(0, 4000), st.binary(min_size=1, max_size=12))
def test_a_damaged_real_config_or_policy_file_gives_problems_never_a_traceback(path: Path, at: int,
                                                                                 patch: bytes) -> None:
    text = path.read_bytes()
    at %= len(text) + 1
    damaged = text[:at] + patch + text[at + len(patch):]
    timed(targets.config_target if path.parent.name == "config" else targets.policy_target, damaged)


# -- atheris: coverage-guided, one subprocess per target ------------------------------------

_STAT = re.compile(r"stat::(number_of_executed_units|average_exec_per_sec|new_units_added):\s+(\d+)")


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_the_coverage_guided_fuzzer_finds_no_crash(target: str, tmp_path: Path) -> None:
    work = tmp_path / "corpus"
    work.mkdir()
    argv = [sys.executable, "-m", "tests.fuzz.run", target, str(work), str(CORPUS / target),
            f"-max_total_time={FUZZ_SECONDS}", "-timeout=10", "-rss_limit_mb=1024", "-print_final_stats=1",
            f"-artifact_prefix={tmp_path}/", "-close_fd_mask=1"]
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=FUZZ_SECONDS + 120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    stats = dict(_STAT.findall(proc.stderr))
    crashes = [p.name for p in tmp_path.iterdir() if p.name.startswith(("crash-", "timeout-", "oom-"))]
    # libFuzzer prints the finding ("Uncaught Python exception" and its traceback) before its
    # statistics: show that part, and the input, so a CI failure can be replayed from its log.
    found = proc.stderr.find("=== Uncaught Python exception")
    report = proc.stderr[max(found, 0):][:3000] if found >= 0 else proc.stderr[-3000:]
    inputs = {name: (tmp_path / name).read_bytes()[:400] for name in crashes}
    assert proc.returncode == 0 and not crashes, (inputs, report)
    assert int(stats.get("number_of_executed_units", 0)) > 0, proc.stderr[-2000:]
    print(f"fuzz {target}: {stats}")
