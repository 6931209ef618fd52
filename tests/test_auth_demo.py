"""``mcp-gateway demo``: the printed tokens and example calls work as printed."""
from __future__ import annotations

import base64
import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.auth.devissuer import DevIssuer
from tests.support.components import REPO
from tests.support.gw_helpers import http_client, initialize, post, rpc
from tests.support.procs import ManagedProcess, start


@pytest.fixture
def demo(tmp_path: Path) -> Iterator[tuple[ManagedProcess, dict[str, Any]]]:
    proc, match = start([sys.executable, "-m", "gateway", "demo", "--port", "0", "--admin-port", "0"],
                        name="demo", log_path=tmp_path / "demo.log", cwd=REPO,
                        ready_line=r"^DEMO_READY (\{.*\})$", ready_timeout=60)
    try:
        assert match is not None
        yield proc, json.loads(match.group(1))
    finally:
        proc.stop()


async def test_demo_personas_reader_reads_and_admin_may_also_destroy(demo) -> None:
    _, info = demo
    url = info["url"]
    aud = json.loads(base64.urlsafe_b64decode(info["reader"].split(".")[1] + "=="))["aud"]
    assert aud == url
    async with http_client() as http:
        for persona, reset_status in (("reader", 403), ("admin", 200)):
            auth = {"Authorization": f"Bearer {info[persona]}"}
            sid, _ = await initialize(http, url, auth)
            listing = await post(http, url, rpc("tools/list"), auth, session_id=sid)
            tools = {t["name"] for t in listing.messages[0]["result"]["tools"]}
            assert tools >= {"echo", "add", "count_slowly"}
            added = await post(http, url, rpc("tools/call", {"name": "add", "arguments": {"a": 2, "b": 3}}),
                               auth, session_id=sid)
            assert added.messages[0]["result"]["content"][0]["text"] == "5"
            reset = await post(http, url, rpc("tools/call", {"name": "reset_counter", "arguments": {}}),
                               auth, session_id=sid)
            assert reset.status == reset_status, reset.body
            if reset_status == 403:
                assert 'error="insufficient_scope"' in reset.headers["WWW-Authenticate"]


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_the_printed_curl_lines_work_as_printed(demo) -> None:
    proc, _ = demo
    text = proc.text()
    exports = "\n".join(line.strip() for line in text.splitlines() if line.startswith("  export "))
    lines = text.split("Try it with curl", 1)[1].split("\n", 1)[1].split("\nOr with the Python SDK", 1)[0]
    out = subprocess.run(["bash", "-c", f"{exports}\n{lines}"], capture_output=True, text=True, timeout=60)
    assert '"text":"5"' in out.stdout, out.stdout + out.stderr
    assert "HTTP/1.1 401" in out.stdout and 'resource_metadata="' in out.stdout


async def test_dev_issuer_refuses_a_non_loopback_address() -> None:
    with pytest.raises(ValueError, match="loopback only"):
        await DevIssuer.start("0.0.0.0")
    issuer = await DevIssuer.start("127.0.0.1")
    try:
        assert issuer.issuer.startswith("http://127.0.0.1:")
    finally:
        await issuer.close()
