"""Typed, located reading of a YAML mapping, collecting every problem.

Section parsers use a ``Reader`` per mapping: each getter records the key as
known, checks its type and returns a default when absent; ``done()`` reports
every key nobody asked for.  Nothing raises: problems pile up in one list so
``mcp-gateway check`` can print them all at once.
"""
from __future__ import annotations

import re
from typing import Any, Iterable

from ..errors import Problem
from .secrets import SecretRef, parse_secret_ref
from .yamlloc import LDict, LList, Loc

_MISSING = object()
_DURATION = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*(ms|s|m|h)?\s*$")
_SIZE = re.compile(r"^\s*([0-9]+)\s*(b|kib|mib|gib|kb|mb|gb)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {None: 1, "b": 1, "kb": 1000, "mb": 1000**2, "gb": 1000**3,
               "kib": 1024, "mib": 1024**2, "gib": 1024**3}


def type_name(value: Any) -> str:
    if isinstance(value, LDict):
        return "a mapping"
    if isinstance(value, LList):
        return "a list"
    if isinstance(value, bool):
        return "a boolean"
    if value is None:
        return "null"
    if isinstance(value, (int, float)):
        return "a number"
    return "a string"


class Reader:
    """Reads one mapping; ``path`` names it in messages (e.g. ``servers.github``)."""

    def __init__(self, node: Any, problems: list[Problem], path: str, loc: Loc | None = None) -> None:
        self.problems = problems
        self.path = path
        self.ok = isinstance(node, LDict)
        if node is None:
            node = LDict(loc or Loc("<config>", 1, 1))
            self.ok = True
        elif not isinstance(node, LDict):
            where = getattr(node, "loc", loc) or Loc("<config>", 1, 1)
            problems.append(Problem(where, f"{path or 'document'} must be a mapping, not {type_name(node)}"))
            node = LDict(where)
        self.node: LDict = node
        self.seen: set[str] = set()

    @property
    def loc(self) -> Loc:
        return self.node.loc

    def at(self, key: str) -> Loc:
        return self.node.at(key)

    def error(self, key: str | None, message: str) -> None:
        self.problems.append(Problem(self.node.at(key) if key else self.node.loc, message))

    def _name(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def has(self, key: str) -> bool:
        return key in self.node

    def raw(self, key: str, default: Any = None) -> Any:
        self.seen.add(key)
        return self.node.get(key, default)

    def _get(self, key: str, types: tuple[type, ...], what: str, default: Any, required: bool) -> Any:
        self.seen.add(key)
        if key not in self.node:
            if required:
                self.error(None, f"{self._name(key)} is required")
            return default
        value = self.node[key]
        if isinstance(value, bool) and bool not in types:
            self.error(key, f"{self._name(key)} must be {what}, not a boolean")
            return default
        if not isinstance(value, types):
            self.error(key, f"{self._name(key)} must be {what}, not {type_name(value)}")
            return default
        return value

    def str(self, key: str, default: Any = None, *, required: bool = False,
            choices: Iterable[str] | None = None, pattern: str | None = None) -> Any:
        value = self._get(key, (str,), "a string", default, required)
        if isinstance(value, str) and key in self.node:
            if choices is not None and value not in choices:
                self.error(key, f"{self._name(key)} must be one of {', '.join(sorted(choices))}; got {value!r}")
                return default
            if pattern is not None and not re.fullmatch(pattern, value):
                self.error(key, f"{self._name(key)} {value!r} does not match {pattern}")
                return default
        return value

    def bool(self, key: str, default: bool = False, *, required: bool = False) -> bool:
        return self._get(key, (bool,), "true or false", default, required)

    def int(self, key: str, default: Any = None, *, required: bool = False,
            min: int | None = None, max: int | None = None) -> Any:
        value = self._get(key, (int,), "an integer", default, required)
        if isinstance(value, int) and key in self.node:
            if (min is not None and value < min) or (max is not None and value > max):
                self.error(key, f"{self._name(key)} must be between {min} and {max}; got {value}")
                return default
        return value

    def number(self, key: str, default: Any = None, *, required: bool = False, min: float | None = None) -> Any:
        value = self._get(key, (int, float), "a number", default, required)
        if isinstance(value, (int, float)) and min is not None and value < min and key in self.node:
            self.error(key, f"{self._name(key)} must be at least {min}; got {value}")
            return default
        return value

    def duration(self, key: str, default: float, *, min: float = 0.0) -> float:
        """Seconds, given as a number of seconds or a string like ``250ms``, ``5s``, ``2m``."""
        self.seen.add(key)
        if key not in self.node:
            return default
        value = self.node[key]
        seconds: float | None = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            seconds = float(value)
        elif isinstance(value, str) and (m := _DURATION.match(value)):
            seconds = float(m.group(1)) * {None: 1, "s": 1, "ms": 0.001, "m": 60, "h": 3600}[m.group(2)]
        if seconds is None:
            self.error(key, f"{self._name(key)} must be a duration such as 5, '250ms', '5s' or '2m'")
            return default
        if seconds < min:
            self.error(key, f"{self._name(key)} must be at least {min}s")
            return default
        return seconds

    def size(self, key: str, default: int) -> int:
        """Bytes, given as an integer or a string like ``1MiB``."""
        self.seen.add(key)
        if key not in self.node:
            return default
        value = self.node[key]
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
        if isinstance(value, str) and (m := _SIZE.match(value)):
            return int(m.group(1)) * _SIZE_UNITS[m.group(2).lower() if m.group(2) else None]
        self.error(key, f"{self._name(key)} must be a positive size such as 1048576 or '1MiB'")
        return default

    def secret(self, key: str, *, required: bool = False) -> SecretRef | None:
        value = self.str(key, required=required)
        if value is None:
            return None
        ref, message = parse_secret_ref(value)
        if ref is None:
            self.error(key, f"{self._name(key)}: {message}")
        return ref

    def mapping(self, key: str, *, required: bool = False) -> "Reader":
        self.seen.add(key)
        if key not in self.node:
            if required:
                self.error(None, f"{self._name(key)} is required")
            return Reader(None, self.problems, self._name(key), self.node.loc)
        return Reader(self.node[key], self.problems, self._name(key), self.node.at(key))

    def list(self, key: str, *, required: bool = False) -> LList:
        value = self._get(key, (list,), "a list", None, required)
        if value is None:
            return LList(self.node.at(key))
        return value

    def str_list(self, key: str, default: tuple[str, ...] = (), *, required: bool = False) -> tuple[str, ...]:
        if key not in self.node:
            self.seen.add(key)
            if required:
                self.error(None, f"{self._name(key)} is required")
            return default
        items = self.list(key)
        out = []
        for i, item in enumerate(items):
            if not isinstance(item, str):
                self.problems.append(Problem(items.at(i), f"{self._name(key)}[{i}] must be a string, not {type_name(item)}"))
            else:
                out.append(item)
        return tuple(out)

    def glob_list(self, key: str) -> tuple[Any, ...]:
        """A list of name globs (``policy.glob``), compiled; an invalid one is a problem at its key."""
        from ..policy.glob import GlobError, compile_glob
        out = []
        for text in self.str_list(key):
            try:
                out.append(compile_glob(text))
            except GlobError as exc:
                self.error(key, f"{self._name(key)}: {text!r} is not a valid glob: {exc}")
        return tuple(out)

    def done(self) -> None:
        """Report every key that no getter asked for."""
        for key in self.node:
            if key not in self.seen:
                known = ", ".join(sorted(self.seen)) or "none"
                self.error(key, f"unknown key {key!r} in {self.path or 'the top level'} (known keys: {known})")
