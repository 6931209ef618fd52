"""Strict YAML loading that remembers where every value came from.

PyYAML silently keeps the last of two duplicate keys and reads the YAML 1.1
words ``yes/no/on/off`` as booleans.  Config and policy files are security
decisions, so both are errors here, and every mapping keeps the ``file:line:col``
of each key so later validation can point at the exact spot.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import yaml

from ..errors import ConfigError, Problem


@dataclass(frozen=True, slots=True)
class Loc:
    """A position in a source file (1-based line and column)."""

    file: str
    line: int
    col: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.col}"


class LDict(dict):
    """A mapping that remembers the location of itself and of each key."""

    __slots__ = ("loc", "key_locs")

    def __init__(self, loc: Loc) -> None:
        super().__init__()
        self.loc = loc
        self.key_locs: dict[Any, Loc] = {}

    def at(self, key: Any) -> Loc:
        """Location of ``key`` (or of the mapping when the key is absent)."""
        return self.key_locs.get(key, self.loc)


class LList(list):
    """A sequence that remembers its location and the location of each item."""

    __slots__ = ("loc", "item_locs")

    def __init__(self, loc: Loc) -> None:
        super().__init__()
        self.loc = loc
        self.item_locs: list[Loc] = []

    def at(self, index: int) -> Loc:
        return self.item_locs[index] if 0 <= index < len(self.item_locs) else self.loc


# YAML 1.1 reads these plain scalars as booleans; YAML 1.2 (and every reader
# of the file) reads them as words.  Refuse the ambiguity instead of guessing.
_YAML11_BOOL = re.compile(r"^(?:y|Y|yes|Yes|YES|n|N|no|No|NO|on|On|ON|off|Off|OFF)$")
# Sexagesimal ints/floats (``1:30`` -> 90) and leading-zero octals are the other
# YAML 1.1 traps.
_YAML11_SEXAGESIMAL = re.compile(r"^[-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+(?:\.[0-9_]*)?$")
_YAML11_OCTAL = re.compile(r"^[-+]?0[0-7_]+$")


# libyaml's parser when present (4x faster on large policy sets; same marks).
_Base = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _StrictLoader(_Base):  # type: ignore[valid-type,misc]
    """SafeLoader whose booleans are only true/false (YAML 1.2 core schema)."""


_StrictLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_StrictLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool",
    re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
    list("tTfF"),
)


def _loc(file: str, node: yaml.Node) -> Loc:
    return Loc(file, node.start_mark.line + 1, node.start_mark.column + 1)


_MAP, _SEQ, _STR = "tag:yaml.org,2002:map", "tag:yaml.org,2002:seq", "tag:yaml.org,2002:str"
_MERGE, _VALUE = "tag:yaml.org,2002:merge", "tag:yaml.org,2002:value"
# What PyYAML's constructors raise on a scalar its explicit tag cannot read (``!!int abc``,
# ``!!timestamp x``, ``!!bool maybe``): plain Python errors, not YAMLError.
_CONSTRUCT_ERRORS = (ValueError, TypeError, KeyError, IndexError, AttributeError, OverflowError)


def _convert(file: str, node: yaml.Node, loader: _StrictLoader, problems: list[Problem]) -> Any:
    if isinstance(node, (yaml.MappingNode, yaml.SequenceNode)) and node.tag != (
            _MAP if isinstance(node, yaml.MappingNode) else _SEQ):
        # ``!!set``, ``!!omap``, ``!!int {}``: a collection is read as what it looks like, so a
        # tag that says otherwise is refused rather than silently ignored.
        kind = "mapping" if isinstance(node, yaml.MappingNode) else "list"
        problems.append(Problem(_loc(file, node), f"the tag {node.tag!r} is not supported on a {kind}"))
        return None
    if isinstance(node, yaml.MappingNode):
        merged, written = _merge_pairs(file, node, problems)
        out = LDict(_loc(file, node))
        inherited: set[Any] = set()
        for n, (key_node, value_node) in enumerate(merged + written):
            key = _convert(file, key_node, loader, problems)
            if isinstance(key, (LDict, LList)):
                problems.append(Problem(_loc(file, key_node), "a mapping key must be a scalar"))
                continue
            if n < len(merged):
                if key in out:            # an earlier merged mapping's key wins
                    continue
                inherited.add(key)
            elif key in inherited:        # a key written here overrides what a merge brought in
                inherited.discard(key)
            elif key in out:
                problems.append(Problem(
                    _loc(file, key_node),
                    f"duplicate key {key!r} (first defined at line {out.at(key).line})",
                ))
                continue
            out.key_locs[key] = _loc(file, key_node)
            out[key] = _convert(file, value_node, loader, problems)
        return out
    if isinstance(node, yaml.SequenceNode):
        seq = LList(_loc(file, node))
        for item in node.value:
            seq.item_locs.append(_loc(file, item))
            seq.append(_convert(file, item, loader, problems))
        return seq
    assert isinstance(node, yaml.ScalarNode)
    if not node.style and node.tag == "tag:yaml.org,2002:str":
        text = node.value
        if _YAML11_BOOL.match(text):
            problems.append(Problem(
                _loc(file, node),
                f"ambiguous value {text!r}: YAML 1.1 reads it as a boolean; "
                f"write true/false, or quote it if you mean the word",
            ))
        elif _YAML11_SEXAGESIMAL.match(text):
            problems.append(Problem(
                _loc(file, node), f"ambiguous value {text!r}: quote it (YAML 1.1 reads it as base-60)"
            ))
    if not node.style and node.tag == "tag:yaml.org,2002:int" and _YAML11_OCTAL.match(node.value):
        problems.append(Problem(
            _loc(file, node), f"ambiguous number {node.value!r}: quote it, or drop the leading zero"
        ))
    try:
        return loader.construct_object(node, deep=True)
    except _CONSTRUCT_ERRORS:
        # The value itself is not echoed: it may be a secret written in the wrong place.
        problems.append(Problem(_loc(file, node), f"invalid YAML: this value cannot be read as "
                                                  f"!!{node.tag.rsplit(':', 1)[-1]}"))
        return None


_Pair = tuple[yaml.Node, yaml.Node]


def _merge_pairs(file: str, node: yaml.MappingNode, problems: list[Problem]) -> tuple[list[_Pair], list[_Pair]]:
    """YAML's merge key (``<<: *defaults``, ``<<: [*a, *b]``): (the pairs merged in, the pairs
    written in ``node`` itself).  A key written in the mapping overrides a merged one, and of
    two merged mappings the earlier one wins, as YAML says.  (PyYAML 6.0.4's own
    ``flatten_mapping`` dedupes merged keys by object identity: the first mapping won for a
    short, interned key and the last for a long one.)  The alias-cycle check has run, so the
    recursion ends."""
    merged: list[_Pair] = []
    written: list[_Pair] = []
    for key_node, value_node in node.value:
        if key_node.tag != _MERGE:
            if key_node.tag == _VALUE:        # "=" as a key: the string, as PyYAML reads it
                key_node.tag = _STR
            written.append((key_node, value_node))
            continue
        sources = value_node.value if isinstance(value_node, yaml.SequenceNode) else [value_node]
        for source in sources:
            if not isinstance(source, yaml.MappingNode) or source.tag != _MAP:
                problems.append(Problem(_loc(file, source), "a merge key (<<) takes a mapping or a list of "
                                                            "mappings"))
                continue
            inner_merged, inner_written = _merge_pairs(file, source, problems)
            merged.extend(inner_written + inner_merged)
    return merged, written


# Aliases make a document a graph: ten lines of nested aliases ("billion laughs") expand to
# billions of values, and an alias inside its own anchor (``a: &a [*a]``) to infinitely many.
MAX_VALUES = 100_000


def _expansion_problem(file: str, root: yaml.Node) -> Problem | None:
    """How many values ``root`` expands to, counted once per node (linear in the file): a
    problem when an alias refers to a value that contains it, or past ``MAX_VALUES``."""
    sizes: dict[int, int] = {}
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    open_: set[int] = set()
    while stack:
        node, done = stack.pop()
        key = id(node)
        if done:
            open_.discard(key)
            children = _children(node)
            total = 1 + sum(sizes[id(c)] for c in children)
            if total > MAX_VALUES:
                return Problem(_loc(file, node), f"this value expands to more than {MAX_VALUES:,} values "
                                                 f"through aliases")
            sizes[key] = total
            continue
        if key in sizes:
            continue
        if key in open_:
            return Problem(_loc(file, node), "an alias refers to a value that contains it")
        open_.add(key)
        stack.append((node, True))
        for child in _children(node):
            if id(child) not in sizes:        # a child still open is met again above: a cycle
                stack.append((child, False))
    return None


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    if isinstance(node, yaml.SequenceNode):
        return node.value
    return []


def load_text(text: str, file: str) -> tuple[Any, list[Problem]]:
    """Parse one YAML document; returns (value, problems).  Never raises for bad YAML."""
    problems: list[Problem] = []
    loader = _StrictLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None, problems
        expansion = _expansion_problem(file, node)
        if expansion is not None:
            return None, [expansion]
        value = _convert(file, node, loader, problems)
        # A value reached through an alias or a merge is read again there: its problems once.
        return value, list(dict.fromkeys(problems))
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        loc = Loc(file, mark.line + 1, mark.column + 1) if mark else Loc(file, 1, 1)
        problems.append(Problem(loc, f"invalid YAML: {exc.problem or exc.context}"))
        return None, problems
    except yaml.YAMLError as exc:
        problems.append(Problem(Loc(file, 1, 1), f"invalid YAML: {exc}"))
        return None, problems
    finally:
        loader.dispose()


def load_file(path: str) -> tuple[Any, list[Problem]]:
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except OSError as exc:
        return None, [Problem(Loc(path, 1, 1), f"cannot read file: {exc.strerror}")]
    except UnicodeDecodeError:
        return None, [Problem(Loc(path, 1, 1), "file is not valid UTF-8")]
    return load_text(text, path)


def load_strict(path: str) -> Any:
    """Load a file or raise ConfigError with every problem found."""
    value, problems = load_file(path)
    if problems:
        raise ConfigError(problems)
    return value
