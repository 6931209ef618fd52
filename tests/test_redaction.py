"""Secrets never reach a log line: the scrubber, the structlog chain and the audit writer."""
from __future__ import annotations

import io
import json
from pathlib import Path

import orjson
import pytest
import structlog

from gateway.telemetry.audit import AuditWriter
from gateway.telemetry.logging import configure_logging
from gateway.telemetry.redact import REDACTED, redact_processor, redact_value, scrub

JWT = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2lnbmF0dXJlLWJ5dGVz"

SECRETS = [
    ("a bearer header", f"Bearer {JWT}"),
    ("a lower-case bearer", "bearer abcdefghijklmnop"),
    ("a bare JWT inside text", f"token was {JWT} today"),
    ("an OpenAI-style key", "sk-proj-abcdefghijklmnopqrstuvwx"),
    ("a GitHub token", "ghp_abcdefghijklmnopqrstuvwxyz0123456789"),
    ("a Slack token", "xoxb-1234567890-abcdefghij"),
    ("an AWS access key id", "AKIAIOSFODNN7EXAMPLE"),
    ("a Google API key", "AIzaSyA-abcdefghijklmnopqrstuvwxyz0123"),
    ("a PEM private key", "-----BEGIN RSA PRIVATE KEY-----\nMIIE..."),
    ("credentials in a URL", "redis://admin:hunter2secret@10.0.0.5:6379/0"),
    ("a token in a query string", "https://x.example/cb?access_token=abcdef123456&state=1"),
    ("a client secret in a form", "grant_type=client_credentials&client_secret=s3cr3tvalue"),
    ("an authorization code in a callback URL", "https://c.example/cb?code=abcdefghijklmnop&state=1"),
    ("a PKCE verifier", "code_verifier=abcdefghijklmnopqrstuvwxyz"),
    ("a password assignment", "connect password=hunter2secret now"),
    ("a secret: value line", "secret: s3cr3tvalue"),
    ("a JSON refresh token", '{"refresh_token": "abcdefghijklmnop"}'),
    ("a whole PEM key", "-----BEGIN PRIVATE KEY-----\nMIIEabcdefghijklmnop+/=\n-----END PRIVATE KEY-----"),
    ("a basic credential", "Authorization: Basic aHVudGVyMnNlY3JldDp4"),
    ("a GitLab token", "glpat-abcdefghijklmnopqrstu"),
    ("a Stripe live key", "sk_live_abcdefghijklmnopqrstuv"),
    ("an AWS session key id", "ASIAIOSFODNN7EXAMPLE"),
    ("an Azure connection string", "DefaultEndpointsProtocol=https;AccountKey=hunter2secret+/==;x=y"),
]


@pytest.mark.parametrize(("what", "secret"), SECRETS, ids=[w for w, _ in SECRETS])
def test_scrub_removes_every_kind_of_credential(what: str, secret: str) -> None:
    out = scrub(secret)
    assert REDACTED in out
    for fragment in ("abcdefghijklmnop", "hunter2secret", "s3cr3tvalue", "IOSFODNN7", JWT):
        assert fragment not in out


@pytest.mark.parametrize("text", ["anonymous", "bench-echo", "tools/call", "http://127.0.0.1:8080/mcp/a",
                                  "read_file", "policy denied: Unknown tool: delete_file", "exit code 1 at 12:00",
                                  "max_tokens=100", '{"error": {"code": -32000}}'])
def test_scrub_leaves_ordinary_text_alone(text: str) -> None:
    assert scrub(text) == text


@pytest.mark.parametrize("key", ["authorization", "Cookie", "client_secret", "api_key", "password",
                                 "refresh_token", "x-api-key", "private_key"])
def test_values_under_sensitive_keys_are_replaced_whole(key: str) -> None:
    assert redact_value(key, "short") == REDACTED
    assert redact_processor(None, "info", {"event": "x", key: "anything at all"})[key] == REDACTED


def test_nested_values_are_scrubbed() -> None:
    event = {"event": "x", "request": {"headers": {"Authorization": f"Bearer {JWT}"},
                                       "notes": [f"saw {JWT}"]}}
    out = redact_processor(None, "info", event)
    assert JWT not in orjson.dumps(out).decode()


def test_structlog_events_are_redacted_before_rendering() -> None:
    stream = io.BytesIO()
    configure_logging("debug", stream=stream)
    try:
        structlog.get_logger("t").warning("upstream.failed", detail=f"Authorization: Bearer {JWT}",
                                          token="plain-secret-value", url="https://u:pw12345@h/x")
        line = stream.getvalue().decode()
        assert JWT not in line and "plain-secret-value" not in line and "pw12345" not in line
        assert orjson.loads(line.splitlines()[-1])["event"] == "upstream.failed"
    finally:
        configure_logging("info")


def test_the_audit_writer_batches_whole_lines() -> None:
    stream = io.BytesIO()
    writer = AuditWriter(stream)
    writer.write(b'{"a":1}')
    writer.write(b'{"b":2}')
    writer.flush()
    assert stream.getvalue() == b'{"a":1}\n{"b":2}\n'


