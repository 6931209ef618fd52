"""A round-robin TCP proxy on loopback: the load balancer in front of a fleet of gateway replicas.

Each new client connection goes to the next backend in turn; a backend that refuses the
connection (a killed replica) is skipped and counted, and a backend the test ``drain``-ed
gets no new connections (a load balancer taking it out of rotation).  Bytes are relayed
untouched in both directions until either side closes.

Before choosing a backend the proxy reads the connection's first HTTP request head (and
its body, when ``Content-Length`` says how long): tests read these records to tell which
replica served which request.  A client that keeps no connection alive (``keepalive=False``
in :func:`tests.support.fleet.fleet_client`) sends exactly one request per connection, so
the record of a connection is the record of one request.
"""
from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

HEAD_LIMIT = 64 * 1024      # a request head larger than this is not HTTP we sent
BODY_LIMIT = 1024 * 1024    # bodies up to this size are read (and recorded) before connecting
CHUNK = 64 * 1024


@dataclass
class Connection:
    """One client connection: where it went and the first request it carried."""

    number: int
    backend: int | None          # index into ``RoundRobinProxy.backends``; None if every backend refused
    head: bytes                  # request line and headers, without the blank line
    body: bytes

    @property
    def method(self) -> str:
        return self.head.split(b" ", 1)[0].decode("latin-1")

    def header(self, name: str) -> str | None:
        wanted = name.lower().encode()
        for line in self.head.split(b"\r\n")[1:]:
            key, _, value = line.partition(b":")
            if key.strip().lower() == wanted:
                return value.strip().decode("latin-1")
        return None


class RoundRobinProxy:
    """``await RoundRobinProxy().start()`` listens on 127.0.0.1 and a kernel-chosen port.

    ``backends`` may be filled in after start (the replicas need the proxy's URL as their
    ``public_url`` before they start).  ``on_connection`` is called synchronously once a
    connection's backend is chosen, before any byte reaches it.
    """

    def __init__(self, backends: Sequence[tuple[str, int]] = ()) -> None:
        self.backends: list[tuple[str, int]] = list(backends)
        self.connections: list[Connection] = []
        self.refused: Counter[int] = Counter()
        self.drained: set[int] = set()
        self.on_connection: Callable[[Connection], None] | None = None
        self._turn = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._handlers: set[asyncio.Task[None]] = set()

    async def start(self) -> RoundRobinProxy:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0, limit=HEAD_LIMIT)
        return self

    @property
    def port(self) -> int:
        assert self._server is not None
        return self._server.sockets[0].getsockname()[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def served(self, predicate: Callable[[Connection], bool] = lambda c: True) -> Counter[int]:
        """Connections per backend (only those matching ``predicate``)."""
        return Counter(c.backend for c in self.connections if c.backend is not None and predicate(c))

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.close()
        for task in list(self._handlers):
            task.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def _connect(self) -> tuple[int, asyncio.StreamReader, asyncio.StreamWriter] | None:
        """The next live backend in turn; refused backends are skipped, drained ones never tried."""
        for _ in range(len(self.backends)):
            index = self._turn % len(self.backends)
            self._turn += 1                       # taken before awaiting: concurrent connections rotate too
            if index in self.drained:
                continue
            try:
                reader, writer = await asyncio.open_connection(*self.backends[index])
            except OSError:
                self.refused[index] += 1
                continue
            return index, reader, writer
        return None

    async def _handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        self._writers.add(client_w)
        backend_w: asyncio.StreamWriter | None = None
        try:
            try:
                head = await client_r.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
                return
            conn = Connection(len(self.connections), None, head[:-4], b"")
            length = conn.header("content-length")
            if length is not None and length.isdigit() and int(length) <= BODY_LIMIT:
                with contextlib.suppress(asyncio.IncompleteReadError):
                    conn.body = await client_r.readexactly(int(length))
            chosen = await self._connect()
            if chosen is not None:
                conn.backend, backend_r, backend_w = chosen
                self._writers.add(backend_w)
            self.connections.append(conn)
            if chosen is None:
                return
            if self.on_connection is not None:
                self.on_connection(conn)
            backend_w.write(head + conn.body)
            await asyncio.gather(_pipe(client_r, backend_w), _pipe(backend_r, client_w))
        finally:
            for writer in (client_w, backend_w):
                if writer is not None:
                    writer.close()
                    self._writers.discard(writer)
            self._handlers.discard(task)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Copy until EOF, then half-close; a reset on either side closes the writer too."""
    try:
        while data := await reader.read(CHUNK):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except (ConnectionError, OSError):
        writer.close()
