"""A one-pass gate in front of many Python regexes: RE2 says which of them may match.

The result scanner runs ~20 rules written for Python's ``re`` over every result.  Run one by
one near their trigger words they cost ~0.25 µs per character of prose (prose is full of the
trigger words *not*, *user*, *system*), so a 2 KiB result cost ~0.6 ms.  RE2 runs all of
them in one automaton pass instead, a few nanoseconds per character.

RE2 is not Python's ``re``: no look-arounds, no back-references, ASCII ``\\b`` and ``\\w``.
So each rule is *translated to a superset of itself*, from Python's own parse tree of the
pattern (``re._parser``, so verbose mode, escapes and classes are read exactly as ``re``
reads them): assertions (``^``, look-arounds; ``\\b`` except in the ASCII translation, where
Python's word boundary is RE2's) become empty, lazy and possessive
repeats greedy, Unicode classes wider; a class that cannot be widened exactly becomes "any
character".  Anything that matches the Python rule therefore matches its translation, and
the Python rule stays the judge of every text the gate lets through.  A rule that cannot be
translated (a back-reference) is never gated: it always runs.

Each RE2 search is always right (when its DFA runs out of memory RE2 falls back to its
NFA: slower, still linear; an ``RE2::Set``, which would name every matching pattern in one
pass, instead reports "no match" then, and is not used).  One search of the alternation of
every translation says *whether* any rule may match, from the leftmost place one may; only
then does each rule's own translation, from there on, say *which*.  Clean text, nearly all
of it, costs the one pass.
"""
from __future__ import annotations

import re
import re._constants as C
import re._parser as P
from typing import Any, Callable, Iterable, Iterator, Sequence

try:
    import re2
except ImportError:                      # pragma: no cover - declared dependency; the scanner works without it
    re2 = None

MAX_MEM = 64 << 20                       # bytes per RE2 object (program + DFA cache)
# The helpers that only run once the gate matched (the set, each rule's starts): smaller caches.
# Out of memory, a search falls back to RE2's NFA (slower, still linear) and the set's empty
# answer to the searches one by one: what these hold back is time, never a match.
AUX_MAX_MEM = 8 << 20
_REPEAT_CAP = 1000                       # RE2's largest counted repetition

# Class items, as a superset ("wide") and as a subset ("narrow") of Python's str semantics.
# A negated class must be built from subsets so that its complement is a superset.
_WIDE = {C.CATEGORY_DIGIT: r"\p{Nd}", C.CATEGORY_WORD: r"\pL\pN\pM_",
         C.CATEGORY_SPACE: r"\t-\r\x{1c}-\x{20}\x{85}\x{a0}\p{Z}"}
_NARROW = {C.CATEGORY_DIGIT: "0-9", C.CATEGORY_WORD: "0-9A-Za-z_", C.CATEGORY_SPACE: r"\t-\r "}
# On ASCII text Python's classes are exactly these (str.isspace: \t-\r, \x1c-\x1f, space).
_ASCII = {C.CATEGORY_DIGIT: "0-9", C.CATEGORY_WORD: "0-9A-Za-z_", C.CATEGORY_SPACE: r"\t-\r\x{1c}-\x{20}"}
_NOT = {C.CATEGORY_NOT_DIGIT: C.CATEGORY_DIGIT, C.CATEGORY_NOT_WORD: C.CATEGORY_WORD,
        C.CATEGORY_NOT_SPACE: C.CATEGORY_SPACE}
# Positions RE2 reads as Python does: "^" and "\\A" as any line start, "$" and "\\Z" as any line
# end (supersets); word boundaries only in the ASCII translation, where the two agree.
_LINE_AT = {C.AT_BEGINNING: "(?m:^)", C.AT_BEGINNING_LINE: "(?m:^)", C.AT_BEGINNING_STRING: "(?m:^)",
            C.AT_END: "(?m:$)", C.AT_END_LINE: "(?m:$)", C.AT_END_STRING: "(?m:$)"}
_ASCII_AT = {C.AT_BOUNDARY: r"\b", C.AT_NON_BOUNDARY: r"\B", **_LINE_AT}
_ANY = r"(?s:.)"
_NEVER = r"[^\x{0}-\x{ff}]"              # an empty class (Latin-1 patterns: ASCII text only)


