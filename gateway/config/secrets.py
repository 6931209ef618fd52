"""Secret references: config never holds a secret inline.

``env:NAME`` reads an environment variable, ``file:/path`` a file (trailing
newline stripped).  A ``SecretRef`` prints as its reference, never its value.
An empty secret, or one holding a line break or surrounding whitespace (an
``env:`` value pasted with its newline), is refused by ``check`` and at start:
it could never work as a header value, and would otherwise fail every request.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass

_ENV = re.compile(r"^env:([A-Za-z_][A-Za-z0-9_]*)$")
_FILE = re.compile(r"^file:(/.+)$")


class SecretUnavailable(Exception):
    """The referenced variable or file does not exist or cannot be read."""


@dataclass(frozen=True, slots=True)
class SecretRef:
    kind: str      # "env" | "file"
    target: str

    def __str__(self) -> str:
        return f"{self.kind}:{self.target}"

    __repr__ = __str__

    def resolve(self) -> str:
        if self.kind == "env":
            value = os.environ.get(self.target)
            if value is None:
                raise SecretUnavailable(f"environment variable {self.target} is not set")
            where = f"environment variable {self.target}"
        else:
            try:
                with open(self.target, encoding="utf-8") as fh:
                    value = fh.read().rstrip("\r\n")
            except (OSError, UnicodeDecodeError) as exc:
                raise SecretUnavailable(f"cannot read {self.target}: {getattr(exc, 'strerror', None) or exc}") from exc
            where = f"file {self.target}"
        if not value:
            raise SecretUnavailable(f"{where} is empty")
        if "\n" in value or "\r" in value or value != value.strip():
            raise SecretUnavailable(f"{where} holds a line break or surrounding whitespace "
                                    "(a newline pasted with the value?); remove it")
        return value

    def check(self) -> str | None:
        """None when resolvable, else why not (used by ``mcp-gateway check``)."""
        try:
            self.resolve()
        except SecretUnavailable as exc:
            return str(exc)
        return None


def parse_secret_ref(text: str) -> tuple[SecretRef | None, str]:
    if m := _ENV.match(text):
        return SecretRef("env", m.group(1)), ""
    if m := _FILE.match(text):
        return SecretRef("file", m.group(1)), ""
    return None, ("secrets are never written inline: use a reference such as "
                  "'env:NAME' or 'file:/path/to/secret'")
