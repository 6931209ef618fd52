"""Resource templates from a hostile upstream (a raw-socket server): the gateway lists only the
templates it can reason about.  One past the glob bounds, or one whose adjacent expressions once
read as an unmatchable '***', must not slip past a deny rule into the client's listing."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tests.support.evil_upstream import EvilUpstream, http
from tests.support.gw_helpers import http_client, modern_headers, modern_params, post, rpc

POLICY = """\
servers:
  "*":
    default: deny
    methods:
      - {id: all-methods, match: ["**"]}
    resources:
      - {id: no-secrets, match: "file:///secret/**", effect: deny}
      - {id: the-rest, match: "**"}
"""
HUGE = "file:///secret/" + "a{k}" * 8192            # 40 KiB: past the glob bounds
TEMPLATES = [HUGE, "file:///secret/{a}{+b}", "file:///secret/{name}", "file:///docs/{name}", "notes://{a}{b}"]


async def test_a_hostile_upstreams_templates_under_a_denied_tree_are_never_listed(
        gateway: Any, evil: EvilUpstream, tmp_path: Path) -> None:
    async def templates(_evil: EvilUpstream, rid: Any, _msg: dict[str, Any]) -> bytes:
        return http(200, json.dumps({"jsonrpc": "2.0", "id": rid, "result": {
            "resultType": "complete", "resourceTemplates": [{"uriTemplate": t, "name": f"t{i}"}
                                                            for i, t in enumerate(TEMPLATES)]}}).encode())

    evil.scripts["resources/templates/list"] = templates
    (tmp_path / "policies").mkdir()
    (tmp_path / "policies" / "p.yaml").write_text(POLICY)
    gw = await gateway.astart({"servers": {"evil": {"url": evil.url, "pinning": {"mode": "off"}}},
                               "policies": str(tmp_path / "policies")})
    async with http_client() as client:
        msg = rpc("resources/templates/list", modern_params({}))
        reply = await post(client, gw.url("evil"), msg, modern_headers("resources/templates/list"), version=None)
    assert reply.status == 200, reply
    listed = [t["uriTemplate"] for t in reply.response_to(msg["id"])["result"]["resourceTemplates"]]
    assert listed == ["file:///docs/{name}", "notes://{a}{b}"]