class Untranslatable(Exception):
    """A construct with no RE2 superset (a back-reference): the rule is never gated."""


class _Emitter:
    r"""Python parse tree -> RE2 pattern text.  ``ascii``: for ASCII text only, as a Latin-1
    pattern: a non-ASCII literal can never match there, classes keep their ASCII members
    (exact for ``\w``, ``\s``, ``\d`` on ASCII), and the automaton stays small."""

    def __init__(self, ascii: bool) -> None:
        self.ascii = ascii

    def char(self, code: int) -> str:
        if self.ascii and code > 0x7F:
            return _NEVER
        ch = chr(code)
        return ch if ch.isascii() and ch.isalnum() else f"\\x{{{code:x}}}"

    def klass(self, items: list[tuple[Any, Any]]) -> str:
        negate = bool(items) and items[0][0] is C.NEGATE
        if negate:
            items = items[1:]
        parts: list[str] = []
        for op, av in items:
            if op is C.LITERAL:
                if not (self.ascii and av > 0x7F):
                    parts.append(self.char(av))
            elif op is C.RANGE:
                lo, hi = av[0], min(av[1], 0x7F) if self.ascii else av[1]
                if lo <= hi:
                    parts.append(f"{self.char(lo)}-{self.char(hi)}")
            elif op is C.CATEGORY and av in _WIDE:
                parts.append((_ASCII if self.ascii else _NARROW if negate else _WIDE)[av])
            elif op is C.CATEGORY and av in _NOT and len(items) == 1:
                # \S, \W, \D alone: the complement of a subset of the positive class.
                positive = (_ASCII if self.ascii else _WIDE if negate else _NARROW)[_NOT[av]]
                return f"[{'' if negate else '^'}{positive}]"
            else:                         # a negated category among other items, or an unknown item
                return _ANY
        if not parts:
            return _ANY if negate else _NEVER if self.ascii else r"[^\x{0}-\x{10ffff}]"
        return f"[{'^' if negate else ''}{''.join(parts)}]"

    def emit(self, tree: Iterable[tuple[Any, Any]]) -> str:
        out: list[str] = []
        for op, av in tree:
            if op is C.LITERAL:
                out.append(self.char(av))
            elif op is C.NOT_LITERAL:
                out.append(_ANY if self.ascii and av > 0x7F else f"[^{self.char(av)}]")
            elif op is C.ANY:
                out.append(_ANY)          # a superset whatever DOTALL says
            elif op is C.IN:
                out.append(self.klass(list(av)))
            elif op in _REPEATS:
                lo, hi, sub = av
                bound = "" if hi is C.MAXREPEAT or hi > _REPEAT_CAP else str(hi)
                out.append(f"(?:{self.emit(sub)}){{{min(lo, _REPEAT_CAP)},{bound}}}")
            elif op is C.SUBPATTERN:
                _group, add, _remove, sub = av
                # (?-i:…) is left out: reading case-insensitively only widens the match.
                out.append(f"(?{'i' if add & re.IGNORECASE else ''}:{self.emit(sub)})")
            elif op is C.ATOMIC_GROUP:
                out.append(f"(?:{self.emit(av)})")
            elif op is C.BRANCH:
                out.append("(?:" + "|".join(self.emit(b) for b in av[1]) + ")")
            elif op is C.AT and av in (_ASCII_AT if self.ascii else _LINE_AT):
                out.append(_ASCII_AT[av])
            elif op in (C.AT, C.ASSERT, C.ASSERT_NOT):
                continue                  # dropping an assertion only widens the match
            elif op is C.CATEGORY:
                out.append(self.klass([(C.CATEGORY, av)]))
            else:                         # GROUPREF, GROUPREF_EXISTS, …
                raise Untranslatable(str(op))
        return "".join(out)


_REPEATS = (C.MAX_REPEAT, C.MIN_REPEAT, C.POSSESSIVE_REPEAT)


