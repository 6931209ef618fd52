"""Tool-poisoning scan: what a tool definition tells the model, checked before the model reads it.

Two kinds of checks, both configured as data in ``poisoning_rules.yaml``:

- *rules*: regular expressions over the text the model reads (instructions
  aimed at the model, requests to read files, keys or the environment,
  references to other tools, exfiltration channels);
- *detectors*: code with parameters (invisible and bidirectional Unicode,
  ANSI escapes, homoglyph names, overlong descriptions, cross-server
  shadowing and references).

``RuleSet.scan`` depends on the definition alone, so callers memoise it per
definition; ``RuleSet.scan_context`` depends on the other mounted servers'
tools and runs per listing.  A finding names its rule, severity and where it
matched, with a short escaped excerpt; the caller decides block or warn from
the severity.
"""
from __future__ import annotations

import base64
import binascii
import bisect
import html
import os
import re
import urllib.parse
import unicodedata
from dataclasses import dataclass
from typing import Any, Iterable

from ..config.yamlloc import Loc
from ..errors import ConfigError, Problem
from .names import CONFUSABLE, STANDARD_NAME, NameIndex, homoglyphs, scripts

SEVERITIES = ("info", "low", "medium", "high", "critical")
BUILTIN_RULES = os.path.join(os.path.dirname(__file__), "poisoning_rules.yaml")
RULE_ID = r"[a-z][a-z0-9_]{0,47}"
EXCERPT_CHARS = 80
TRIGGER_SPAN = 250   # a pattern's match must lie within this many characters of a trigger

DETECTORS: dict[str, dict[str, Any]] = {
    "bidi_control": {}, "tag_characters": {}, "invisible_unicode": {}, "ansi_escape": {},
    "control_characters": {}, "nonstandard_name": {}, "homoglyph_name": {}, "mixed_script_word": {},
    "overlong_description": {"max_chars": 2048}, "oversized_definition": {"max_chars": 65536},
    "whitespace_padding": {},
    "shadowing_exact": {}, "shadowing_confusable": {}, "cross_server_reference": {"min_name_length": 6},
}
_DETECTOR_TEXT = {
    "bidi_control": "contains bidirectional control characters (text can display differently from what the model reads)",
    "tag_characters": "contains Unicode tag characters (invisible ASCII)",
    "invisible_unicode": "contains invisible characters",
    "ansi_escape": "contains terminal escape sequences",
    "control_characters": "contains control characters",
    "nonstandard_name": "tool name uses characters outside A-Z a-z 0-9 _ - .",
    "homoglyph_name": "tool name uses letters that imitate Latin ones, or mixes scripts",
    "mixed_script_word": "a word mixes Latin letters with look-alike letters from another script",
    "overlong_description": "description is far longer than usual",
    "oversized_definition": "the definition's text is too large to scan; held unread",
    "whitespace_padding": "long runs of blank lines or spaces push text out of view",
    "shadowing_exact": "another mounted server offers a tool with the same name",
    "shadowing_confusable": "another tool has a different name that looks the same",
    "cross_server_reference": "text names a tool of another mounted server",
}

_BIDI = re.compile("[\u202a-\u202e\u2066-\u2069\u200e\u200f\u061c]")
_TAGS = re.compile("[\U000e0000-\U000e007f]")
_INVISIBLE = re.compile(
    "[\u00ad\u034f\u115f\u1160\u17b4\u17b5\u180b-\u180f\u200b-\u200d\u2060-\u2064\u206a-\u206f"
    "\u2800\u3164\ufe00-\ufe0f\ufeff\uffa0\U0001d173-\U0001d17a\U000e0100-\U000e01ef]")
