"""``servers.<name>.scan_results`` is parsed once into a frozen object, and each bad value is
refused by ``mcp-gateway check`` at its ``file:line:col`` (#12 item 3)."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from gateway.config.model import load_config
from tests.test_gateway_config import BASE, check, problems, write

CASES = [
    # (id, scan_results value; the problem must point at line 9, where it is written)
    ("unknown action", "{action: quarantine}"),
    ("unknown key", "{actoin: block}"),
    ("max_chars too small", "{max_chars: 10}"),
    ("severity not in the closed set", "{min_severity: severe}"),
    ("a tool glob with a control character", '{tools: ["a\\x01b"]}'),
    ("resources neither a boolean nor a list", "{resources: yes-please}"),
    ("scan_results not a mapping", "[annotate]"),
]


@pytest.mark.parametrize("value", [c[1] for c in CASES], ids=[c[0] for c in CASES])
def test_a_bad_scan_results_value_is_refused_at_its_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], value: str) -> None:
    path = write(tmp_path, BASE + f"    scan_results: {value}\n")
    code, err = check(path, capsys)
    assert code != 0
    assert [line for line, _ in problems(err, path)] == [9], err


@pytest.mark.parametrize(("value", "action", "tool", "uri"), [
    ("true", "annotate", True, True),
    ("{action: block, tools: [read_*], resources: false}", "block", False, False),
    ("{action: mask, tools: false, resources: ['file:///srv/**']}", "mask", False, True),
])
def test_scan_results_parses_into_a_frozen_config(tmp_path: Path, value: str, action: str, tool: bool,
                                                  uri: bool) -> None:
    config = load_config(str(write(tmp_path, BASE + f"    scan_results: {value}\n")))
    scan = config.servers["up"].scan_results
    assert scan.action == action and scan.scanner is not None
    assert scan.covers_tool("echo") is tool and scan.covers_resource("file:///srv/a/b.txt") is uri
    with pytest.raises(dataclasses.FrozenInstanceError):
        scan.action = "annotate"  # type: ignore[misc]


def test_without_scan_results_or_with_false_nothing_is_scanned(tmp_path: Path) -> None:
    assert load_config(str(write(tmp_path, BASE))).servers["up"].scan_results is None
    off = load_config(str(write(tmp_path, BASE + "    scan_results: false\n", "off.yaml")))
    assert off.servers["up"].scan_results is None
