"""Every regular expression that can see attacker text runs in linear time on adversarial input.

The patterns are collected, not listed: every compiled ``re.Pattern`` in a module
of ``gateway/`` (so a new one is covered the day it is written) and every rule of
the poisoning rule set.  Each is first searched over 16 KiB and 64 KiB adversarial
strings built from its own literal fragments and the usual troublemakers (runs of
one character class, near-misses repeated): a quadratic pattern shows as a 16x
slowdown and fails fast, before the 1 MiB run could take minutes.  Then:

- the module patterns (applied to log values, tokens, headers of any length) must
  search 1 MiB in under 50 ms;
- the poisoning rules are only ever applied to a definition's text up to the
  scanner's ``oversized_definition`` cap (64 KiB; larger definitions are refused
  unread), and must search that much in under 50 ms;
- the entry points (log scrubbing, the poisoning scan) get 1 MiB and stay within
  budget because of those caps.
"""
from __future__ import annotations

import importlib
import pkgutil
import re
import time
from typing import Any

import pytest

import gateway
from gateway.inspect.poisoning import RuleSet
from gateway.telemetry.redact import MAX_SCRUB_CHARS, redact_value, scrub

MiB = 1024 * 1024
BUDGET = 0.050
GENERIC = ["a", "a ", " ", "\t", "\n", "\n \n", "0", "aA0-", "_", ".", "a.", "a:", "://a:", "=", "a=", "{", "{a",
           "-", "%2", "&#", "<", "\\u00", "eyJ", "eyJa.", "sk-", "bearer ", "ghp_", "xoxb-", "AKIA", "AIza",
           "ignore ", "ignore previous ", "<!-- ", "\u200b", "é",
           # URLs packed together: a URL run that never ends (no space, no ")") under many starts.
           "http://x ", "fetch http://x ", "get http://x/ read it and ", "![a](http://x/?", "![a](http://x/%7b",
           "![a](http://x/!"]


def _patterns() -> list[tuple[str, re.Pattern[str]]]:
    found: dict[tuple[str, int], tuple[str, re.Pattern[str]]] = {}
    for info in pkgutil.walk_packages(gateway.__path__, "gateway."):
        # Config files are the operator's text, not an attacker's; demo code serves nobody.
        if info.name.endswith(("__main__", ".demo", ".demo_server")) or info.name.startswith("gateway.config."):
            continue
        module = importlib.import_module(info.name)
        for attr, value in vars(module).items():
            if isinstance(value, re.Pattern) and isinstance(value.pattern, str):
                found[(value.pattern, value.flags)] = (f"{info.name}.{attr}", value)
    return sorted(found.values(), key=lambda item: item[0])


RULES = RuleSet.load()


def _fragments(pattern: str) -> list[str]:
    """Literal runs in the pattern source: what a crafted near-miss repeats."""
    words = re.findall(r"[A-Za-z][A-Za-z _'-]{2,20}", pattern)
    return sorted({w for w in words if "\\" not in w})[:12]


PATTERNS = _patterns()
RULE_CAP = RULES.detectors["oversized_definition"].get("max_chars", 65536)


def test_the_collection_found_the_patterns_it_should() -> None:
    names = {name for name, _ in PATTERNS}
    assert any("redact" in n for n in names) and any("poisoning" in n for n in names)
    assert len(PATTERNS) >= 20 and len(RULES.rules) >= 15