def _trim(items: list[tuple[Any, Any]], end: bool) -> list[tuple[Any, Any]]:
    """``items`` without what a search for *some* match does not need at one edge: a match
    of ``x y{0,40}`` contains one of ``x``, and of ``x y{2,9}`` one of ``x y{2}``.  Fewer
    counters, far fewer automaton states, the same answer to "is there a match".  A word
    boundary at the edge stays when what it borders is kept as it was (``\\bnot``: "another"
    starts nothing); the ASCII translation keeps it, the wide one drops it."""
    items = list(items)
    while items:
        i = len(items) - 1 if end else 0
        op, av = items[i]
        if op is C.AT and av in _ASCII_AT and (len(items) == 1 or _edge(items[i - 1 if end else 1], end)[1] is False):
            break
        if op in (C.AT, C.ASSERT, C.ASSERT_NOT) or (op in _REPEATS and av[0] == 0):
            del items[i]
            continue
        items[i] = _edge(items[i], end)[0]
        break
    return items


def _edge(item: tuple[Any, Any], end: bool) -> tuple[tuple[Any, Any], bool]:
    """``item`` trimmed at one edge, and whether that changed it."""
    op, av = item
    if op in _REPEATS:
        lo, _hi, sub = av
        return ((C.SUBPATTERN, (None, 0, 0, _trim(list(sub), end))) if lo == 1 else (op, (lo, lo, sub))), True
    if op is C.SUBPATTERN:
        sub = _trim(list(av[3]), end)
        return ((op, (*av[:3], sub)), True) if _differ(sub, av[3]) else (item, False)
    if op is C.ATOMIC_GROUP:
        sub = _trim(list(av), end)
        return ((op, sub), True) if _differ(sub, av) else (item, False)
    if op is C.BRANCH:
        branches = [_trim(list(b), end) for b in av[1]]
        if any(_differ(new, old) for new, old in zip(branches, av[1])):
            return (op, (av[0], branches)), True
    return item, False


def _differ(new: list[tuple[Any, Any]], old: Iterable[tuple[Any, Any]]) -> bool:
    old = list(old)
    return len(new) != len(old) or any(a is not b for a, b in zip(new, old))


def translate(regex: re.Pattern[str], ascii: bool = False, trim: bool = True) -> str:
    """An RE2 pattern that matches (within) every match of ``regex``; Untranslatable if none.
    ``ascii``: a Latin-1 pattern that does so on ASCII text.  ``trim=False``: the edges kept,
    so that wherever a match of ``regex`` starts, one of the translation starts too."""
    tree = P.parse(regex.pattern, regex.flags)
    prefix = "(?i)" if tree.state.flags & re.IGNORECASE else ""
    items = list(tree.data)
    return prefix + _Emitter(ascii).emit(_trim(_trim(items, True), False) if trim else items)


