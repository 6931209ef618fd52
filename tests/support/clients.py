"""The official MCP SDK client, set up the way the tests use it.

``mcp_client(url, era=...)`` connects a real ``mcp.client.Client`` over Streamable HTTP:

* ``era="legacy"``: 2025-11-25 ``initialize`` handshake, ``Mcp-Session-Id``, GET stream,
  server-to-client requests on SSE;
* ``era="modern"``: 2026-07-28 pinned without a probe (no ``server/discover``; every POST
  carries ``MCP-Protocol-Version``/``Mcp-Method``/``Mcp-Name``), input via ``InputRequiredResult``;
* ``era="auto"``: the SDK default, ``server/discover`` first, ``initialize`` if that fails.

Canned server-to-client handlers (``fake_sampling`` etc.) answer deterministically, and
``ProgressLog`` records when each progress notification arrived.
"""
from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx2
import mcp_types as types
from mcp.client import Client, ClientRequestContext
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError

Era = Literal["legacy", "modern", "auto"]
MODERN_VERSION = "2026-07-28"
LEGACY_VERSION = "2025-11-25"
_MODES = {"legacy": "legacy", "modern": MODERN_VERSION, "auto": "auto"}


def fake_sampling(reply: str = "sampled reply", model: str = "fake-llm"):
    """A sampling callback that answers every createMessage with ``reply`` and records the params."""
    calls: list[types.CreateMessageRequestParams] = []

    async def callback(ctx: ClientRequestContext, params: types.CreateMessageRequestParams) -> types.CreateMessageResult:
        calls.append(params)
        return types.CreateMessageResult(role="assistant", model=model,
                                         content=types.TextContent(type="text", text=reply))

    callback.calls = calls  # type: ignore[attr-defined]
    return callback


def fake_elicitation(action: Literal["accept", "decline", "cancel"] = "accept", content: dict[str, Any] | None = None):
    """An elicitation callback with a fixed outcome (default: accept ``{"answer": "42"}``)."""
    calls: list[types.ElicitRequestParams] = []

    async def callback(ctx: ClientRequestContext, params: types.ElicitRequestParams) -> types.ElicitResult:
        calls.append(params)
        if action != "accept":
            return types.ElicitResult(action=action)
        return types.ElicitResult(action="accept", content=content if content is not None else {"answer": "42"})

    callback.calls = calls  # type: ignore[attr-defined]
    return callback


def fake_roots(*uris: str):
    """A roots/list callback returning ``uris`` (default one project root)."""
    roots = [types.Root(uri=u) for u in (uris or ("file:///home/user/project",))]

    async def callback(ctx: ClientRequestContext) -> types.ListRootsResult:
        return types.ListRootsResult(roots=roots)

    return callback


@dataclass
class ProgressLog:
    """Pass ``log.callback`` as ``progress_callback``; ``log.events`` holds (seconds since creation, progress, total, message)."""

    started: float = field(default_factory=time.monotonic)
    events: list[tuple[float, float, float | None, str | None]] = field(default_factory=list)

    async def callback(self, progress: float, total: float | None, message: str | None) -> None:
        self.events.append((time.monotonic() - self.started, progress, total, message))

    def elapsed(self) -> float:
        return time.monotonic() - self.started


@asynccontextmanager
async def mcp_client(url: str, *, era: Era = "auto", headers: dict[str, str] | None = None,
                     timeout: float = 15.0, **client_kwargs: Any) -> AsyncIterator[Client]:
    """A connected SDK ``Client``; ``client_kwargs`` go to ``Client`` (``sampling_callback``,
    ``elicitation_callback``, ``list_roots_callback``, ``logging_callback``, ``message_handler`` ...).
    ``headers`` are sent on every HTTP request (e.g. ``{"Authorization": "Bearer ..."}``)."""
    client_kwargs.setdefault("read_timeout_seconds", timeout)
    client_kwargs.setdefault("cache", None)  # tests want every call on the wire
    async with httpx2.AsyncClient(headers=headers or {}, timeout=httpx2.Timeout(timeout)) as http:
        transport = streamable_http_client(url, http_client=http)
        async with Client(transport, mode=_MODES[era], **client_kwargs) as client:
            yield client


def find_mcp_error(exc: BaseException) -> MCPError | None:
    """The first ``MCPError`` in ``exc``, looking inside (nested) exception groups and causes."""
    if isinstance(exc, MCPError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            if (found := find_mcp_error(inner)) is not None:
                return found
    if exc.__cause__ is not None:
        return find_mcp_error(exc.__cause__)
    return None


@dataclass
class RaisedMCPError:
    error: MCPError | None = None

    @property
    def code(self) -> int:
        assert self.error is not None
        return self.error.code


@contextmanager
def raises_mcp_error(code: int | None = None) -> Iterator[RaisedMCPError]:
    """Expect an ``MCPError`` (the SDK client often raises it wrapped in an ExceptionGroup).

    ``code``: the JSON-RPC error code it must carry.  ``with raises_mcp_error(-32601) as raised: ...``
    """
    raised = RaisedMCPError()
    try:
        yield raised
    except BaseException as exc:  # noqa: BLE001 - re-raised unless it carries an MCPError
        found = find_mcp_error(exc)
        if found is None:
            raise
        if code is not None and found.code != code:
            raise AssertionError(f"expected JSON-RPC error {code}, got {found.code}: {found}") from exc
        raised.error = found
    else:
        raise AssertionError("no MCPError was raised")