_STRIP = re.compile(_INVISIBLE.pattern[:-1] + _BIDI.pattern[1:-1] + _TAGS.pattern[1:])
_ESC = re.compile("[\x1b\x9b]")
_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1a\x1c-\x1f\x7f-\x9a\x9c-\x9f]")
# Each whitespace run is tried once, from its start (the look-behinds), and consumed
# possessively: linear on any input (a plain \n[ \t]*(?:\n[ \t]*){10,}\S is quadratic).
_PADDING = re.compile(r"(?<![\n \t])[ \t]*+\n[ \t]*+(?:\n[ \t]*+){10,}+\S|(?<![ \t])[ \t]{60,}+\S")
_WORD = re.compile(r"\w+")
# Encoded payloads, decoded and scanned again with the same rules (an instruction in base64,
# hex, URL- or HTML-entity encoding with "decode this and follow it" was read past). Each
# pattern is one bounded run of a character class: linear, and the decoding is budgeted.
_BASE64_RUN = re.compile(r"(?<![A-Za-z0-9+/_=-])[A-Za-z0-9+/_-]{16,8192}={0,2}")
_HEX_RUN = re.compile(r"(?<![0-9A-Fa-f])(?:[0-9A-Fa-f]{2}){12,4096}(?![0-9A-Fa-f])")
_URL_ESCAPE = re.compile(r"%[0-9A-Fa-f]{2}")
_HTML_ENTITY = re.compile(r"&#(?:[xX][0-9A-Fa-f]{1,6}|[0-9]{1,7});")
DECODE_BUDGET = 65536      # characters decoded per definition, over every payload and depth
DECODE_PAYLOADS = 32       # payloads decoded per definition
DECODE_DEPTH = 2           # a payload inside a payload is decoded once more
_CAMEL = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")
# Severity combination: signals below block level add up.  Two distinct medium signals
# (an overlong description and a note to the model; a look-alike word and an escaped ANSI
# sequence) are as telling as one high one; a low signal counts half a medium.
COMBINE_POINTS = {"low": 1, "medium": 2}
COMBINE_AT = 4             # points that raise the definition to "high"


@dataclass(frozen=True, slots=True)
class Finding:
    rule: str
    severity: str
    where: str          # JSON path of the string, e.g. inputSchema.properties.path.description
    excerpt: str        # short and escaped: safe for logs, never a metric label
    message: str

    def as_dict(self) -> dict[str, str]:
        return {"rule": self.rule, "severity": self.severity, "where": self.where,
                "excerpt": self.excerpt, "message": self.message}


@dataclass(frozen=True, slots=True)
class Rule:
    id: str
    severity: str
    message: str
    where: str
    regex: re.Pattern[str]                 # case-insensitive, for the original text
    loc: Loc | None = None
    triggers: tuple[str, ...] = ()         # lower-case substrings; the regex runs only near one
    lower: re.Pattern[str] | None = None   # case-sensitive, for the lower-cased text (2-3x faster)

    def search(self, text: str, lowered: str | None, hits: list[int] | None) -> tuple[int, int] | None:
        """(start, end) of the first match, looking only near ``hits`` (sorted trigger offsets)
        when given.  ``lowered`` is ``text.lower()`` with the same length, or None."""
        regex, subject = (self.lower, lowered) if self.lower is not None and lowered is not None else (self.regex, text)
        if hits is None:
            m = regex.search(subject)
            return m.span() if m else None
        start, end = max(0, hits[0] - TRIGGER_SPAN), hits[0] + TRIGGER_SPAN
        for i in hits[1:]:
            if i - TRIGGER_SPAN > end:
                if m := regex.search(subject, start, end):
                    return m.span()
                start = i - TRIGGER_SPAN
            end = i + TRIGGER_SPAN
        m = regex.search(subject, start, end)
        return m.span() if m else None


@dataclass(frozen=True, slots=True)
class Scanned:
    """The definition-only part of a scan; ``text`` is kept for ``scan_context``."""

    findings: tuple[Finding, ...]
    text: str


def escape_excerpt(text: str, limit: int = EXCERPT_CHARS) -> str:
    """Printable excerpt: invisible, bidi and control characters shown as ``<U+XXXX>``."""
    out = []
    for ch in text[: limit * 2]:
        if ch.isprintable() and not _STRIP.match(ch) or ch == " ":
            out.append(ch)
        else:
            out.append(f"<U+{ord(ch):04X}>")
        if len(out) >= limit:
            out.append("…")
            break
    return "".join(out)


def _printable(text: str) -> bool:
    """Decoded bytes that read as text: mostly letters, digits, punctuation and spaces."""
    if len(text) < 8:
        return False
    good = sum(1 for ch in text if ch.isprintable() or ch in "\n\t")
    return good >= 0.9 * len(text) and any(ch.isalpha() for ch in text)