class RegexGate:
    """Which of ``regexes`` (indexed as given) may match a text; immutable, thread-safe."""

    def __init__(self, regexes: Sequence[re.Pattern[str] | None],
                 gates: "dict[int, re.Pattern[str]] | None" = None) -> None:
        """``regexes[i]`` is None for a regex that must always run (never gated).  ``gates[i]``,
        when given, decides instead whether ``regexes[i]`` is a candidate: a regex that matches
        (within) every match of ``regexes[i]`` that the caller would act on, so that a text it
        clears holds none of those (``finditer`` still finds where ``regexes[i]`` matches)."""
        compiled: list[tuple[int, str, str, Any]] = []
        gates = gates or {}
        ungated = [i for i, regex in enumerate(regexes) if regex is None or re2 is None]
        self._any: Any = None
        self._any_ascii: Any = None
        self._starts: dict[int, Any] = {}
        self._set_match: Any = None       # ASCII text: every gated regex whose translation matches, in one pass
        self._set_index: tuple[int, ...] = ()
        if re2 is not None:
            options, latin1 = _options(MAX_MEM), _options(MAX_MEM, latin1=True)
            aux = _options(AUX_MAX_MEM, latin1=True)
            for i, regex in enumerate(regexes):
                if regex is None:
                    continue
                try:
                    gate = gates.get(i, regex)
                    pattern, ascii_pattern = translate(gate), translate(gate, ascii=True)
                    wide = re2.compile(pattern, options)
                    if wide.search("") is not None:
                        raise Untranslatable("matches the empty string: it would let every text through")
                    re2.compile(ascii_pattern.encode(), latin1)
                    compiled.append((i, pattern, ascii_pattern, wide))
                except (Untranslatable, re.error, re2.error, OverflowError):
                    ungated.append(i)
                    continue
                try:
                    # Where a match may start in ASCII text (finditer): the untrimmed translation.
                    self._starts[i] = re2.compile(f"(?i:{translate(regex, ascii=True, trim=False)})".encode(),
                                                  aux)
                except (Untranslatable, re.error, re2.error, OverflowError):
                    pass                  # finditer then lets the regex search every position itself
            if compiled:
                try:
                    self._any = re2.compile("|".join(f"(?:{p})" for _, p, _, _ in compiled), options)
                    # ASCII text, as it came: case folded by the automaton, one byte a character.
                    ascii_any = "|".join(f"(?:{p})" for _, _, p, _ in compiled)
                    self._any_ascii = re2.compile(f"(?i:{ascii_any})".encode(), latin1)
                except re2.error:         # too large together: nothing is gated
                    ungated.extend(i for i, _, _, _ in compiled)
                    compiled = []
                    self._starts = {}
                self._set_match, self._set_index = _set(compiled, aux)
        self._each: tuple[tuple[int, Any], ...] = tuple((i, r) for i, _, _, r in compiled)
        self.gated: tuple[int, ...] = tuple(i for i, _ in self._each)
        self.ungated: tuple[int, ...] = tuple(sorted(ungated))
        # clean_ascii's one call: the binding under the wrapper (see _first_raw), when it is there.
        self._ascii_match: Any = self._any_ascii._regexp.Match \
            if _first is _first_raw and self._any_ascii is not None and not self.ungated else None

    def clean_ascii(self, text: str) -> bool:
        """For ASCII ``text`` as it came: True when no regex may match it, i.e. when
        ``candidates(text, cased=True)`` is empty.  The common case, in one call into RE2."""
        match = self._ascii_match
        if match is None:
            return not self.candidates(text, cased=True)
        data = text.encode()
        return match(_UNANCHORED, data, 0, len(data))[0][0] < 0

    def candidates(self, text: str, cased: bool = False) -> tuple[int, ...]:
        """Indices of the regexes that may match ``text``: the ungated ones, plus every gated
        one whose translation matches.  ``text`` is lower-cased, as the regexes read it; or,
        ``cased``, ASCII as it came: the gate then folds case itself, which for ASCII text
        is the same as reading it lower-cased, and saves lower-casing the clean majority."""
        if self._any is None:
            return self.ungated
        data = text.encode()
        start = _first(self._any_ascii if cased else self._any, data, 0)
        if start < 0:                     # the clean majority: one call into RE2
            return self.ungated
        found: "list[int] | None" = None
        if self._set_match is not None and (cased or text.isascii()):
            # ASCII: one pass of the set of ASCII translations names every gated regex that may
            # match (20 searches from the gate's match cost three times as much).  The gate
            # matched, so an empty answer can only mean the set's automaton ran out of memory
            # (RE2 then names nothing): the searches one by one below decide instead.
            named = self._set_match(data)
            if named:
                found = sorted(self._set_index[k] for k in named)
        if found is None:
            if cased:
                data = data.lower()       # ASCII: the same bytes as text.lower().encode()
            # No translation matches before the leftmost match of their alternation.
            found = [i for i, regex in self._each if _first(regex, data, start) >= 0]
        return tuple(sorted((*found, *self.ungated))) if self.ungated else tuple(found)

    def finditer(self, index: int, regex: re.Pattern[str], subject: str, start: int, end: int,
                 ascii: bytes | None) -> Iterator[re.Match[str]]:
        """The matches of ``regex.finditer(subject, start, end)``, the same ones in the same order
        (``regex`` is ``regexes[index]``, or one that matches nowhere ``regexes[index]`` does not).  ``ascii``: ``subject``
        as bytes, when it is ASCII; RE2 then says where a match may start and ``regex`` is tried
        there only (``_guided``), instead of at every position of the window."""
        starts = self._starts.get(index) if ascii is not None else None
        if starts is None:
            return regex.finditer(subject, start, end)
        return _guided(starts, regex, subject, ascii, start, end)


def _options(max_mem: int, latin1: bool = False) -> Any:
    """RE2 options: ``max_mem`` bytes (program + DFA cache), no logging, UTF-8 or Latin-1."""
    options = re2.Options()
    options.max_mem = max_mem
    options.log_errors = False
    if latin1:
        options.encoding = re2.Options.Encoding.LATIN1
    return options


