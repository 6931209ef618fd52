"""Secrets never reach a log line: the scrubber, the structlog chain and the audit writer."""
from __future__ import annotations

import io

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
]


@pytest.mark.parametrize(("what", "secret"), SECRETS, ids=[w for w, _ in SECRETS])
def test_scrub_removes_every_kind_of_credential(what: str, secret: str) -> None:
    out = scrub(secret)
    assert REDACTED in out
    for fragment in ("abcdefghijklmnop", "hunter2secret", "s3cr3tvalue", "IOSFODNN7", JWT):
        assert fragment not in out


@pytest.mark.parametrize("text", ["anonymous", "bench-echo", "tools/call", "http://127.0.0.1:8080/mcp/a",
                                  "read_file", "policy denied: Unknown tool: delete_file"])
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