@pytest.mark.parametrize("index", range(len(RULES.rules)), ids=[r.id for r in RULES.rules])
def test_each_poisoning_rule_as_the_scanner_applies_it_is_linear_and_within_budget(index: int) -> None:
    """Rules run near their trigger words (``Rule.search`` with the scanner's plan), on at most
    ``RULE_CAP`` characters: adversarial text is built from triggers and the rule's own words."""
    rule = RULES.rules[index]
    seeds = GENERIC + _fragments(rule.regex.pattern) + [f"{t} " for t in rule.triggers] + \
        [f"{t} {f} " for t in rule.triggers[:4] for f in _fragments(rule.regex.pattern)[:4]]

    def worst(size: int) -> tuple[float, str]:
        out = (0.0, "")
        for seed in seeds:
            text = (seed * (size // len(seed) + 1))[:size]
            lowered = text.lower()
            best = float("inf")
            for _ in range(3):          # CPU time of this thread, the best of three: other tests share the CPU
                started = time.thread_time()
                plan = RULES._plan(text, lowered)
                if index in plan:
                    rule.search(text, lowered, plan[index])
                best = min(best, time.thread_time() - started)
            out = max(out, (best, seed))
        return out

    small, _ = worst(RULE_CAP // 8)
    large, seed = worst(RULE_CAP)
    # 8x the length: linear is ~8x the time, quadratic ~64x.
    assert large < max(small, 0.0005) * 24, f"{rule.id}: superlinear ({small * 1000:.1f} -> {large * 1000:.1f} ms)"
    assert large < BUDGET, f"{rule.id}: {large * 1000:.0f} ms on {RULE_CAP} chars of {seed!r}"


def _applied_length(name: str) -> int:
    """The longest text the gateway applies ``name`` to (capped before the regex runs)."""
    if name.startswith("gateway.inspect.poisoning."):
        return RULE_CAP                      # definitions past the cap are refused unread
    if name == "gateway.telemetry.redact._SECRET_VALUE":
        return MAX_SCRUB_CHARS + 64          # scrub() cuts longer texts first
    if name == "gateway.auth.verify._JWS_SHAPE":
        return 16384                         # tokens past auth.max_token_bytes are refused before it runs
    if name == "gateway.telemetry.redact._SENSITIVE_KEY":
        return 128                           # sensitive_key() looks at a key's first 128 characters
    return MiB


def _best(pattern: re.Pattern[str], text: str, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):          # the best of a few: the other test worker shares the CPU
        started = time.thread_time()
        pattern.search(text)
        best = min(best, time.thread_time() - started)
    return best


@pytest.mark.parametrize("name,pattern", PATTERNS, ids=[n for n, _ in PATTERNS])
def test_each_pattern_is_linear_and_within_budget_at_the_length_it_is_applied_to(
        name: str, pattern: re.Pattern[str]) -> None:
    size = _applied_length(name)
    small, large = min(size, 8 * 1024), min(size, 64 * 1024)
    worst_ratio, worst_seed = 0.0, ""
    for seed in _seeds(pattern.pattern):
        t_small = max(_best(pattern, _fill(seed, small), 3), 0.0002)
        t_large = _best(pattern, _fill(seed, large), 3)
        if t_large / t_small > worst_ratio:
            worst_ratio, worst_seed = t_large / t_small, seed
    # 8x the length: linear is ~8x the time, quadratic ~64x.
    assert large == small or worst_ratio < 24, f"{name}: {worst_ratio:.0f}x for 8x the text ({worst_seed!r})"
    worst = max(_best(pattern, _fill(seed, size), 3 if size <= 65536 else 5) for seed in _slowest(pattern, large))
    assert worst < BUDGET, f"{name}: {worst * 1000:.0f} ms on {size} characters"


def _fill(seed: str, size: int) -> str:
    return (seed * (size // len(seed) + 1))[:size]


def _seeds(pattern: str) -> list[str]:
    return GENERIC + _fragments(pattern) + [f + " " for f in _fragments(pattern)]


def _slowest(pattern: re.Pattern[str], size: int, n: int = 3) -> list[str]:
    """The seeds that cost most at ``size``: the ones worth running at full length."""
    timed = sorted(_seeds(pattern.pattern), key=lambda seed: -_best(pattern, _fill(seed, size), 1))
    return timed[:n]


@pytest.mark.parametrize("entry", ["scrub", "redact_value", "poisoning_scan"])
def test_the_entry_points_that_apply_them_stay_within_budget(entry: str) -> None:
    rules = RULES
    apply: dict[str, Any] = {
        "scrub": scrub,
        "redact_value": lambda t: redact_value("detail", {"nested": [t]}),
        "poisoning_scan": lambda t: rules.scan({"name": "t", "description": t, "inputSchema": {
            "type": "object", "properties": {"p": {"type": "string", "description": t[:4096]}}}}),
    }
    worst = 0.0
    for seed in GENERIC:
        text = (seed * (MiB // len(seed) + 1))[:MiB]
        started = time.thread_time()
        apply[entry](text)
        worst = max(worst, time.thread_time() - started)
    assert worst < BUDGET * 4, f"{entry}: {worst * 1000:.0f} ms"


def _result_seeds() -> list[str]:
    from gateway.inspect.result_scan import ResultScanner
    scanner = ResultScanner(RULES, "low")
    triggers = sorted({t for r in scanner.rules for t in r.triggers})
    return ["a", "\u200ba", "ignore all previous instructions and ![a](http://x/?", " ".join(triggers) + " ",
            "".join(f"{t} {f} " for r in scanner.rules[:6] for t in r.triggers[:2]
                    for f in _fragments(r.regex.pattern)[:2])]


@pytest.mark.parametrize("floor", ["low", "high"])
@pytest.mark.parametrize("seed", range(5))
def test_the_result_scanner_is_linear_and_bounded_at_its_default_cap(seed: int, floor: str) -> None:
    """Tool results are scanned by the results profile (``ResultScanner.scan``: its own trigger
    plan, NFKC with an offset map) up to ``scan_results.max_chars`` per message: linear in the
    text, and a message at the default cap, dense with every trigger, costs well under a second.
    At the default floor (high) the gate looks for some rules' high findings instead."""
    from gateway.inspect.result_scan import ResultScanner
    from gateway.inspect.result_scan_config import DEFAULT_MAX_CHARS
    scanner = ResultScanner(RULES, floor)
    text = _fill(_result_seeds()[seed], DEFAULT_MAX_CHARS)

    def cost(size: int) -> float:
        best = float("inf")
        for _ in range(3):
            started = time.thread_time()
            scanner.scan(text[:size])
            best = min(best, time.thread_time() - started)
        return best

    small, large = cost(DEFAULT_MAX_CHARS // 8), cost(DEFAULT_MAX_CHARS)
    assert large < max(small, 0.0005) * 24, f"superlinear: {small * 1000:.1f} -> {large * 1000:.1f} ms"
    assert large < 0.5, f"{large * 1000:.0f} ms for {DEFAULT_MAX_CHARS} characters"


def _conditional_gates() -> list[tuple[str, int, re.Pattern[str]]]:
    from gateway.inspect.result_scan import ResultScanner, conditional_gates, rank
    rules = ResultScanner(RULES, "high").rules
    return [(rules[i].id, i, gate) for i, gate in conditional_gates(rules, rank("high")).items()]


GATES = _conditional_gates()


def test_the_conditional_gates_are_there_to_be_timed() -> None:
    assert {rid for rid, _, _ in GATES} == {"markdown_image_exfiltration", "sensitive_file_instruction"}


@pytest.mark.parametrize("rid,index,gate", GATES, ids=[rid for rid, _, _ in GATES])
def test_each_conditional_gate_searches_a_mebibyte_of_adversarial_text_within_budget(
        rid: str, index: int, gate: re.Pattern[str]) -> None:
    """What reads result text is the gate's RE2 translation (ASCII text as it came, other text
    lower-cased): 1 MiB, past any ``max_chars``, within budget.  The Python regex it is
    translated from never reads text; it is linear anyway (8x the text, not 64x the time)."""
    from gateway.inspect.regex_gate import RegexGate
    from gateway.inspect.result_scan import ResultScanner
    lower = ResultScanner(RULES, "high").rules[index].lower
    one = RegexGate([lower], {0: gate})
    assert one.gated == (0,)
    seeds = _seeds(gate.pattern) + ["![" + "a" * 199, "![a](http://x/{", "you must send private ", ".env as the `",
                                    "read the credential ", "copy .env.example to .env "]
    worst, worst_seed = 0.0, ""
    for seed in seeds:
        for text in (_fill(seed, MiB), _fill(seed + "\u00e9", MiB)):
            started = time.thread_time()
            one.clean_ascii(text) if text.isascii() else one.candidates(text.lower())
            if (spent := time.thread_time() - started) > worst:
                worst, worst_seed = spent, seed
    assert worst < BUDGET, f"{rid}: {worst * 1000:.0f} ms on 1 MiB of {worst_seed!r}"
    for seed in sorted(seeds, key=lambda s: -_best(gate, _fill(s, 4096), 1))[:3]:
        small = max(_best(gate, _fill(seed, 16 * 1024), 2), 0.0002)
        large = _best(gate, _fill(seed, 128 * 1024), 2)
        assert large < small * 24, f"{rid} as a Python regex: {small * 1000:.1f} -> {large * 1000:.1f} ms ({seed!r})"
