"""What the gateway relays back is what it checked: a malicious upstream at the socket level.

The policy lets callers see ``safe_tool`` only.  The upstream lists ``secret_tool``
too, each time wrapped in a trick that a lenient client would still accept: wrong
letter case in the media type, ``NaN`` or a huge exponent in the JSON, a byte-order
mark, extra envelope members, a non-UTF-8 charset, duplicate keys, or the answer
pushed on the session's GET stream instead of the request's own.  Either the
gateway understands the message and filters it, or it refuses it (502 before the
response starts, an in-band error on a stream): ``secret_tool`` never reaches the
client, neither over raw HTTP nor through the real Python and TypeScript SDKs.
"""
from __future__ import annotations

import asyncio
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.support.clients import find_mcp_error, mcp_client
from tests.support.components import REPO, node_binary
from tests.support.evil_upstream import TOOLS, EvilUpstream, http, result, sse_head
from tests.support.gw_helpers import (
    LEGACY_VERSION, MODERN_VERSION, http_client, initialize, modern_headers, modern_params, next_event, post,
    read_events, rpc,
)

POLICY = """\
servers:
  evil:
    default: deny
    tools:
      - id: evil-safe-only
        match: safe_tool
        destructive: allow
"""


def sse_event(data: bytes | str, **fields: str) -> bytes:
    raw = data.encode() if isinstance(data, str) else data
    head = "".join(f"{k}: {v}\n" for k, v in fields.items()).encode()
    return head + b"data: " + raw + b"\n\n"


async def sse(body: bytes, content_type: str = "text/event-stream") -> bytes:
    return sse_head(content_type) + body


def nan_result(rid: Any) -> bytes:
    return result(rid)[:-2] + b',"_meta":{"x":NaN}}}'


def exp_result(rid: Any) -> bytes:
    return result(rid)[:-2] + b',"_meta":{"x":1e999}}}'


def dup_result(rid: Any) -> bytes:
    safe_only = json.dumps({"tools": TOOLS[:1]}).encode()
    return result(rid)[:-1] + b',"result":' + safe_only + b"}"


# name -> (script answering tools/list, what the caller must get: "filtered" or "refused")
ATTACKS: dict[str, tuple[Any, str]] = {
    "json_extra_method_member": (lambda e, rid, m: _ret(http(200, result(rid, method="notifications/x"))), "refused"),
    "json_extra_error_member": (lambda e, rid, m: _ret(http(200, result(rid, error=None))), "refused"),
    "json_unknown_envelope_member": (lambda e, rid, m: _ret(http(200, result(rid, extra=1))), "refused"),
    "json_media_type_letter_case": (lambda e, rid, m: _ret(http(200, result(rid), "Application/JSON")), "filtered"),
    "json_non_utf8_charset": (lambda e, rid, m: _ret(http(200, result(rid), "application/json; charset=latin-1")),
                              "refused"),
    "json_bom": (lambda e, rid, m: _ret(http(200, b"\xef\xbb\xbf" + result(rid))), "refused"),
    "json_nan": (lambda e, rid, m: _ret(http(200, nan_result(rid))), "refused"),
    "json_duplicate_result_key": (lambda e, rid, m: _ret(http(200, dup_result(rid))), "refused"),
    "sse_media_type_letter_case": (lambda e, rid, m: sse(sse_event(result(rid)), "Text/Event-Stream"), "filtered"),
    "sse_nan": (lambda e, rid, m: sse(sse_event(nan_result(rid))), "refused"),
    "sse_huge_exponent": (lambda e, rid, m: sse(sse_event(exp_result(rid))), "refused"),
    "sse_bom_in_data": (lambda e, rid, m: sse(sse_event(b"\xef\xbb\xbf" + result(rid))), "refused"),
    "sse_invalid_utf8": (lambda e, rid, m: sse(sse_event(result(rid)[:-2] + b',"_meta":{"x":"\xff"}}}')), "refused"),
    "sse_extra_envelope_member": (lambda e, rid, m: sse(sse_event(result(rid, method="x"))), "refused"),
    "sse_other_event_type": (lambda e, rid, m: sse(sse_event(result(rid), event="other")), "refused"),
}


async def _ret(data: bytes) -> bytes:
    return data