def _audit_line(monkeypatch: pytest.MonkeyPatch, **attrs: object) -> dict[str, object]:
    """The audit record ``audit.finish`` writes for an exchange with ``attrs`` set."""
    from aiohttp.test_utils import make_mocked_request

    from gateway.pipeline import Exchange
    from gateway.telemetry import audit

    stream = io.BytesIO()
    monkeypatch.setattr(audit, "WRITER", AuditWriter(stream))
    server = type("S", (), {"name": "a"})()
    ex = Exchange(make_mocked_request("POST", "/mcp/a"), server)   # type: ignore[arg-type]
    for name, value in attrs.items():
        setattr(ex, name, value)
    audit.start(ex)
    audit.finish(ex)
    audit.WRITER.flush()
    return orjson.loads(stream.getvalue())


@pytest.mark.parametrize("field", ["principal", "issuer", "client_id"])
def test_the_audit_record_scrubs_token_claims(monkeypatch: pytest.MonkeyPatch, field: str) -> None:
    from gateway.pipeline import Principal

    attr = {"principal": "name", "issuer": "issuer", "client_id": "client_id"}[field]
    for _ in range(2):      # the second time from the memo
        kwargs = {"issuer": "https://as.example", "subject": "s", attr: f"Bearer {JWT}"}
        p = Principal(**kwargs)   # type: ignore[arg-type]
        line = _audit_line(monkeypatch, principal=p, status=200)
        assert JWT not in orjson.dumps(line).decode() and REDACTED in line[field]


def test_the_audit_record_scrubs_client_text_and_stage_fields(monkeypatch: pytest.MonkeyPatch) -> None:
    for _ in range(2):
        line = _audit_line(monkeypatch, method=f"x {JWT}", name=f"t {JWT}",
                           audit={"pinning": [{"tool": f"sk-{'a' * 20}"}], "api_key": "short"},
                           audit_safe={"decision": "allow", "rules": ["r1"]})
        text = orjson.dumps(line).decode()
        assert JWT not in text and "a" * 20 not in text
        assert line["api_key"] == REDACTED and line["decision"] == "allow" and line["rules"] == ["r1"]
        assert line["event"] == "mcp.request" and line["server"] == "a"
        assert isinstance(line["ts"], float) and isinstance(line["duration_ms"], float)


def test_scrub_text_memo_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    from gateway.telemetry import redact

    monkeypatch.setattr(redact, "_MEMO", {})
    for i in range(redact._MEMO_MAX + 10):
        assert redact.scrub_text(f"tool-name-{i}") == f"tool-name-{i}"
    assert len(redact._MEMO) <= redact._MEMO_MAX
    long_text = "x" * (redact._MEMO_TEXT_MAX + 1)
    assert redact.scrub_text(long_text) == long_text and long_text not in redact._MEMO
    assert redact.scrub_text("short") == "short"
    assert REDACTED in redact.scrub_text(f"Bearer {JWT}") and REDACTED in redact.scrub_text(f"Bearer {JWT}")


def test_operator_fields_and_patterns_are_redacted_too() -> None:
    from gateway.telemetry import redact

    redact.configure(fields=("X-Tenant-Key",), patterns=(r"acme_[0-9a-f]{12}",))
    try:
        assert redact_value("x-tenant-key", "plain") == REDACTED
        assert scrub("deploy with acme_0123456789ab please") == f"deploy with {REDACTED} please"
        assert redact_processor(None, "info", {"event": "x", "note": "key acme_0123456789ab"})["note"] == f"key {REDACTED}"
    finally:
        redact.configure()
    assert scrub("acme_0123456789ab") == "acme_0123456789ab"


def test_a_bad_operator_pattern_is_a_config_error(tmp_path: Path) -> None:
    from gateway.config.model import load_config
    from gateway.errors import ConfigError

    path = tmp_path / "g.yaml"
    path.write_text("servers: {}\nlogging:\n  redact:\n    patterns: ['acme_(']\n")
    with pytest.raises(ConfigError) as raised:
        load_config(str(path))
    assert any("logging.redact.patterns[0] is not a valid regular expression" in str(p) for p in raised.value.problems)


def test_masking_a_hostile_message_stays_within_its_budget_and_fails_closed() -> None:
    """An upstream answer built to be slow for the patterns (1 MiB of near-misses, then a
    secret): the scan stops at the budget and what it did not scan is not relayed."""
    import time
    from types import SimpleNamespace

    from gateway.stages.mask import MASK_BUDGET, _hook

    hostile = ":@" * (512 * 1024)
    secret = "ghp_" + "A1b2C3d4" * 5
    message = {"jsonrpc": "2.0", "id": 1, "result": {"content": [
        {"type": "text", "text": f"token {secret}"}, {"type": "text", "text": hostile},
        {"type": "text", "text": f"again {secret}"}]}}
    ex = SimpleNamespace(audit={})
    started = time.perf_counter()
    out = _hook(ex, message)
    assert time.perf_counter() - started < 1.0                 # ~0.7 s for the whole MiB unbudgeted
    texts = [c["text"] for c in out["result"]["content"]]
    assert texts[0] == f"token {REDACTED}"
    assert texts[1].startswith(REDACTED) and str(len(hostile)) in texts[1]
    assert secret not in json.dumps(out) and len(hostile) > MASK_BUDGET
    assert ex.audit["masked"] >= 2
