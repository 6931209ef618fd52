"""Server-Sent Events framing.

Upstream chunk boundaries mean nothing: an event can arrive split across
chunks, or several in one.  ``SSEFramer`` turns bytes into whole events so
inspection always sees complete JSON-RPC messages, and the client never gets
half an event (even when the upstream dies mid-stream).
"""
from __future__ import annotations

from dataclasses import dataclass


class SSETooLarge(Exception):
    """One event grew past the configured limit."""


@dataclass(slots=True)
class SSEEvent:
    raw: bytes                 # the event exactly as received, terminator included
    data: str | None = None    # data lines joined with "\n"; None when there were none
    event: str | None = None
    id: str | None = None
    retry: int | None = None
    comment_only: bool = False
    invalid: bool = False      # not UTF-8: nothing in it can be checked, so nothing is relayed


def _parse(raw: bytes) -> SSEEvent:
    ev = SSEEvent(raw)
    data: list[str] = []
    has_field = False
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        ev.invalid = True
        return ev
    if text[:1] == "\ufeff":
        text = text[1:]        # the SSE spec strips one leading BOM
    for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n"):
        if not line or line.startswith(":"):
            continue
        has_field = True
        name, sep, value = line.partition(":")
        if sep and value.startswith(" "):
            value = value[1:]
        if name == "data":
            data.append(value)
        elif name == "event":
            ev.event = value
        elif name == "id":
            if "\x00" not in value:
                ev.id = value
        elif name == "retry" and value.isdigit() and len(value) < 10:
            ev.retry = int(value)
    if data:
        ev.data = "\n".join(data)
    ev.comment_only = not has_field
    return ev


def encode_event(data: str, *, event: str | None = "message", id: str | None = None,
                 retry: int | None = None) -> bytes:
    """Serialize one event; multi-line data becomes several data lines."""
    parts = []
    if id is not None:
        parts.append(f"id: {id}\n")
    if retry is not None:
        parts.append(f"retry: {retry}\n")
    if event is not None:
        parts.append(f"event: {event}\n")
    for line in data.split("\n"):
        parts.append(f"data: {line}\n")
    parts.append("\n")
    return "".join(parts).encode()


class SSEFramer:
    """Feed bytes, get whole events.  ``limit`` bounds one event's size."""

    __slots__ = ("_buf", "_limit", "_scan")

    def __init__(self, limit: int) -> None:
        self._buf = bytearray()
        self._limit = limit
        self._scan = 0  # where to resume looking for a terminator

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        self._buf += chunk
        events: list[SSEEvent] = []
        buf = self._buf
        start = 0
        i = max(self._scan, 0)
        n = len(buf)
        # A blank line ends an event; lines end with \r\n, \n or \r.
        while i < n:
            c = buf[i]
            if c == 0x0A or c == 0x0D:
                j = i + 1
                if c == 0x0D:
                    if j >= n:
                        break            # need the next byte to know if it is \r\n
                    if buf[j] == 0x0A:
                        j += 1
                # j is the start of the next line; blank if it begins with a line end.
                if j < n and buf[j] in (0x0A, 0x0D):
                    k = j + 1
                    if buf[j] == 0x0D:
                        if k >= n:
                            break
                        if buf[k] == 0x0A:
                            k += 1
                    if k - start > self._limit:
                        # Checked per event too: one chunk holding a whole oversized event must not
                        # pass where the same bytes in smaller chunks fail (found by fuzzing).
                        raise SSETooLarge(f"an SSE event exceeded {self._limit} bytes")
                    events.append(_parse(bytes(buf[start:k])))
                    start = k
                    i = k
                    continue
                if j >= n:
                    break                # the next line has not arrived yet
                i = j
                continue
            i += 1
        if start:
            del buf[:start]
            i -= start
        self._scan = max(i, 0)
        if len(buf) > self._limit:
            raise SSETooLarge(f"an SSE event exceeded {self._limit} bytes")
        return events

    @property
    def pending(self) -> bool:
        return bool(self._buf.strip())

    def flush(self) -> SSEEvent | None:
        """The unterminated tail, if any (an upstream that closed mid-event)."""
        if not self._buf.strip():
            return None
        ev = _parse(bytes(self._buf))
        self._buf.clear()
        return ev
