"""Name and URI globs: compile, validate, and reason about them.

Syntax (deliberately small): ``*`` matches any run of characters except ``/``;
``**`` matches any run including ``/``; ``?`` matches one character except
``/``; ``{a,b}`` is an alternation (no nesting); ``\\`` escapes the next
character.  Everything else is literal and matching is case-sensitive.

Besides matching, the validator needs two questions answered without
enumerating strings: does glob A match every string glob B matches (for
"rule shadowed by an earlier rule"), and can two globs match a common string
(for resource templates in ``resources/templates/list``).  Both are answered
on token sequences; ``covers`` is sound but not complete (it may miss a
shadowing, it never invents one).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

LIT, STAR, DSTAR, QMARK = 0, 1, 2, 3
Token = tuple[int, str]
MAX_ALTERNATIVES = 64
MAX_CHARS = 1024          # a glob's text; tool names and resource URIs are far shorter
MAX_TOKENS = 4096         # summed over its expanded alternatives: what compile_glob keeps
_SPECIAL = set("*?{},\\")
# Private-use code points stand for B's wildcards in ``covers``; globs may not contain them.
_B_DSTAR, _B_STAR, _B_QMARK = "\ue000", "\ue001", "\ue002"
_FORBIDDEN = re.compile(r"[\x00-\x1f\x7f\ue000-\uf8ff]")


class GlobError(ValueError):
    """The pattern is not a valid glob; the message says why."""


@dataclass(frozen=True, slots=True)
class Glob:
    text: str
    alternatives: tuple[tuple[Token, ...], ...]
    regex: re.Pattern[str]

    @property
    def is_literal(self) -> bool:
        return len(self.alternatives) == 1 and all(k == LIT for k, _ in self.alternatives[0])

    @property
    def literal(self) -> str:
        return "".join(c for _, c in self.alternatives[0])

    def match(self, name: str) -> bool:
        return self.regex.fullmatch(name) is not None


def _tokens(text: str) -> list[list[Token]]:
    """Split into alternatives (brace expansion) of token lists."""
    if not text:
        raise GlobError("a glob must not be empty")
    if len(text) > MAX_CHARS:
        raise GlobError(f"a glob is at most {MAX_CHARS} characters")
    if _FORBIDDEN.search(text):
        raise GlobError("a glob must not contain control or private-use characters")
    seqs: list[list[Token]] = [[]]
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c == "\\":
            if i + 1 >= n:
                raise GlobError("a glob must not end with a lone backslash")
            seqs = [s + [(LIT, text[i + 1])] for s in seqs]
            i += 2
        elif c == "*":
            j = i
            while j < n and text[j] == "*":
                j += 1
            if j - i > 2:
                raise GlobError("'***' is not a glob: use '*' (within a segment) or '**' (across '/')")
            seqs = [s + [(DSTAR if j - i == 2 else STAR, "")] for s in seqs]
            i = j
        elif c == "?":
            seqs = [s + [(QMARK, "")] for s in seqs]
            i += 1
        elif c == "{":
            close = _find_close(text, i)
            alts = [_tokens_flat(a) for a in _split_alts(text[i + 1:close])]
            seqs = [s + a for s in seqs for a in alts]
            if len(seqs) > MAX_ALTERNATIVES:
                raise GlobError(f"too many alternatives (more than {MAX_ALTERNATIVES})")
            if sum(len(s) for s in seqs) + len(seqs) * (n - close - 1) > MAX_TOKENS:
                # 64 alternatives of a 1,000-character glob are 64,000 tokens and a regex of
                # that size, each kept in compile_glob's cache: bound what one glob may cost.
                raise GlobError(f"the glob expands to more than {MAX_TOKENS} characters; "
                                f"write fewer or shorter alternatives")
            i = close + 1
        elif c == "}":
            raise GlobError("unbalanced '}' (escape it as '\\}' if you mean the character)")
        elif c in "[]":
            raise GlobError("character classes '[...]' are not supported; use '{a,b}' or escape the bracket")
        else:
            seqs = [s + [(LIT, c)] for s in seqs]
            i += 1
    return seqs


def _find_close(text: str, start: int) -> int:
    i = start + 1
    while i < len(text):
        if text[i] == "\\":
            i += 2
            continue
        if text[i] == "{":
            raise GlobError("nested '{...}' alternations are not supported")
        if text[i] == "}":
            return i
        i += 1
    raise GlobError("unbalanced '{' (escape it as '\\{' if you mean the character)")


def _split_alts(body: str) -> list[str]:
    parts, cur, i = [], "", 0
    while i < len(body):
        if body[i] == "\\":
            cur += body[i:i + 2]
            i += 2
            continue
        if body[i] == ",":
            parts.append(cur)
            cur = ""
        else:
            cur += body[i]
        i += 1
    parts.append(cur)
    if len(parts) < 2 or any(p == "" for p in parts):
        raise GlobError("'{...}' needs at least two non-empty alternatives separated by ','")
    return parts


def _tokens_flat(text: str) -> list[Token]:
    (seq,) = _tokens(text)
    return seq


def _regex(seq: tuple[Token, ...], star: str, dstar: str, qmark: str) -> str:
    out = []
    for kind, ch in seq:
        out.append(re.escape(ch) if kind == LIT else star if kind == STAR else dstar if kind == DSTAR else qmark)
    return "".join(out)


@lru_cache(maxsize=2048)         # bounded in count here and in size by MAX_CHARS/MAX_TOKENS
def compile_glob(text: str) -> Glob:
    """Compile ``text``; raises ``GlobError`` with a reader-facing reason."""
    if not isinstance(text, str):
        raise GlobError("a glob must be a string")
    alts = tuple(dict.fromkeys(tuple(s) for s in _tokens(text)))
    pattern = "|".join(f"(?:{_regex(a, '[^/]*', '.*', '[^/]')})" for a in alts)
    return Glob(text, alts, re.compile(pattern, re.DOTALL))


def _seq_covers(a: tuple[Token, ...], b: tuple[Token, ...]) -> bool:
    # B's wildcards become private-use characters that only A's wildcards can
    # absorb: A's '*' absorbs B's '*', '?' and non-'/' literals; only A's '**'
    # absorbs B's '**' or a '/'; A's '?' absorbs exactly one non-'/' character.
    text = "".join(ch if k == LIT else _B_STAR if k == STAR else _B_DSTAR if k == DSTAR else _B_QMARK
                   for k, ch in b)
    rx = _regex(a, f"[^/{_B_DSTAR}]*", ".*", f"[^/{_B_DSTAR}{_B_STAR}]")
    return re.fullmatch(rx, text, re.DOTALL) is not None


def covers(a: Glob, b: Glob) -> bool:
    """True only if every string ``b`` matches is matched by ``a`` (sound, not complete)."""
    return all(any(_seq_covers(x, y) for x in a.alternatives) for y in b.alternatives)


def _accepts(kind: int, ch: str, other_kind: int, other_ch: str) -> bool:
    """Is there one character both tokens accept?"""
    if kind == LIT and other_kind == LIT:
        return ch == other_ch
    if kind == LIT:
        return other_kind == DSTAR or ch != "/"
    if other_kind == LIT:
        return kind == DSTAR or other_ch != "/"
    return True  # two wildcards share any ordinary character


def _seq_intersects(a: tuple[Token, ...], b: tuple[Token, ...]) -> bool:
    seen: set[tuple[int, int]] = set()
    todo = [(0, 0)]
    while todo:
        i, j = todo.pop()
        if (i, j) in seen:
            continue
        seen.add((i, j))
        if i == len(a) and j == len(b):
            return True
        if i < len(a) and a[i][0] in (STAR, DSTAR):
            todo.append((i + 1, j))
        if j < len(b) and b[j][0] in (STAR, DSTAR):
            todo.append((i, j + 1))
        if i < len(a) and j < len(b) and _accepts(*a[i], *b[j]):
            todo.append((i if a[i][0] in (STAR, DSTAR) else i + 1, j if b[j][0] in (STAR, DSTAR) else j + 1))
    return False


def intersects(a: Glob, b: Glob) -> bool:
    """True if some string is matched by both globs (exact)."""
    return any(_seq_intersects(x, y) for x in a.alternatives for y in b.alternatives)


_TEMPLATE_EXPR = re.compile(r"\{([^{}]*)\}")


def template_glob(uri_template: str) -> Glob | None:
    """An RFC 6570 URI template as a glob over the URIs it can expand to, or None when it is
    not one within the glob bounds (the caller refuses what it cannot reason about).

    ``{var}`` expands without ``/`` (reserved characters are percent-encoded),
    so it becomes ``*``; every other operator (``+ # / . ; ? &``) may produce
    ``/`` and becomes ``**``; adjacent expressions are one wildcard (``**`` if
    either is).  Literal text is escaped.
    """
    if len(uri_template) > MAX_CHARS:          # upstream text: capped before any regex reads it
        return None
    out: list[str] = []
    pos = 0
    for m in _TEMPLATE_EXPR.finditer(uri_template):
        literal = _escape(uri_template[pos:m.start()])
        wild = "**" if m.group(1)[:1] in "+#/.;?&" else "*"
        if not literal and out and out[-1] in ("*", "**"):
            out[-1] = "**" if "**" in (out[-1], wild) else "*"
        else:
            out += (literal, wild) if literal else (wild,)
        pos = m.end()
    out.append(_escape(uri_template[pos:]))
    try:
        return compile_glob("".join(out) or "\\ ")
    except GlobError:
        return None


def _escape(text: str) -> str:
    return "".join("\\" + c if c in _SPECIAL or c in "[]" else c for c in text
                   if not _FORBIDDEN.match(c))
