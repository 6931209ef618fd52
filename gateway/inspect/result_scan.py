"""Prompt injection in tool results: the poisoning rules, run over what an upstream answers.

A tool result or a resource read is text the model reads next, written by whoever wrote the
web page, issue, e-mail or file the tool fetched: the indirect prompt-injection channel.
The same ``RuleSet`` that scans tool definitions (built-in ``poisoning_rules.yaml`` plus the
server's ``pinning.rules`` files) scans it, restricted to the *results profile* below, and
every match is reported with its span in the original text so it can be masked.

The results profile keeps the rule families that address the model or move data
(``RESULT_RULES``) and leaves out what only makes sense for a definition (tool-name
checks, overlong descriptions, shadowing, precondition and chaining wording that honest
documentation uses, mentions of credential files, which file listings are full of,
base64 blobs, HTML comments, which every Markdown page carries).  Encoded payloads are not
decoded in results: attacker-chosen encodings cost decoding time on every call, and the
instruction to decode (``decode_and_follow``) is itself in the profile.
Unicode tag characters (invisible ASCII, the "ASCII smuggling" of tool outputs) are the one
detector kept.

Cost: text is scanned as read (ASCII) or after NFKC with invisible characters removed
(non-ASCII, with an offset map back to the original).  One RE2 pass (``regex_gate.py``)
says which rules may match at all; a clean result, nearly every one, ends there.  Each rule
it cannot rule out runs only within ``TRIGGER_SPAN`` characters of one of its trigger words.
The caller caps the characters scanned per message.
"""
from __future__ import annotations

import functools
import re
import unicodedata
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

from .poisoning import _STRIP, _WORD, BUILTIN_RULES, DETECTORS, SEVERITIES, TRIGGER_SPAN, _unmix, escape_excerpt
from .regex_gate import RegexGate, substring_finder

if TYPE_CHECKING:
    from .poisoning import Rule, RuleSet

# The results profile: rule ids of poisoning_rules.yaml that apply to results.
RESULT_RULES = frozenset({
    # imperatives to the model, concealment, role markup, jailbreaks
    "ignore_instructions", "ignore_instructions_intl", "conceal_from_user", "conceal_from_user_intl",
    "prompt_markup", "role_markup_json", "model_directive", "jailbreak", "consent_claim",
    # remote and encoded instructions, shell download-and-execute
    "remote_instructions", "decode_and_follow", "shell_download_exec",
    # other tools and exfiltration
    "tool_override", "cross_tool_data_flow", "sensitive_file_instruction", "environment_exfiltration",
    "context_exfiltration", "markdown_image_exfiltration", "exfiltration_endpoint", "email_redirect",
})
# Severities in results, where they differ from the definition scan: patterns that honest
# documentation and data carry ("curl ... | sh" in install guides, a "role": "system" column in
# a query result, a coverage badge URL with ?token=) are reported at medium, so the default
# threshold (high) acts only on their co-occurrence with an unambiguous signal.  A markdown
# image whose URL carries a template placeholder ({{...}}, ${...}) is an exfiltration recipe
# whatever the context: high.
RESULT_SEVERITY = {"shell_download_exec": "medium", "role_markup_json": "medium",
                   "markdown_image_exfiltration": "medium"}
# Setup guides say "copy .env.example to .env and fill in": in results, a file instruction whose
# only target is a .env file is reported at medium; one naming keys or credentials stays high.
_FILE_RULES = frozenset({"sensitive_file_instruction", "sensitive_file_instruction_intl"})
_OTHER_SECRETS = (".ssh", "id_rsa", "id_dsa", "id_ecdsa", "id_ed25519", ".pem", "/etc/", ".aws", ".npmrc", ".pypirc",
                  ".netrc", "credential", ".docker", ".kube", "kubeconfig", "mcp.json", "claude_desktop", ".cursor/",
                  "keychain", "wallet", ".gnupg", "private", "ssh", "seed", "mnemonic")
_PLACEHOLDER = ("{{", "${", "%7b%7b")
# What the gate looks for instead of a rule when some of the rule's findings in results are
# medium and the floor is above that: the gate need only let through a text where the rule may
# find something that still counts.  Each gate is built from the built-in rule's pattern (a
# rules file that changes the pattern gets none) and matches (within) every such match of the
# rule, over the lower-cased text as the rule reads it.
_ENV = r"\.env\b"
# _PLACEHOLDER as a regex; and one character that starts none (a lone "{", "$" or "%").
_PLACEHOLDERS = "(?:" + "|".join(re.escape(p) for p in _PLACEHOLDER) + ")"
_NOT_PLACEHOLDER = "|".join(f"{re.escape(p[0])}(?!{re.escape(p[1:])})" for p in _PLACEHOLDER)
_FIRSTS = "".join(sorted({re.escape(p[0]) for p in _PLACEHOLDER}))
_GAP = r"[^\n]{0,80}?"           # the file rule's gap between an instruction and a file


