"""The configuration snippets in docs/auth.md are accepted by the config parser as written."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from gateway.config.model import parse_config
from gateway.config.yamlloc import load_text

DOC = Path(__file__).resolve().parents[1] / "docs" / "auth.md"
BASE = """\
listen: {host: 127.0.0.1, port: 8080}
admin: {host: 127.0.0.1, port: 9464}
public_url: https://gateway.example.com
"""
SNIPPETS = [s for s in re.findall(r"```yaml\n(.*?)```", DOC.read_text(), re.S)]


@pytest.mark.parametrize("snippet", SNIPPETS, ids=[f"snippet{i}" for i in range(len(SNIPPETS))])
def test_documented_snippet_parses(snippet: str) -> None:
    text = BASE + snippet
    if "auth:" not in snippet:
        text += "auth:\n  issuers:\n    - issuer: https://as.example.com\n"
    if "servers:" not in snippet:
        text += "servers:\n  demo: {url: 'https://mcp.example.com/mcp'}\n"
    node, problems = load_text(text, "auth.md")
    assert not problems, problems
    parse_config(node, "auth.md", problems, check_secrets=False)
    assert [str(p) for p in problems] == []
