"""Lock files: the approved state of one server's tools, kept in git next to the policies.

Format (``<pins dir>/<server>.lock.yaml``)::

    # header comment (regenerated)
    version: 1
    server: github
    tool_set: sha256:...            # fingerprint of the whole set
    tools:
      create_issue:
        fingerprint: sha256:...     # RFC 8785 hash of the definition below
        accepted_findings: [...]    # optional: poisoning rules an operator accepted
        definition:                 # exactly what the model is shown
          name: create_issue
          description: |-
            Create a new issue ...

The file is written by ``mcp-gateway pins`` with a small emitter of its own
rather than PyYAML's: output is deterministic (sorted keys, block style,
multi-line text as ``|`` blocks so a diff shows the changed sentence) and any
invisible, bidirectional or control character is written as an escape
(``"\\u200b"``), so a reviewer reading the diff sees every character the
model will read.  Loading goes through the strict YAML reader and checks
that every fingerprint matches its definition.
"""
from __future__ import annotations

import json
import math
import os
import re
import tempfile
import unicodedata
from dataclasses import dataclass, field
from typing import Any

from ..config.reader import Reader
from ..config.yamlloc import LDict, Loc, load_file
from ..errors import Problem
from .fingerprint import set_fingerprint, tool_print

LOCK_VERSION = 1
_PLAIN_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")
_AMBIGUOUS = re.compile(r"^(?:y|n|yes|no|on|off|true|false|null|~)$", re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class PinnedTool:
    name: str
    fingerprint: str
    body: str                                  # fingerprint without name/title (rename detection)
    definition: dict[str, Any]
    accepted_findings: frozenset[str] = frozenset()
    loc: Loc | None = None


@dataclass(frozen=True, slots=True)
class Approved:
    """The approved tool set of one server, from a lock file or the tofu store."""

    server: str
    origin: str                                # "lock" | "tofu"
    tools: dict[str, PinnedTool]
    tool_set: str
    by_body: dict[str, str] = field(default_factory=dict)   # body fingerprint -> name
    path: str = ""

    @classmethod
    def build(cls, server: str, origin: str, tools: dict[str, PinnedTool], path: str = "") -> "Approved":
        return cls(server, origin, tools, set_fingerprint((n, t.fingerprint) for n, t in tools.items()),
                   {t.body: n for n, t in tools.items()}, path)

    @classmethod
    def from_definitions(cls, server: str, origin: str, definitions: list[dict[str, Any]],
                         ignore: frozenset[str] = frozenset(), accepted: dict[str, frozenset[str]] | None = None,
                         path: str = "") -> "Approved":
        tools = {}
        for d in definitions:
            p = tool_print(d, ignore)
            tools[p.name] = PinnedTool(p.name, p.fingerprint, p.body, p.definition,
                                       (accepted or {}).get(p.name, frozenset()))
        return cls.build(server, origin, tools, path)


def lock_path(pins_dir: str, server: str, configured: str | None = None) -> str:
    if configured:
        return configured if os.path.isabs(configured) else os.path.join(pins_dir, configured)
    return os.path.join(pins_dir, f"{server}.lock.yaml")


# -- reading ------------------------------------------------------------------

def load_lock(path: str, server: str, ignore: frozenset[str] = frozenset()) -> tuple[Approved | None, list[Problem]]:
    """Read and verify a lock file.  Returns (None, []) when the file does not exist."""
    if not os.path.exists(path):
        return None, []
    node, problems = load_file(path)
    if node is None:
        return None, problems or [Problem(Loc(path, 1, 1), "the lock file is empty")]
    r = Reader(node, problems, "", Loc(path, 1, 1))
    version = r.int("version", required=True)
    if version is not None and version != LOCK_VERSION:
        r.error("version", f"unsupported lock file version {version} (this gateway reads {LOCK_VERSION})")
    named = r.str("server", required=True)
    if named is not None and named != server:
        r.error("server", f"this lock file pins server {named!r}, not {server!r}")
    r.str("tool_set")
    r.raw("generated_by")
    tools_r = r.mapping("tools", required=True)
    tools: dict[str, PinnedTool] = {}
    for name in list(tools_r.node):
        tools_r.seen.add(name)
        t = Reader(tools_r.node[name], problems, f"tools.{name}", tools_r.at(name))
        fp = t.str("fingerprint", required=True, pattern=r"sha256:[0-9a-f]{64}")
        accepted = frozenset(t.str_list("accepted_findings"))
        definition = t.raw("definition")
        t.done()
        if not isinstance(definition, dict):
            t.error("definition" if t.has("definition") else None, f"tools.{name}.definition must be a mapping")
            continue
        plain = json.loads(json.dumps(definition))
        if plain.get("name") != name:
            t.error("definition", f"tools.{name}.definition.name must be {name!r}")
            continue
        p = tool_print(plain, ignore)
        if fp is not None and p.fingerprint != fp:
            problems.append(Problem(t.at("fingerprint"),
                                    f"tools.{name}: the fingerprint does not match the definition (edited by "
                                    f"hand?); review it and run `mcp-gateway pins approve {server} {name}`"))
            continue
        tools[name] = PinnedTool(name, p.fingerprint, p.body, p.definition, accepted, t.loc)
    r.done()
    if problems:
        return None, problems
    return Approved.build(server, "lock", tools, path), []


# -- writing ------------------------------------------------------------------

def dump_lock(approved: Approved, source: str = "") -> str:
    lines = [
        f"# Approved MCP tool definitions for server {approved.server!r}.",
        "# Review changes to this file like code: the model reads exactly the text below.",
        f"# Update with: mcp-gateway pins diff {approved.server} / mcp-gateway pins approve {approved.server}",
        f"version: {LOCK_VERSION}",
        f"server: {_scalar(approved.server)}",
    ]
    if source:
        lines.append(f"generated_by: {_scalar(source)}")
    lines.append(f"tool_set: {approved.tool_set}")
    if not approved.tools:
        lines.append("tools: {}")
    else:
        lines.append("tools:")
        for name in sorted(approved.tools):
            t = approved.tools[name]
            lines.append(f"  {_key(name)}:")
            lines.append(f"    fingerprint: {t.fingerprint}")
            if t.accepted_findings:
                lines.append(f"    accepted_findings: [{', '.join(sorted(t.accepted_findings))}]")
            lines.append("    definition:")
            _emit_mapping(t.definition, 6, lines, tool=True)
    return "\n".join(lines) + "\n"


def write_lock(path: str, approved: Approved, source: str = "") -> None:
    """Atomically replace ``path`` (write aside, then rename)."""
    text = dump_lock(approved, source)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".lock-", suffix=".yaml", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


_FIRST = {"name": 0, "title": 1, "description": 2}


def _emit_mapping(value: dict[str, Any], indent: int, lines: list[str], *, tool: bool = False) -> None:
    pad = " " * indent
    # A definition reads name, title, description first; everything else is sorted.
    keys = sorted(value, key=lambda k: (_FIRST.get(k, 3), k)) if tool else sorted(value)
    for key in keys:
        item = value[key]
        head = f"{pad}{_key(key)}:"
        if isinstance(item, dict) and item:
            lines.append(head)
            _emit_mapping(item, indent + 2, lines)
        elif isinstance(item, list) and item:
            lines.append(head)
            _emit_list(item, indent + 2, lines)
        else:
            _emit_scalar(head, item, indent, lines)


def _emit_list(value: list[Any], indent: int, lines: list[str]) -> None:
    pad = " " * indent
    for item in value:
        if isinstance(item, dict) and item:
            sub: list[str] = []
            _emit_mapping(item, indent + 2, sub)
            lines.append(f"{pad}- {sub[0].lstrip()}")
            lines.extend(sub[1:])
        elif isinstance(item, list) and item:
            lines.append(f"{pad}-")
            _emit_list(item, indent + 2, lines)
        else:
            _emit_scalar(f"{pad}-", item, indent, lines)


def _emit_scalar(head: str, item: Any, indent: int, lines: list[str]) -> None:
    if isinstance(item, str) and _block_ok(item):
        chomp = "-" if not item.endswith("\n") else ("" if not item.endswith("\n\n") else "+")
        lines.append(f"{head} |{chomp}")
        body = item[:-1] if item.endswith("\n") else item
        for line in body.split("\n"):
            lines.append(f"{' ' * (indent + 2)}{line}" if line else "")
        return
    lines.append(f"{head} {_scalar(item)}")


def _suspicious(ch: str) -> bool:
    """Characters a reviewer could not see in a diff: written as escapes."""
    if ch == "\n" or ch == " ":
        return False
    cat = unicodedata.category(ch)
    return cat[0] in "CZ" or ch in "\u2028\u2029\u00a0" or 0xFE00 <= ord(ch) <= 0xFE0F or 0xE0100 <= ord(ch) <= 0xE01EF


def _block_ok(text: str) -> bool:
    """A ``|`` block reproduces ``text`` exactly only for plain multi-line text."""
    if "\n" not in text.rstrip("\n") or text.startswith((" ", "\n")):
        return False
    if any(_suspicious(ch) for ch in text if not ch.isascii() or ch < " " or ch == "\x7f"):
        return False
    return not any(line != line.rstrip(" ") for line in text.split("\n"))


def _key(key: str) -> str:
    if _PLAIN_KEY.fullmatch(key) and not _AMBIGUOUS.match(key):
        return key
    return _quote(key)


def _scalar(value: Any) -> str:
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError("lock files hold JSON values only (no NaN or infinity)")
        text = repr(value)
        # PyYAML's float resolver needs a dot: 1e+20 would read back as a string.
        if "e" in text and "." not in text.split("e")[0]:
            mantissa, exp = text.split("e")
            text = f"{mantissa}.0e{exp}"
        return text
    if isinstance(value, dict):
        return "{}"
    if isinstance(value, list):
        return "[]"
    return _quote(str(value))


def _quote(text: str) -> str:
    """A YAML double-quoted scalar; every invisible or control character escaped."""
    out = ['"']
    for ch in text:
        if ch == '"':
            out.append('\\"')
        elif ch == "\\":
            out.append("\\\\")
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif (ch.isascii() and " " <= ch < "\x7f") or (not ch.isascii() and not _suspicious(ch)):
            out.append(ch)
        elif ord(ch) <= 0xFF:
            out.append(f"\\x{ord(ch):02x}")
        elif ord(ch) <= 0xFFFF:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(f"\\U{ord(ch):08x}")
    out.append('"')
    return "".join(out)


def as_plain(value: Any) -> Any:
    """Definitions as loaded are LDict/LList; callers that serialise want plain JSON."""
    if isinstance(value, LDict) or isinstance(value, dict):
        return {k: as_plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [as_plain(v) for v in value]
    return value
