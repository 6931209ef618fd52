"""The poisoning corpus: every poisoned definition flagged, no benign one blocked.

``tests/corpus/poisoned.json`` holds definitions in the style of published
attacks and paraphrases of them, each with its family and language (some name
rules that must fire); ``tests/corpus/benign.json`` holds the real tool
definitions of widely used servers and modelled hard negatives.  Lower-severity
findings on the benign set are allowed and reported (``tests/support/corpus_report.py``
prints the tables that docs/pinning.md shows).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from gateway.inspect.names import NameIndex
from gateway.inspect.pinning_config import DEFAULT_FINDINGS
from gateway.inspect.poisoning import Finding, RuleSet
from tests.support import corpus_report

CORPUS = Path(__file__).parent / "corpus"
POISONED = json.loads((CORPUS / "poisoned.json").read_text())["tools"]
BENIGN = json.loads((CORPUS / "benign.json").read_text())["tools"]
RULES = RuleSet.load()
# Thresholds at first contact with the default config.  The per-family floor lets a family
# of five miss one definition: the misses allowed are detector signals that honest text
# also produces (an exact duplicate name on two servers, written-out ANSI escapes in a
# terminal tool's docs, one mixed-script word), which are reported at warn level and left
# to pinning, rather than held on sight.
OVERALL_BLOCKED = 0.95
FAMILY_BLOCKED = 0.80


def blocks(f: Finding) -> bool:
    return DEFAULT_FINDINGS[f.severity] == "block"


def scan(entry: dict[str, Any]) -> list[Finding]:
    """Scan as the gateway does: the definition, then against the other mounted servers' tools."""
    name = entry["tool"]["name"]
    index = NameIndex.build({**entry.get("context", {}), "this": [name]})
    scanned = RULES.scan(entry["tool"])
    return [*scanned.findings, *RULES.scan_context("this", name, scanned, index)]


def test_the_corpus_is_large_enough() -> None:
    assert len(POISONED) >= 100 and sum(e["origin"] == "real" for e in BENIGN) >= 100
    assert all(e["family"] and e["language"] and e["split"] in ("tuning", "holdout") for e in POISONED)
    assert len({e["language"] for e in POISONED}) >= 11       # English and the ten most used after it
    assert len({e["id"] for e in POISONED + BENIGN}) == len(POISONED) + len(BENIGN)
    # bench/pin_micro.py lists the benign set as one server's tools: names must be unique.
    assert len({e["tool"]["name"] for e in BENIGN}) == len(BENIGN)


@pytest.mark.parametrize("entry", POISONED, ids=[e["id"] for e in POISONED])
def test_every_poisoned_definition_is_flagged_by_the_rules_it_names(entry: dict[str, Any]) -> None:
    found = {f.rule for f in scan(entry)}
    assert set(entry.get("expect", [])) <= found, f"missing {set(entry['expect']) - found}; got {sorted(found)}"


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
    assert blocked >= OVERALL_BLOCKED * len(POISONED)


FIGURES = corpus_report.compute(RULES)


def test_at_least_95_percent_of_poisoned_definitions_are_blocked_and_no_benign_one() -> None:
    assert FIGURES.recall >= OVERALL_BLOCKED, FIGURES.family_missed
    assert FIGURES.benign_blocked == []


@pytest.mark.parametrize("family", sorted(FIGURES.family))
def test_each_family_is_blocked_above_its_floor_with_full_precision(family: str) -> None:
    counts = FIGURES.family[family]
    assert counts["blocked"] / counts["n"] >= FAMILY_BLOCKED, FIGURES.family_missed[family]
    assert FIGURES.family_precision[family] == 1.0


def test_the_figures_in_docs_pinning_md_are_the_current_ones() -> None:
    """Regenerate with ``python -m tests.support.corpus_report --write``."""
    assert corpus_report.doc_section() == corpus_report.markdown(FIGURES)