def _script(name: str) -> Any:
    make = ATTACKS[name][0]

    async def script(evil: EvilUpstream, rid: Any, msg: dict[str, Any]) -> bytes:
        return await make(evil, rid, msg)
    return script




def gateway_for(gateway: Any, evil: EvilUpstream, tmp_path: Path) -> Any:
    (tmp_path / "policies").mkdir(exist_ok=True)
    (tmp_path / "policies" / "evil.yaml").write_text(POLICY)
    return gateway.astart({"servers": {"evil": {"url": evil.url, "pinning": {"mode": "off"}}},
                           "policies": str(tmp_path / "policies")})


@pytest.mark.parametrize("attack", sorted(ATTACKS))
async def test_a_tricked_tools_list_is_filtered_or_refused_never_relayed_raw(
        attack: str, evil: EvilUpstream, gateway: Any, tmp_path: Path) -> None:
    evil.scripts["tools/list"] = _script(attack)
    gw = await gateway_for(gateway, evil, tmp_path)
    async with http_client() as client:
        reply = await post(client, gw.url("evil"), rpc("tools/list", modern_params()),
                           headers=modern_headers("tools/list"), version=MODERN_VERSION)
    messages = reply.messages
    assert "secret_tool" not in json.dumps(messages), (attack, messages)
    expected = ATTACKS[attack][1]
    if expected == "filtered":
        assert reply.status == 200
        assert [t["name"] for t in messages[-1]["result"]["tools"]] == ["safe_tool"]
    else:
        assert reply.status in (200, 502)
        assert "error" in messages[-1] and messages[-1]["error"]["code"] == -32000, messages
        assert messages[-1]["error"]["data"]["reason"].startswith("upstream_")
    if expected == "refused":
        entry = gw.wait_for_log({"event": "upstream.refused_message"})
        assert entry["server"] == "evil"


SDK_ATTACKS = ["json_media_type_letter_case", "json_nan", "json_extra_method_member", "sse_media_type_letter_case",
               "sse_nan", "sse_huge_exponent", "sse_bom_in_data", "sse_extra_envelope_member"]


@pytest.mark.parametrize("attack", SDK_ATTACKS)
async def test_the_python_sdk_client_never_sees_the_refused_tool(
        attack: str, evil: EvilUpstream, gateway: Any, tmp_path: Path) -> None:
    evil.scripts["tools/list"] = _script(attack)
    gw = await gateway_for(gateway, evil, tmp_path)
    try:
        async with mcp_client(gw.url("evil"), era="legacy", timeout=5.0) as client:
            listed = await client.list_tools()
        names = [t.name for t in listed.tools]
    except BaseException as exc:  # noqa: BLE001 - the SDK raises a JSON-RPC error, possibly grouped
        error = find_mcp_error(exc)
        assert error is not None, exc
        assert ATTACKS[attack][1] == "refused" and error.code == -32000
        return
    assert "secret_tool" not in names
    assert names == ["safe_tool"]


TS_CLIENT = """
import { Client } from "@modelcontextprotocol/sdk/client/index.js";
import { StreamableHTTPClientTransport } from "@modelcontextprotocol/sdk/client/streamableHttp.js";
const client = new Client({ name: "ts-probe", version: "1.0.0" });
await client.connect(new StreamableHTTPClientTransport(new URL(process.argv[2])));
try {
  const listed = await client.listTools(undefined, { timeout: 5000 });
  console.log(JSON.stringify({ tools: listed.tools.map((t) => t.name) }));
} catch (e) {
  console.log(JSON.stringify({ error: String(e && e.message || e), code: e && e.code }));
}
await client.close();
process.exit(0);
"""


@pytest.mark.parametrize("attack", ["json_media_type_letter_case", "json_extra_method_member",
                                    "sse_media_type_letter_case", "sse_huge_exponent", "sse_bom_in_data",
                                    "json_unknown_envelope_member"])