def _image_gate(_pattern: str) -> str:
    """A markdown image is high only with a placeholder in its match: in the alt text or in the
    URL.  A README's badges (``![coverage](https://…?token=…)``) no longer wake the rule.  Like
    the rule, the runs are possessive and a URL never runs past the next ``![``, each stopping
    at the first placeholder (so linear as a Python regex too, though only its RE2 translation
    ever reads text); the rule's alt text and URL are runs these contain."""
    return (rf"!\[(?:[^\]!\n{_FIRSTS}]|{_NOT_PLACEHOLDER}){{0,200}}+{_PLACEHOLDERS}"
            rf"|!\[[^\]!\n]{{0,200}}+\]\(\s*+https?://(?:[^)\s!{_FIRSTS}]|!(?!\[)|{_NOT_PLACEHOLDER})*+"
            rf"{_PLACEHOLDERS}")


def _file_gate(pattern: str) -> str | None:
    """A file instruction that names ``.env`` is medium unless its match names another secret
    too.  High matches: every match of the rule without ``.env`` among its files (what a match
    whose file is another one is, whatever its gap holds); a ``.env`` match of the first form
    (instruction, gap, file) with another secret in its gap; one of the second form (``.env``,
    gap, ``as the X parameter``) with another secret in its gap (no dot, no line break there) or
    in the parameter's name.  None when the pattern is not the shape this reads."""
    if pattern.count("|" + _ENV) != 3 or pattern.count(_GAP) != 1:
        return None
    instruction = pattern[:pattern.index(_GAP)]
    anywhere = "|".join(re.escape(k) for k in _OTHER_SECRETS)
    in_gap = "|".join(re.escape(k) for k in _OTHER_SECRETS if "." not in k)
    in_name = "|".join(re.escape(k) for k in _OTHER_SECRETS if re.fullmatch(r"\w+", k))
    return (f"(?:{pattern.replace('|' + _ENV, '')})"
            f"|{instruction}{_GAP}(?:{anywhere}){_GAP}{_ENV}"
            rf"|{_ENV}[^.\n]{{0,60}}?(?:{in_gap})"
            rf"|{_ENV}[^.\n]{{0,60}}?\b(?:as|in|into|to|inside)\s+(?:the\s+)?[`'\"]?\w*?(?:{in_name})")


_CONDITIONAL_GATES: "dict[str, Callable[[str], str | None]]" = {
    "markdown_image_exfiltration": _image_gate,
    "sensitive_file_instruction": _file_gate,
}
_CONDITIONAL_BELOW = "medium"      # the severity of the findings these gates leave out
TAG_RULE = "tag_characters"
_TAGS = re.compile("[\U000e0000-\U000e007f]+")
# Zero-width, format, bidi and tag characters that split a word ("ign\u200bore") are dropped
# before the rules run: the definition scan's set (poisoning._STRIP).
_INVISIBLE = _STRIP
MAX_HITS = 64          # spans reported per text: a result full of matches is masked by the first 64


def rank(severity: str) -> int:
    return SEVERITIES.index(severity)


@dataclass(frozen=True, slots=True)
class Hit:
    rule: str
    severity: str
    start: int          # span in the original text
    end: int
    excerpt: str        # short and escaped: for the audit log, never a metric label