def _payloads(text: str, budget: list[int]) -> list[tuple[int, str, str]]:
    """``(offset, decoded text, encoding)`` for each encoded payload in ``text`` that decodes
    to readable text; ``budget`` ([characters, payloads]) is shared by every call of a scan."""
    out: list[tuple[int, str, str]] = []

    def take(offset: int, decoded: str, how: str) -> bool:
        if budget[1] <= 0 or budget[0] < len(decoded):
            return False
        budget[0] -= len(decoded)
        budget[1] -= 1
        out.append((offset, decoded, how))
        return True

    for m in _BASE64_RUN.finditer(text):
        run = m.group(0)
        if run.isdigit():
            continue        # a number, not an encoding
        raw = run.rstrip("=")
        padded = raw + "=" * (-len(raw) % 4)
        try:
            data = base64.b64decode(padded.replace("-", "+").replace("_", "/"), validate=True)
            decoded = data.decode("utf-8")
        except (binascii.Error, ValueError):
            continue
        if _printable(decoded) and not take(m.start(), decoded, "base64"):
            return out
    for m in _HEX_RUN.finditer(text):
        try:
            decoded = bytes.fromhex(m.group(0)).decode("utf-8")
        except ValueError:
            continue
        if _printable(decoded) and not take(m.start(), decoded, "hex"):
            return out
    if len(_URL_ESCAPE.findall(text[:DECODE_BUDGET], 0)) >= 3:
        decoded = urllib.parse.unquote(text[:DECODE_BUDGET])
        if decoded != text[:DECODE_BUDGET] and not take(0, decoded, "url"):
            return out
    if _HTML_ENTITY.search(text):
        decoded = html.unescape(text[:DECODE_BUDGET])
        if decoded != text[:DECODE_BUDGET]:
            take(0, decoded, "html")
    return out


def collect_strings(tool: dict[str, Any]) -> list[tuple[str, str]]:
    """Every string the model reads in a definition, with its path (the name excluded)."""
    out: list[tuple[str, str]] = []

    def walk(value: Any, path: str, in_properties: bool) -> None:
        if isinstance(value, str):
            out.append((path, value))
        elif isinstance(value, dict):
            for key, item in value.items():
                sub = f"{path}.{key}" if path else str(key)
                if in_properties:
                    out.append((sub + "#name", str(key)))   # a parameter name is text the model reads
                walk(item, sub, key == "properties" and isinstance(item, dict))
        elif isinstance(value, list):
            for i, item in enumerate(value):
                walk(item, f"{path}[{i}]", False)

    for key, value in tool.items():
        if key != "name":
            walk(value, key, False)
    return out


def _name_words(name: str) -> str:
    """A parameter name, followed by its words ("include_your_system_prompt" also reads
    "include your system prompt"): CyberArk's full-schema poisoning writes the instruction
    as a property name, where word boundaries never fall between the words."""
    if not name.isascii() or len(name) < 8 or not any(c in name for c in "_-") and name.islower():
        return name
    words = _CAMEL.sub(" ", name).replace("_", " ").replace("-", " ")
    return f"{name} ({words})"


def combine(findings: Iterable[Finding]) -> tuple[str | None, str]:
    """The definition's severity from all its signals, and an explanation naming each one.

    The severity is the highest single one, raised to ``high`` when signals below that add
    up to ``COMBINE_AT`` points (``COMBINE_POINTS``; each rule counts once)."""
    order = {s: i for i, s in enumerate(SEVERITIES)}
    worst: str | None = None
    points: dict[str, int] = {}
    names: list[str] = []
    for f in findings:
        if worst is None or order[f.severity] > order[worst]:
            worst = f.severity
        if f.rule != "combined_signals":
            names.append(f"{f.rule} ({f.severity}, {f.where or 'definition'})")
            points[f.rule] = max(points.get(f.rule, 0), COMBINE_POINTS.get(f.severity, 0))
    if worst is not None and order[worst] < order["high"] and sum(points.values()) >= COMBINE_AT:
        worst = "high"
    return worst, "; ".join(dict.fromkeys(names))


