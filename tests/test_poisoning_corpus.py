"""The poisoning corpus: every poisoned definition flagged, no benign one blocked.

``tests/corpus/poisoned.json`` holds definitions in the style of published
attacks, each naming the rules that must fire; ``tests/corpus/benign.json``
holds definitions modelled on widely used servers.  Lower-severity findings on
the benign set are allowed and reported (the last test prints the table).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from gateway.inspect.names import NameIndex
from gateway.inspect.pinning_config import DEFAULT_FINDINGS
from gateway.inspect.poisoning import Finding, RuleSet

CORPUS = Path(__file__).parent / "corpus"
POISONED = json.loads((CORPUS / "poisoned.json").read_text())["tools"]
BENIGN = json.loads((CORPUS / "benign.json").read_text())["tools"]
RULES = RuleSet.load()


def blocks(f: Finding) -> bool:
    return DEFAULT_FINDINGS[f.severity] == "block"


def scan(entry: dict[str, Any]) -> list[Finding]:
    """Scan as the gateway does: the definition, then against the other mounted servers' tools."""
    name = entry["tool"]["name"]
    index = NameIndex.build({**entry.get("context", {}), "this": [name]})
    scanned = RULES.scan(entry["tool"])
    return [*scanned.findings, *RULES.scan_context("this", name, scanned, index)]


def test_the_corpus_is_large_enough() -> None:
    assert len(POISONED) >= 30 and len(BENIGN) >= 30
    assert len({e["id"] for e in POISONED + BENIGN}) == len(POISONED) + len(BENIGN)


@pytest.mark.parametrize("entry", POISONED, ids=[e["id"] for e in POISONED])
def test_every_poisoned_definition_is_flagged_by_the_rules_it_names(entry: dict[str, Any]) -> None:
    found = {f.rule for f in scan(entry)}
    assert set(entry["expect"]) <= found, f"missing {set(entry['expect']) - found}; got {sorted(found)}"


@pytest.mark.parametrize("entry", BENIGN, ids=[e["id"] for e in BENIGN])
def test_no_benign_definition_is_blocked(entry: dict[str, Any]) -> None:
    blocking = [(f.rule, f.severity, f.excerpt) for f in scan(entry) if blocks(f)]
    assert blocking == []


def test_report(capsys: pytest.CaptureFixture[str]) -> None:
    """Prints the corpus figures (run with -s, or read them in docs/pinning.md)."""
    blocked = sum(any(blocks(f) for f in scan(e)) for e in POISONED)
    benign_flagged = [(e["id"], sorted({(f.rule, f.severity) for f in scan(e)})) for e in BENIGN if scan(e)]
    with capsys.disabled():
        print(f"\npoisoned: {len(POISONED)} definitions, {len(POISONED)} flagged, {blocked} at block severity")
        print(f"benign:   {len(BENIGN)} definitions, 0 blocked, {len(benign_flagged)} with warn-level findings:")
        for ident, found in benign_flagged:
            print(f"  {ident}: {', '.join(f'{r} ({s})' for r, s in found)}")
    assert blocked >= 30