class ResultScanner:
    """The results profile of one ``RuleSet``, from ``min_severity`` up; immutable."""

    def __init__(self, rules: "RuleSet", min_severity: str = "high") -> None:
        self.floor = floor = rank(min_severity)
        self.rules: tuple["Rule", ...] = tuple(
            r for r in rules.rules if r.id in RESULT_RULES and r.where == "text"
            and (rank(RESULT_SEVERITY.get(r.id, r.severity)) >= floor or r.id == "markdown_image_exfiltration"))
        tag = rules.severity(TAG_RULE)
        self.tag_severity = tag if tag is not None and rank(tag) >= floor else None
        # One RE2 pass says which rules may match the lower-cased text; a case-sensitive rule
        # reads the original text and always runs.
        self._gate = RegexGate([r.lower for r in self.rules], conditional_gates(self.rules, floor))
        # Each rule's trigger words in ASCII text, found in one RE2 pass (None: str.find each).
        self._finders = tuple(substring_finder(r.triggers) for r in self.rules)
        # clean(text), for ASCII text: True when no rule can match it (scan would find nothing).
        self.clean = self._gate.clean_ascii

    def scan(self, text: str) -> list[Hit]:
        """Every match in ``text`` (at most ``MAX_HITS``), spans in ``text``'s own offsets."""
        hits: list[Hit] = []
        if text.isascii():
            # One RE2 pass over the text as it came; nearly every result ends here.
            candidates: "Iterable[int]" = self._gate.candidates(text, cased=True)
            if not candidates:
                return hits
            norm, where = text, None
            lowered: str | None = text.lower()
        else:
            if self.tag_severity is not None:
                for m in _TAGS.finditer(text):
                    hits.append(Hit(TAG_RULE, self.tag_severity, m.start(), m.end(),
                                    escape_excerpt(m.group(0), 20)))
            norm, where = normalise(text)
            lowered = norm.lower()
            if len(lowered) != len(norm):        # "İ" lower-cases to two characters
                lowered = None
            candidates = self._gate.candidates(lowered) if lowered is not None else range(len(self.rules))
        # ASCII (the lower-cased text is): RE2 says where each rule's matches may start.
        data = lowered.encode() if lowered is not None and lowered.isascii() else None
        for index, windows in self._plan(lowered, candidates, data).items():
            rule = self.rules[index]
            regex, subject, ascii = (rule.lower, lowered, data) if rule.lower is not None and lowered is not None \
                else (rule.regex, norm, None)
            for start, end in windows or ((0, len(subject)),):
                for m in self._gate.finditer(index, regex, subject, start, end, ascii):
                    if m.end() == m.start():
                        continue
                    found = norm[m.start():m.end()]
                    severity = RESULT_SEVERITY.get(rule.id, rule.severity)
                    if rule.id == "markdown_image_exfiltration" and any(p in found.lower() for p in _PLACEHOLDER):
                        severity = "high"
                    elif rule.id in _FILE_RULES and ".env" in (low := found.lower()) and \
                            not any(k in low for k in _OTHER_SECRETS):
                        severity = "medium"
                    if rank(severity) < self.floor:
                        continue
                    a, b = m.span()
                    if where is not None:
                        a, b = where[a], where[b - 1] + 1
                    hits.append(Hit(rule.id, severity, a, b, escape_excerpt(found)))
                    if len(hits) >= MAX_HITS:
                        return hits
        return hits

    def _plan(self, lowered: str | None, candidates: "Iterable[int]",
              ascii: bytes | None = None) -> dict[int, list[tuple[int, int]] | None]:
        """Rule index -> the merged windows around its triggers where it may match (None:
        everywhere), for the rules the gate cannot rule out.  ``ascii``: ``lowered`` as bytes,
        when it is ASCII (the triggers are then found in one RE2 pass per rule)."""
        if lowered is None:
            return {i: None for i in candidates}
        plan: dict[int, list[tuple[int, int]] | None] = {}
        for owner in candidates:
            triggers = self.rules[owner].triggers
            if not triggers:
                plan[owner] = None
                continue
            finder = self._finders[owner] if ascii is not None else None
            if finder is not None:
                found = finder(ascii)
            else:
                found = []
                for trigger in triggers:
                    i = lowered.find(trigger)
                    while i != -1:
                        found.append(i)
                        i = lowered.find(trigger, i + 1)
                found.sort()
            if not found:
                continue
            windows: list[tuple[int, int]] = []
            start, end = max(0, found[0] - TRIGGER_SPAN), found[0] + TRIGGER_SPAN
            for i in found[1:]:
                if i - TRIGGER_SPAN > end:
                    windows.append((start, end))
                    start = i - TRIGGER_SPAN
                end = i + TRIGGER_SPAN
            windows.append((start, min(end, len(lowered))))
            plan[owner] = windows
        return plan


def conditional_gates(rules: "Sequence[Rule]", floor: int) -> dict[int, re.Pattern[str]]:
    """Index in ``rules`` -> what the gate looks for instead (``_CONDITIONAL_GATES``), for the
    built-in rules when ``floor`` (a rank) is above ``_CONDITIONAL_BELOW``.  Only their RE2
    translations ever read text (``RegexGate`` keeps nothing else)."""
    gates: dict[int, re.Pattern[str]] = {}
    if rank(_CONDITIONAL_BELOW) >= floor:
        return gates
    for i, r in enumerate(rules):
        build = _CONDITIONAL_GATES.get(r.id)
        if build is not None and r.lower is not None and r.lower.pattern == _builtin_patterns().get(r.id) \
                and (gate := build(r.lower.pattern)) is not None:
            gates[i] = re.compile(gate, r.lower.flags)
    return gates


@functools.cache
def _builtin_patterns() -> dict[str, str]:
    """Rule id -> pattern, as the built-in rules file writes them (read as ``RuleSet.load``
    reads it)."""
    from .poisoning_load import read_rules_file

    rules: dict[str, dict[str, Any]] = {}
    read_rules_file(BUILTIN_RULES, rules, {k: dict(v) for k, v in DETECTORS.items()}, [])
    return {rid: spec["pattern"] for rid, spec in rules.items() if isinstance(spec.get("pattern"), str)}


def normalise(text: str) -> tuple[str, list[int] | None]:
    """The text the rules read, and for each of its characters the offset in ``text``
    (None: the same text).  NFKC per character, invisible characters dropped, look-alike
    letters read as the Latin ones in words that mix them with Latin letters."""
    if text.isascii():
        return text, None
    if unicodedata.is_normalized("NFKC", text) and not _INVISIBLE.search(text):
        out = _WORD.sub(_unmix, text)
        return out, None
    chars: list[str] = []
    where: list[int] = []
    for i, ch in enumerate(text):
        if ch.isascii():
            chars.append(ch)
            where.append(i)
            continue
        if _INVISIBLE.match(ch):
            continue
        for piece in unicodedata.normalize("NFKC", ch):
            chars.append(piece)
            where.append(i)
    return _WORD.sub(_unmix, "".join(chars)), where