def combined_finding(findings: list[Finding]) -> Finding | None:
    """A ``combined_signals`` finding when the signals together reach a higher severity than
    any one of them (so the caller's block-or-warn by severity sees the combination)."""
    order = {s: i for i, s in enumerate(SEVERITIES)}
    highest = max((order[f.severity] for f in findings), default=-1)
    severity, explanation = combine(findings)
    if severity is None or order[severity] <= highest:
        return None
    rules = ", ".join(dict.fromkeys(f.rule for f in findings))
    return Finding("combined_signals", severity, "", escape_excerpt(rules),
                   f"several weaker signals together: {explanation}")


def _lower(text: str) -> str | None:
    """``text.lower()`` when offsets line up with ``text`` ("İ" lower-cases to two characters)."""
    lowered = text.lower()
    return lowered if len(lowered) == len(text) else None


def _normalise(text: str) -> str:
    """NFKC with invisible characters removed, and look-alike letters in words that mix them
    with Latin ones read as the Latin letters ("іgnore" with a Cyrillic і reads "ignore");
    words wholly in another script are left alone, so the rules in that language still see
    them. Every step keeps one character per character."""
    if text.isascii():
        return text
    text = unicodedata.normalize("NFKC", _STRIP.sub("", text))
    return text if text.isascii() else _WORD.sub(_unmix, text)


def _unmix(m: "re.Match[str]") -> str:
    word = m.group(0)
    if word.isascii() or not any("a" <= ch <= "z" or "A" <= ch <= "Z" for ch in word):
        return word
    out = []
    for ch in word:
        latin = CONFUSABLE.get(ch.lower()) if not ch.isascii() else None
        out.append(latin if latin is not None and len(latin) == 1 else ch)
    return "".join(out)