def substring_finder(words: Iterable[str]) -> "Callable[[bytes], list[int]] | None":
    """For ASCII text as bytes: every offset where one of ``words`` starts, overlapping ones
    included, in order (what ``str.find`` from each offset + 1 finds, one RE2 pass over the
    text instead of a pass per word).  Words that are not ASCII cannot occur there and are left
    out; None when RE2 is missing, a word is empty or there is no ASCII word."""
    ascii_words = sorted({w for w in words if w.isascii()})
    if re2 is None or _UNANCHORED is None or not ascii_words or "" in ascii_words:
        return None
    try:
        match = re2.compile("|".join(re2.escape(w) for w in ascii_words).encode(),
                            _options(AUX_MAX_MEM, latin1=True))._regexp.Match
    except (re2.error, AttributeError):
        return None

    def find(data: bytes) -> list[int]:
        found: list[int] = []
        pos, size = 0, len(data)
        while True:
            at = match(_UNANCHORED, data, pos, size)[0][0]
            if at < 0:
                return found
            found.append(at)
            pos = at + 1

    return find


_GUIDED_MISSES = 64       # positions RE2 names where the regex then fails, before it searches itself


def _guided(starts: Any, regex: re.Pattern[str], subject: str, data: bytes, start: int,
            end: int) -> Iterator[re.Match[str]]:
    """``regex.finditer(subject, start, end)`` for ASCII ``subject`` (``data``, its bytes).

    ``starts`` (the untrimmed translation) matches wherever a match of ``regex`` starts, so no
    match of ``regex`` starts before the leftmost of ``starts`` from ``pos``, ``r``: ``regex``
    is tried at ``r``, and the search goes on after its match, or from ``r + 1``.  RE2 sees the
    text as ``regex`` does: what precedes ``pos`` (for ``\b`` and ``^``), nothing past ``end``.
    An empty match (finditer's rules for what follows one are its own) and a translation that
    keeps naming places where ``regex`` fails hand the rest of the window to finditer, which
    from there finds what it would have found from ``start``."""
    view = memoryview(data)[:end]
    pos, misses = start, 0
    while pos < end:
        r = _first(starts, view, pos)
        if r < 0:
            return
        m = regex.match(subject, r, end)
        if m is None:
            misses += 1
            if misses > _GUIDED_MISSES:
                yield from regex.finditer(subject, r + 1, end)
                return
            pos = r + 1
            continue
        if m.end() == m.start():
            yield from regex.finditer(subject, r, end)
            return
        yield m
        pos = m.end()


def _set(compiled: list[tuple[int, str, str, Any]], latin1: Any) -> tuple[Any, tuple[int, ...]]:
    """An RE2 set of the ASCII translations (unanchored: every one that matches, one pass), as
    (its match function, the regex index of each member); (None, ()) when it cannot be built."""
    if not compiled or not hasattr(re2, "Set"):
        return None, ()
    try:
        members = re2.Set.SearchSet(latin1)
        for _, _, ascii_pattern, _ in compiled:
            members.Add(f"(?i:{ascii_pattern})".encode())
        members.Compile()
    except re2.error:
        return None, ()
    raw = getattr(members, "_set", None)      # the binding under the wrapper: a list, [] for none
    return (raw.Match if raw is not None else lambda data: members.Match(data) or []), \
        tuple(i for i, _, _, _ in compiled)


def _first_public(regex: Any, data: bytes, pos: int) -> int:
    """Byte offset of the leftmost match in ``data`` from ``pos``, or -1."""
    m = regex.search(data, pos)
    return -1 if m is None else m.start()


def _first_raw(regex: Any, data: bytes, pos: int) -> int:
    # The binding under google-re2's Python wrapper: one call, no generator, no match
    # object (a third of a clean 2 KiB result's cost).  Same answer as _first_public.
    return regex._regexp.Match(_UNANCHORED, data, pos, len(data))[0][0]


_UNANCHORED = getattr(getattr(re2, "_Anchor", None), "UNANCHORED", None)
_first = _first_raw if _UNANCHORED is not None and hasattr(getattr(re2, "_re2", None), "RE2") else _first_public
