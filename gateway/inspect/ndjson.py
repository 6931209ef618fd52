"""Newline-delimited JSON framing: a long-lived ``application/json`` body of one message a line.

The 2026-07-28 revision sends ``subscriptions/listen`` notifications on an SSE
stream; some servers send them instead as a body that never ends, one JSON-RPC
message per line, under ``application/json``.  Read whole, such a body never
delivers its first notification.  ``LineProbe`` tells the two kinds of
``application/json`` body apart while it arrives; ``LineFramer`` cuts one into
whole lines so each message is inspected (and relayed) on its own.

A body is a line stream exactly when its first non-blank line is by itself a
complete JSON object: a single JSON text cannot continue past a complete value,
and a pretty-printed one's first line (``{``) is not one.
"""
from __future__ import annotations

import orjson


class LineTooLarge(Exception):
    """One line grew past the configured limit; ``before`` holds the whole lines that preceded it."""

    def __init__(self, limit: int, before: list[bytes]) -> None:
        super().__init__(f"a line exceeded {limit} bytes")
        self.before = before


class LineProbe:
    """Fed a body's chunks while it arrives: True (a line stream), False (one JSON text), None (not yet known).

    Keeps references to the chunks of the first line (no copy: a large compact
    JSON body, which has no newline, costs nothing more than a scan for one),
    at most ``limit`` bytes; a first line longer than that is not a line stream
    the gateway will relay (the whole-body limit applies).
    """

    __slots__ = ("_parts", "_size", "_limit")

    def __init__(self, limit: int) -> None:
        self._parts: list[bytes] = []
        self._size = 0
        self._limit = limit

    def feed(self, chunk: bytes) -> bool | None:
        start = 0
        while True:
            nl = chunk.find(b"\n", start)
            if nl < 0:
                rest = chunk[start:] if start else chunk
                self._parts.append(rest)
                self._size += len(rest)
                return None if self._size <= self._limit else False
            line = b"".join((*self._parts, chunk[start:nl]))
            if line.strip():
                try:
                    return isinstance(orjson.loads(line), dict)
                except orjson.JSONDecodeError:
                    return False
            self._parts.clear()            # a blank line before the first message
            self._size = 0
            start = nl + 1


def is_line_stream(body: bytes, limit: int) -> bool:
    """Is a complete body that failed to parse as one JSON text a stream of JSON lines?"""
    return LineProbe(limit).feed(body) is True


class LineFramer:
    """Feed bytes, get whole lines (``\\n`` or ``\\r\\n`` removed; blank lines kept as ``b""``).

    ``limit`` bounds one line, so the buffer never holds more than one line and
    one chunk (the transport pauses the upstream past its own high-water mark).
    """

    __slots__ = ("_buf", "_limit")

    def __init__(self, limit: int) -> None:
        self._buf = bytearray()
        self._limit = limit

    def feed(self, chunk: bytes) -> list[bytes]:
        buf = self._buf
        buf += chunk
        last = buf.rfind(b"\n")
        if last < 0:
            if len(buf) > self._limit:
                raise LineTooLarge(self._limit, [])
            return []
        lines = bytes(buf[:last]).split(b"\n")
        del buf[:last + 1]
        for i, line in enumerate(lines):
            if len(line) > self._limit:
                raise LineTooLarge(self._limit, lines[:i])
            if line[-1:] == b"\r":
                lines[i] = line[:-1]
        if len(buf) > self._limit:
            raise LineTooLarge(self._limit, lines)
        return lines

    def finish(self) -> list[bytes]:
        """At the body's end: the last line, when it had no newline (a complete body may omit it)."""
        tail = bytes(self._buf).rstrip(b"\r")
        self._buf.clear()
        return [tail] if tail.strip() else []

    @property
    def pending(self) -> bool:
        """An unterminated line is buffered (the upstream stopped mid-message)."""
        return bool(self._buf.strip())