class RuleSet:
    """Compiled rules and detector settings; immutable once loaded."""

    def __init__(self, rules: list[Rule], detectors: dict[str, dict[str, Any]], sources: tuple[str, ...]) -> None:
        self.rules = tuple(r for r in rules)
        self.detectors = detectors
        self.sources = sources
        by_trigger: dict[str, list[int]] = {}
        for i, rule in enumerate(self.rules):
            for trigger in rule.triggers:
                by_trigger.setdefault(trigger, []).append(i)
        self._triggers = tuple((t, tuple(ix)) for t, ix in by_trigger.items())
        self._untriggered = tuple(i for i, r in enumerate(self.rules) if not r.triggers)

    def _plan(self, text: str, lowered: str | None) -> dict[int, list[int] | None]:
        """Which rules can match ``text`` and where: rule index -> sorted trigger offsets
        (None: search everywhere).  One pass of ``str.find`` per distinct trigger."""
        if lowered is None:
            return {i: None for i in range(len(self.rules))}
        plan: dict[int, list[int] | None] = {i: None for i in self._untriggered}
        for trigger, owners in self._triggers:
            i = lowered.find(trigger)
            while i != -1:
                for owner in owners:
                    hits = plan.get(owner)
                    if hits is None:
                        plan[owner] = [i]
                    else:
                        hits.append(i)
                i = lowered.find(trigger, i + 1)
        for hits in plan.values():
            if hits is not None:
                hits.sort()
        return plan

    @classmethod
    def load(cls, extra_files: Iterable[str] = ()) -> "RuleSet":
        """The built-in rules merged with ``extra_files`` (by rule id); ConfigError lists every problem."""
        from .poisoning_load import read_rules_file

        problems: list[Problem] = []
        rules: dict[str, dict[str, Any]] = {}
        detectors: dict[str, dict[str, Any]] = {k: dict(v) for k, v in DETECTORS.items()}
        sources = (BUILTIN_RULES, *extra_files)
        for path in sources:
            read_rules_file(path, rules, detectors, problems)
        compiled = []
        for rid, spec in rules.items():
            if not spec.get("enabled", True):
                continue
            if spec.get("pattern") is None or spec.get("severity") is None:
                problems.append(Problem(spec["loc"], f"rule {rid!r} needs a pattern and a severity"))
                continue
            sensitive = bool(spec.get("case_sensitive"))
            flags = re.VERBOSE | re.MULTILINE
            try:
                regex = re.compile(spec["pattern"], flags | (0 if sensitive else re.IGNORECASE))
                lower = None if sensitive else re.compile(spec["pattern"], flags)
            except re.error as exc:
                problems.append(Problem(spec["loc"], f"rule {rid!r}: invalid regular expression: {exc}"))
                continue
            compiled.append(Rule(rid, spec["severity"], spec.get("message") or rid,
                                 spec.get("where", "text"), regex, spec["loc"],
                                 tuple(t.lower() for t in spec.get("triggers", ())), lower))
        if problems:
            raise ConfigError(problems)
        return cls(compiled, detectors, tuple(sources))

    def severity(self, detector: str) -> str | None:
        d = self.detectors.get(detector)
        return None if d is None or not d.get("enabled", True) else d.get("severity")

    # -- the scan --------------------------------------------------------------

    def scan(self, tool: dict[str, Any]) -> Scanned:
        """Checks that depend on this definition alone (memoise per definition)."""
        found: list[Finding] = []
        name = tool.get("name")
        name = name if isinstance(name, str) else ""
        strings = collect_strings(tool)
        limit = self.detectors["oversized_definition"].get("max_chars", 65536)
        size = sum(len(raw) for _, raw in strings)
        if size > limit:
            # Scanning cost grows with the text; a definition this large is refused unread.
            self._add(found, "oversized_definition", "", f"{size} characters (limit {limit})")
            return Scanned(tuple(found), "")
        self._scan_characters([("name", name), *strings], found)
        self._scan_name(name, found)
        description = tool.get("description")
        if isinstance(description, str):
            self._check_length(description, found)
        parts: list[str] = []
        starts: list[int] = []
        paths: list[str] = []
        offset = 0
        for path, raw in strings:
            norm = _normalise(raw)
            if path.endswith("#name"):
                norm = _name_words(norm)
            starts.append(offset)
            paths.append(path)
            parts.append(norm)
            offset += len(norm) + 2
        text = "\n\n".join(parts)
        lowered = _lower(text)
        plan = self._plan(text, lowered)
        desc_plan: dict[int, list[int] | None] | None = None
        for index in sorted(plan):
            rule = self.rules[index]
            if rule.where == "description":
                if isinstance(description, str):
                    desc = _normalise(description)
                    desc_low = _lower(desc)
                    desc_plan = desc_plan if desc_plan is not None else self._plan(desc, desc_low)
                    if index in desc_plan and (span := rule.search(desc, desc_low, desc_plan[index])):
                        found.append(Finding(rule.id, rule.severity, "description",
                                             escape_excerpt(desc[span[0]:span[1]]), rule.message))
                continue
            span = rule.search(text, lowered, plan[index])
            if span is not None:
                where = paths[max(0, bisect.bisect_right(starts, span[0]) - 1)] if paths else ""
                found.append(Finding(rule.id, rule.severity, where, escape_excerpt(text[span[0]:span[1]]),
                                     rule.message))
        self._scan_decoded(text, paths, starts, found)
        raised = combined_finding(found)
        if raised is not None:
            found.append(raised)
        return Scanned(tuple(found), text)

    def _scan_decoded(self, text: str, paths: list[str], starts: list[int], found: list[Finding]) -> None:
        """The text rules again over every payload hidden in encoded form, within a budget."""
        seen = {f.rule for f in found}
        budget = [DECODE_BUDGET, DECODE_PAYLOADS]
        queue = [(text, "", 0, None)]
        while queue:
            source, kind, depth, where = queue.pop()       # depth: decodings applied to source
            for offset, decoded, how in _payloads(source, budget):
                path = where
                if path is None:
                    path = paths[max(0, bisect.bisect_right(starts, offset) - 1)] if paths else ""
                label = f"{kind}+{how}" if kind else how
                norm = _normalise(decoded)
                low = _lower(norm)
                plan = self._plan(norm, low)
                for index in sorted(plan):
                    rule = self.rules[index]
                    if rule.where != "text" or rule.id in seen or rule.id == "encoded_payload":
                        continue
                    span = rule.search(norm, low, plan[index])
                    if span is not None:
                        seen.add(rule.id)
                        found.append(Finding(rule.id, rule.severity, f"{path} ({label}-decoded)",
                                             escape_excerpt(norm[span[0]:span[1]]),
                                             f"{rule.message} (inside {label}-encoded text)"))
                if depth + 1 < DECODE_DEPTH:
                    queue.append((norm, label, depth + 1, path))

    def scan_context(self, server: str, name: str, scanned: Scanned, index: NameIndex) -> list[Finding]:
        """Checks against the other mounted servers' tools: shadowing and cross-server references."""
        out: list[Finding] = []
        exact_sev, conf_sev = self.severity("shadowing_exact"), self.severity("shadowing_confusable")
        for other_server, other, exact in index.collisions(server, name):
            sev = exact_sev if exact else conf_sev
            if sev is not None:
                rule = "shadowing_exact" if exact else "shadowing_confusable"
                detail = _DETECTOR_TEXT[rule]
                if not index.impostor(server, name, other_server, other):
                    # The genuine side of the pair: told, never held (the impostor is).
                    sev, detail = "info", f"{detail}; this one is the genuine tool, the other is held"
                out.append(Finding(rule, sev, "name", escape_excerpt(f"{name} ~ {other_server}/{other}"), detail))
        sev = self.severity("cross_server_reference")
        if sev is not None and scanned.text:
            min_length = self.detectors["cross_server_reference"].get("min_name_length", 6)
            for other_server, other in index.mentions(server, scanned.text, min_length)[:3]:
                out.append(Finding("cross_server_reference", sev, "text",
                                   escape_excerpt(f"{other_server}/{other}"), _DETECTOR_TEXT["cross_server_reference"]))
        return out

    def _add(self, found: list[Finding], detector: str, where: str, excerpt: str) -> None:
        sev = self.severity(detector)
        if sev is not None and not any(f.rule == detector and f.where == where for f in found):
            found.append(Finding(detector, sev, where, escape_excerpt(excerpt), _DETECTOR_TEXT[detector]))

    def _scan_characters(self, strings: list[tuple[str, str]], found: list[Finding]) -> None:
        for path, raw in strings:
            if raw.isascii() and raw.isprintable():
                continue
            if not raw.isascii():
                self._scan_unicode(path, raw, found)
            if m := _ESC.search(raw):
                self._add(found, "ansi_escape", path, raw[max(0, m.start() - 10):m.end() + 20])
            if m := _CONTROL.search(raw):
                self._add(found, "control_characters", path, raw[max(0, m.start() - 10):m.end() + 20])
            if "\n" in raw or "  " in raw:
                if m := _PADDING.search(raw):
                    self._add(found, "whitespace_padding", path, repr(m.group(0)[:30]))

    def _scan_unicode(self, path: str, raw: str, found: list[Finding]) -> None:
        if m := _BIDI.search(raw):
            self._add(found, "bidi_control", path, raw[max(0, m.start() - 20):m.end() + 20])
        if m := _TAGS.search(raw):
            self._add(found, "tag_characters", path, raw[max(0, m.start() - 20):m.end() + 20])
        for m in _INVISIBLE.finditer(raw):
            if not _benign_joiner(raw, m.start()):
                self._add(found, "invisible_unicode", path, raw[max(0, m.start() - 20):m.end() + 20])
                break
        if self.severity("mixed_script_word"):
            for w in _WORD.finditer(raw):
                word = w.group(0)
                if not word.isascii() and any(c.isascii() and c.isalpha() for c in word) and homoglyphs(word):
                    self._add(found, "mixed_script_word", path, word)
                    break

    def _scan_name(self, name: str, found: list[Finding]) -> None:
        if not STANDARD_NAME.fullmatch(name):
            self._add(found, "nonstandard_name", "name", name)
        if not name.isascii() and (homoglyphs(name) or len(scripts(name)) > 1):
            self._add(found, "homoglyph_name", "name", name)

    def _check_length(self, description: str, found: list[Finding]) -> None:
        limit = self.detectors["overlong_description"].get("max_chars", 2048)
        if len(description) > limit:
            self._add(found, "overlong_description", "description", f"{len(description)} characters (limit {limit})")


def _benign_joiner(text: str, i: int) -> bool:
    """U+FE0F after a symbol and U+200D between symbols are how emoji are written."""
    ch = text[i]
    before = unicodedata.category(text[i - 1]) if i > 0 else ""
    if ch == "\ufe0f":
        return before in ("So", "Sk", "Sm") or (i > 0 and text[i - 1].isdigit())
    if ch == "\u200d" and i + 1 < len(text):
        after = unicodedata.category(text[i + 1])
        return before in ("So", "Mn", "Sk") and after == "So"
    return False