async def test_the_typescript_sdk_client_never_sees_the_refused_tool(
        attack: str, evil: EvilUpstream, gateway: Any, tmp_path: Path) -> None:
    evil.scripts["tools/list"] = _script(attack)
    gw = await gateway_for(gateway, evil, tmp_path)
    script = REPO / "node_modules" / ".ts-probe.mjs"
    script.write_text(TS_CLIENT)
    proc = await asyncio.create_subprocess_exec(node_binary(), str(script), gw.url("evil"), cwd=str(REPO),
                                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    line = out.decode().strip().splitlines()[-1] if out.strip() else ""
    assert line, err.decode()[-2000:]
    outcome = json.loads(line)
    assert "secret_tool" not in line
    if ATTACKS[attack][1] == "filtered":
        assert outcome == {"tools": ["safe_tool"]}
    else:
        assert "error" in outcome and outcome.get("code") in (-32000, 502), outcome


async def test_an_answer_pushed_on_the_get_stream_is_dropped(evil: EvilUpstream, gateway: Any, tmp_path: Path) -> None:
    """The upstream holds the request's own stream open and sends the answer on the session's GET stream."""
    pushed = asyncio.Event()

    async def answer_elsewhere(e: EvilUpstream, rid: Any, msg: dict[str, Any]) -> bytes:
        await e.push_on_get(sse_event(result(rid), id="g-1"))
        await e.push_on_get(sse_event(json.dumps({"jsonrpc": "2.0", "method": "notifications/message",
                                                  "params": {"level": "info", "data": "marker"}}), id="g-2"))
        pushed.set()
        return sse_head() + sse_event(json.dumps({"jsonrpc": "2.0", "id": rid, "error": {
            "code": -32603, "message": "answered elsewhere"}}))

    evil.scripts["tools/list"] = answer_elsewhere
    gw = await gateway_for(gateway, evil, tmp_path)
    async with http_client() as client:
        sid, _ = await initialize(client, gw.url("evil"))
        headers = {"Accept": "text/event-stream", "Mcp-Session-Id": sid, "MCP-Protocol-Version": LEGACY_VERSION}
        async with client.get(gw.url("evil"), headers=headers) as get:
            assert get.status == 200
            events = read_events(get)
            listing = asyncio.ensure_future(post(client, gw.url("evil"), rpc("tools/list", {}), session_id=sid))
            first = await next_event(events)
            await asyncio.wait_for(pushed.wait(), 10)
            # The misrouted answer was dropped: the first thing on the GET stream is the marker.
            assert first.message["method"] == "notifications/message", first.message
            reply = await asyncio.wait_for(listing, 10)
    assert "secret_tool" not in json.dumps(reply.messages)
    gw.wait_for_log({"event": "security.response_misrouted"})


async def test_a_modern_request_stream_carries_only_its_own_answer(evil: EvilUpstream, gateway: Any,
                                                                 tmp_path: Path) -> None:
    """Another request's id on a request's stream is dropped; the real answer still arrives, filtered."""
    async def two_answers(e: EvilUpstream, rid: Any, msg: dict[str, Any]) -> bytes:
        return sse_head() + sse_event(result(f"{rid}-other")) + sse_event(result(rid)) + sse_event(result(rid))

    evil.scripts["tools/list"] = two_answers
    gw = await gateway_for(gateway, evil, tmp_path)
    async with http_client() as client:
        reply = await post(client, gw.url("evil"), rpc("tools/list", modern_params()),
                           headers=modern_headers("tools/list"), version=MODERN_VERSION)
    answers = [m for m in reply.messages if "result" in m or "error" in m]
    assert len(answers) == 1 and [t["name"] for t in answers[0]["result"]["tools"]] == ["safe_tool"]


# --------------------------------------------------------------------------- resumption

def primed_then_closed(rid: Any) -> bytes:
    """A request's stream that gives a resumption point and closes before its answer (SEP-1699)."""
    return sse_head() + b"id: up-1\nretry: 10\ndata: \n\n"


async def test_a_replayed_list_goes_through_the_same_filter_as_the_live_one(
        evil: EvilUpstream, gateway: Any, tmp_path: Path) -> None:
    evil.scripts["tools/list"] = lambda e, rid, m: _ret(primed_then_closed(rid))
    gw = await gateway_for(gateway, evil, tmp_path)
    async with http_client() as client:
        sid, _ = await initialize(client, gw.url("evil"))
        listing = rpc("tools/list", {})
        first = await post(client, gw.url("evil"), listing, session_id=sid)
        (minted,) = [e.id for e in first.events if e.id]
        assert minted != "up-1"
        evil.replays["up-1"] = sse_event(result(listing["id"]), id="up-2")
        headers = {"Accept": "text/event-stream", "Mcp-Session-Id": sid, "Last-Event-ID": minted,
                   "MCP-Protocol-Version": LEGACY_VERSION}
        async with client.get(gw.url("evil"), headers=headers) as get:
            assert get.status == 200
            events = [e async for e in read_events(get)]
    (answer,) = [e.message for e in events if e.data]
    assert [t["name"] for t in answer["result"]["tools"]] == ["safe_tool"]
    # The upstream was asked for its own id, not the gateway's.
    (get_req,) = [h for m, h, _ in evil.requests if m == "GET"]
    assert get_req["last-event-id"] == "up-1"


@pytest.mark.parametrize("forgery", ["other_session", "upstream_id", "tampered", "garbage"])
async def test_an_event_id_not_minted_for_this_session_is_refused(
        forgery: str, evil: EvilUpstream, gateway: Any, tmp_path: Path) -> None:
    evil.scripts["tools/list"] = lambda e, rid, m: _ret(primed_then_closed(rid))
    gw = await gateway_for(gateway, evil, tmp_path)
    async with http_client() as client:
        victim, _ = await initialize(client, gw.url("evil"))
        attacker, _ = await initialize(client, gw.url("evil"))
        first = await post(client, gw.url("evil"), rpc("tools/list", {}), session_id=victim)
        (minted,) = [e.id for e in first.events if e.id]
        presented = {"other_session": minted, "upstream_id": "up-1",
                     "tampered": minted[:-2] + ("AA" if not minted.endswith("AA") else "BB"),
                     "garbage": "x" * 5000}[forgery]
        headers = {"Accept": "text/event-stream", "Mcp-Session-Id": attacker, "Last-Event-ID": presented,
                   "MCP-Protocol-Version": LEGACY_VERSION}
        async with client.get(gw.url("evil"), headers=headers) as get:
            assert get.status == 400
            body = await get.json()
    assert body["error"]["data"]["reason"] == "event_id_invalid"
    assert not [m for m, h, _ in evil.requests if m == "GET"]      # nothing was replayed upstream
    gw.wait_for_log({"event": "security.event_id_refused"})


@pytest.mark.parametrize("levels", [200, 900])
async def test_a_deeply_nested_tool_is_held_or_refused_never_a_500(
        levels: int, evil: EvilUpstream, gateway: Any, tmp_path: Path) -> None:
    """Past the codec's bound the listing is refused (502); under it, schema walkers (fingerprint,
    poisoning scan, the tofu document) never see a definition deeper than pinning's bound."""
    deep: dict[str, Any] = {"type": "string"}
    for _ in range(levels // 2):
        deep = {"type": "object", "properties": {"x": deep}}
    tools = [{"name": "safe_tool", "description": "Harmless.", "inputSchema": {"type": "object"}},
             {"name": "safe_tool_deep", "description": "Deep.", "inputSchema": deep}]

    async def listing(e: EvilUpstream, rid: Any, m: dict[str, Any]) -> bytes:
        return http(200, json.dumps({"jsonrpc": "2.0", "id": rid, "result": {"tools": tools}}).encode())

    evil.scripts["tools/list"] = listing
    (tmp_path / "policies").mkdir(exist_ok=True)
    (tmp_path / "policies" / "evil.yaml").write_text(POLICY.replace("match: safe_tool", "match: safe_tool*"))
    gw = await gateway.astart({"servers": {"evil": {"url": evil.url, "pinning": {"mode": "tofu"}}},
                               "policies": str(tmp_path / "policies")})
    async with http_client() as client:
        reply = await post(client, gw.url("evil"), rpc("tools/list", modern_params()),
                           headers=modern_headers("tools/list"), version=MODERN_VERSION)
    if levels > 254:
        assert reply.status == 502 and reply.json["error"]["data"]["reason"] == "upstream_too_deep"
    else:
        assert reply.status == 200
        assert [t["name"] for t in reply.messages[-1]["result"]["tools"]] == ["safe_tool"]
        gw.wait_for_log({"event": "pins.tool_too_deep"})
    assert not [line for line in gw.log_lines() if "RecursionError" in line or "Traceback" in line]
