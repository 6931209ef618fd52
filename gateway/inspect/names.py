"""Tool names: confusable skeletons, homoglyph checks, and the cross-server name index.

A model picks a tool by its name.  Two tools whose names look alike
(``send_email`` and ``send_emaіl`` with a Cyrillic і, or ``send-email``) let
one server shadow another's tool.  ``skeleton`` maps a name to a form in which
such names compare equal: NFKC, case-folded, common Cyrillic/Greek look-alikes
and look-alike digits mapped to Latin, separators dropped.  It is a heuristic
in the spirit of Unicode TS #39, not the full confusables table.
"""
from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, field
from typing import Iterable, Mapping

# MCP tool-name guidance: 1-128 characters from A-Z a-z 0-9 _ - .
STANDARD_NAME = re.compile(r"[A-Za-z0-9_.\-]{1,128}")

# Look-alikes of Latin letters (lower case; names are case-folded first).
CONFUSABLE = {
    # Cyrillic
    "а": "a", "в": "b", "е": "e", "ё": "e", "к": "k", "м": "m", "н": "h", "о": "o", "р": "p",
    "с": "c", "т": "t", "у": "y", "х": "x", "і": "i", "ї": "i", "ј": "j", "ѕ": "s", "ԁ": "d",
    "ԛ": "q", "ԝ": "w", "ѵ": "v", "ү": "y", "һ": "h", "ӏ": "l", "ɡ": "g", "ո": "n", "ս": "u",
    # Greek
    "α": "a", "β": "b", "ε": "e", "η": "n", "ι": "i", "κ": "k", "ν": "v", "ο": "o", "ρ": "p",
    "τ": "t", "υ": "u", "χ": "x", "ω": "w", "γ": "y", "μ": "u",
    # Latin extensions that render like plain letters
    "ı": "i", "ł": "l", "ø": "o", "đ": "d", "ħ": "h", "ŀ": "l",
}
# Folded further for comparison only: digits and letters that read alike.
_SKELETON_EXTRA = str.maketrans({"0": "o", "1": "l", "i": "l", "|": "l", "5": "s", "3": "e"})
_SEPARATORS = re.compile(r"[\s_.\-/:]+")


def _fold(name: str) -> str:
    text = unicodedata.normalize("NFKC", name).casefold()
    if not text.isascii():
        text = "".join(CONFUSABLE.get(ch, ch) for ch in text)
        # Strip combining marks (a + U+0301 reads as a).
        text = "".join(ch for ch in unicodedata.normalize("NFD", text) if not unicodedata.combining(ch))
    return text


def skeleton(name: str) -> str:
    """A comparison key under which confusable names are equal."""
    return _SEPARATORS.sub("", _fold(name)).translate(_SKELETON_EXTRA).replace("rn", "m")


def canonical(name: str) -> bool:
    """A name in the MCP guidance's characters (A-Z a-z 0-9 _ - .): no other script, no
    homoglyph, nothing invisible."""
    return STANDARD_NAME.fullmatch(name) is not None


def homoglyphs(name: str) -> list[str]:
    """The characters of ``name`` that imitate ASCII letters (empty for a plain name)."""
    if name.isascii():
        return []
    return [ch for ch in name if not ch.isascii() and
            (CONFUSABLE.get(ch.casefold()) or unicodedata.normalize("NFKC", ch).isascii())]


def scripts(name: str) -> set[str]:
    """Rough script set of the letters in ``name`` (from their Unicode names)."""
    out: set[str] = set()
    for ch in name:
        if ch.isalpha():
            if ch.isascii():
                out.add("LATIN")
                continue
            uname = unicodedata.name(ch, "")
            out.add(uname.split(" ", 1)[0] if uname else "UNKNOWN")
    return out


@dataclass(frozen=True, slots=True)
class NameIndex:
    """Every mounted server's tool names, for shadowing and cross-server references.

    Built from the lock files and the live catalogs; rebuilt (cheaply) when a
    server's tool set changes, never per request.
    """

    by_server: Mapping[str, frozenset[str]] = field(default_factory=dict)
    by_skeleton: Mapping[str, tuple[tuple[str, str], ...]] = field(default_factory=dict)
    # The names each server has approved (its lock file, or its tofu pin): the genuine side
    # of a look-alike pair when the other side is not approved.
    approved: Mapping[str, frozenset[str]] = field(default_factory=dict)
    # One alternation per (server, minimum length) of the other servers' distinctive names.
    _mentions: dict[tuple[str, int], re.Pattern[str] | None] = field(default_factory=dict)

    @classmethod
    def build(cls, by_server: Mapping[str, Iterable[str]],
              approved: Mapping[str, Iterable[str]] | None = None) -> "NameIndex":
        frozen = {s: frozenset(n for n in names if n) for s, names in by_server.items()}
        skel: dict[str, list[tuple[str, str]]] = {}
        for server, names in frozen.items():
            for name in names:
                skel.setdefault(skeleton(name), []).append((server, name))
        ok = {s: frozenset(names) for s, names in (approved or {}).items()}
        return cls(frozen, {k: tuple(v) for k, v in skel.items()}, ok, {})

    def impostor(self, server: str, name: str, other_server: str, other: str) -> bool:
        """Whether ``server``/``name`` is the one to hold of a look-alike pair.

        Never the genuine side, or a server listing a look-alike could switch off another
        server's tool: the name in canonical form (the MCP characters, one script, no
        homoglyphs) against one that is not; else the approved name against an unapproved
        one. When neither tells them apart, both are held (fail closed).
        """
        mine, theirs = canonical(name), canonical(other)
        if mine != theirs:
            return not mine
        mine = name in self.approved.get(server, ())
        theirs = other in self.approved.get(other_server, ())
        if mine != theirs:
            return not mine
        return True

    def collisions(self, server: str, name: str) -> list[tuple[str, str, bool]]:
        """Tools elsewhere (other servers, or other names on this one) that look like ``name``.

        Returns ``(server, other_name, exact)``; exact means identical names on two servers.
        """
        out = []
        for other_server, other in self.by_skeleton.get(skeleton(name), ()):
            if other_server == server and other == name:
                continue
            out.append((other_server, other, other == name))
        return out

    def mentions(self, server: str, text: str, min_length: int = 6) -> list[tuple[str, str]]:
        """Names of *other* servers' tools that ``text`` mentions, as ``(server, name)``."""
        key = (server, min_length)
        if key not in self._mentions:
            names = {n: s for s, ns in self.by_server.items() if s != server for n in ns
                     if len(n) >= min_length and _distinctive(n)}
            self._mentions[key] = (
                re.compile(r"(?<![\w-])(" + "|".join(sorted(map(re.escape, names), key=len, reverse=True))
                           + r")(?![\w-])") if names else None)
        pattern = self._mentions[key]
        if pattern is None:
            return []
        own = self.by_server.get(server, frozenset())
        found = []
        for m in pattern.finditer(text):
            name = m.group(1)
            if name in own:
                continue
            for s, ns in self.by_server.items():
                if s != server and name in ns:
                    found.append((s, name))
                    break
        return found


def _distinctive(name: str) -> bool:
    """Only compound identifiers (``send_email``, ``getUser``) count as mentions: a plain
    word such as ``search`` appears in ordinary prose."""
    return bool(re.search(r"[_\-.]|[a-z][A-Z]|\d", name))
