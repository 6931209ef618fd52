"""The per-request audit record: written once, after the response completes.

One JSON line ``{"event": "mcp.request", ...}`` per client request with
principal, server, method, target, outcome, status, and whatever the stages
added to ``ex.audit_safe`` (the policy decision and its rule ids) and
``ex.audit`` (pin findings, hidden counts...).  The bearer token is never a field.

This is the one log line every request pays for, so it skips structlog's
processor chain: fields from closed sets (server names, statuses, reasons,
decisions and the rule ids of the operator's policy files) are written as they
are, everything a client or token could influence goes through the same
redaction as every structlog event (memoised: principals and tool names
repeat), and lines are batched into one write per event-loop iteration
instead of one syscall each.  The output format is the one
``telemetry.logging`` renders.
"""
from __future__ import annotations

import asyncio
import hashlib
import itertools
import os
import sys
import time
from typing import IO, TYPE_CHECKING, Any

import orjson
import structlog

from .metrics import DURATION_TALLY, INFLIGHT_LEVEL, KNOWN_METHODS, OVERHEAD_TALLY, REQUESTS_TALLY, UPSTREAM_WAIT_TALLY
from .redact import redact_value, scrub_text

if TYPE_CHECKING:
    from ..config.model import ServerConfig
    from ..pipeline import Exchange
    from .client_address import ClientAddress


# One write per FLUSH_AFTER seconds (or FLUSH_LINES records), not one per request: the
# syscall costs as much as building the record.  A crash can lose at most that window;
# a clean stop flushes.
FLUSH_AFTER = 0.01
FLUSH_LINES = 256


class AuditWriter:
    """Batches audit lines and writes them at the end of the loop iteration.

    To stdout by default; to ``logging.audit_file`` when configured, appended and
    reopened by ``reopen`` (SIGHUP), so logrotate can move the file away.
    """

    def __init__(self, stream: IO[bytes] | None = None) -> None:
        self._stream = stream
        self._path: str | None = None
        self._lines: list[Any] = []     # bytes, or tuples for _render (see defer)
        self._scheduled = False

    def open_file(self, path: str) -> None:
        """Send the records to ``path`` (appended; created 0600 if missing).  Raises OSError."""
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        old, self._stream, self._path = self._stream, os.fdopen(fd, "ab"), path
        if old is not None and self._path is not None and old is not sys.stdout.buffer:
            old.close()

    def reopen(self) -> None:
        """SIGHUP: open the audit file anew (logrotate moved it); keep the old one on failure."""
        if self._path is None:
            return
        self.flush()
        old = self._stream
        try:
            self.open_file(self._path)
        except OSError as exc:
            structlog.get_logger("gateway.audit").error("audit.reopen_failed", path=self._path,
                                                        error=exc.strerror or type(exc).__name__)
            return
        if old is not None:
            old.close()

    def write(self, line: bytes) -> None:
        """Queue one line (without its newline)."""
        self.defer(line)

    def defer(self, item: Any) -> None:
        """Queue a line, or a finished exchange's audit record to build at flush (a tuple of
        ``_render``'s arguments); lines keep the order they were queued in."""
        self._lines.append(item)
        self.after_append()

    def after_append(self) -> None:
        """Flush a full batch, or schedule the flush of the first line of one."""
        if len(self._lines) >= FLUSH_LINES:
            self.flush()
        elif not self._scheduled:
            self._scheduled = True
            try:
                asyncio.get_running_loop().call_later(FLUSH_AFTER, self.flush)
            except RuntimeError:
                self.flush()

    def flush(self) -> None:
        if not self._lines:
            return
        items, self._lines = self._lines, []
        self._scheduled = False
        out: list[bytes] = []
        for item in items:
            if item.__class__ is bytes:
                out.append(item)
                continue
            try:
                out.append(_render(*item))
            except Exception as exc:     # noqa: BLE001 - one bad record must not lose the batch
                structlog.get_logger("gateway.audit").error("audit.record_failed", error=type(exc).__name__)
        if not out:
            return
        data = b"\n".join(out) + b"\n"
        stream = self._stream or sys.stdout.buffer
        try:
            stream.write(data)
            stream.flush()
        except (OSError, ValueError):
            pass  # stdout gone (closed pipe at shutdown) or a full disk: nothing left to tell


WRITER = AuditWriter()
_ID_PREFIX = os.urandom(5).hex() + "-"
_IDS = itertools.count(1)

_INFLIGHT = INFLIGHT_LEVEL.levels
_DURATIONS = DURATION_TALLY.pending
_REQUESTS = REQUESTS_TALLY.pending
_OVERHEADS = OVERHEAD_TALLY.pending
_WAITS = UPSTREAM_WAIT_TALLY.pending
_RAW_MAX = DURATION_TALLY.RAW_MAX


def start(ex: "Exchange") -> None:
    key = (ex.server.name,)
    _INFLIGHT[key] = _INFLIGHT.get(key, 0) + 1


def rehome(ex: "Exchange", server: "ServerConfig") -> None:
    """``ex`` goes on as an exchange with ``server`` (a virtual server's call that becomes its
    origin's in place: gateway/virtual/router.py): in flight there from now on, and ``finish``
    counts and records it there."""
    _INFLIGHT[(ex.server.name,)] -= 1
    ex.server = server
    key = (server.name,)
    _INFLIGHT[key] = _INFLIGHT.get(key, 0) + 1


def finish(ex: "Exchange", enabled: bool = True, client: "ClientAddress | None" = None,
           log_arguments: bool = False) -> None:
    """At the end of every exchange: the per-request metrics now, the audit record (when
    ``enabled``) at the next flush; ``client`` reads the client's address off the request."""
    server = ex.server.name
    # The metrics (tallies: telemetry.metrics), inlined: this runs for every request.
    skey = (server,)
    _INFLIGHT[skey] -= 1
    if ex.routed:
        # A virtual server's request routed to one origin in a sub-exchange (a traced request):
        # counted and recorded once, as the origin's (its sub-exchange finished already, naming
        # the virtual server in ``via``).
        return
    elapsed = time.perf_counter() - ex.started
    # HistogramTally.observe, inlined (values are bucketed in bulk at flush).
    values = _DURATIONS.get(skey)
    if values is None or len(values) >= _RAW_MAX:
        DURATION_TALLY.observe(skey, elapsed)
    else:
        values.append(elapsed)
    method = ex.method
    key = (server, method if method in KNOWN_METHODS else ("none" if method is None else "other"), ex.status)
    _REQUESTS[key] = _REQUESTS.get(key, 0) + 1
    if ex.upstream_sent:
        value = ex.upstream_sent - ex.started
        values = _OVERHEADS.get(skey)
        if values is None or len(values) >= _RAW_MAX:
            OVERHEAD_TALLY.observe(skey, value)
        else:
            values.append(value)
        values = _WAITS.get(skey)
        if values is None or len(values) >= _RAW_MAX:
            UPSTREAM_WAIT_TALLY.observe(skey, ex.upstream_wait)
        else:
            values.append(ex.upstream_wait)
    if enabled:
        # The record itself is built when the batch is written (``AuditWriter.flush``): a
        # hundred records built in one loop cost a fraction of a hundred built one by one
        # between the stages of other requests (the instruction and data caches stay warm).
        # Nothing reads an exchange after it finished, so its fields are as they were now.
        # WRITER.defer, inlined.
        lines = WRITER._lines
        lines.append((ex, elapsed, time.time(), client, log_arguments))
        if len(lines) >= FLUSH_LINES or not WRITER._scheduled:
            WRITER.after_append()


def _render(ex: "Exchange", elapsed: float, ts: float, client: "ClientAddress | None", log_arguments: bool) -> bytes:
    """The audit line of a finished exchange (at flush; see ``finish``)."""
    server = ex.server.name
    method = ex.method
    # The fields that repeat for a caller, server, method and target (and the policy
    # decision) are serialised once and memoised as a JSON prefix; the per-request ones are
    # serialised each time and appended.  Same record, about half the work.
    audit_safe = ex.audit_safe
    p = ex.principal
    pkey = (server, ex.request.method, ex.era, id(p), method, ex.name, id(audit_safe), ex.via)
    memo = _PREFIXES.get(pkey)
    if memo is None or memo[0] is not p or memo[1] is not audit_safe:
        if len(_PREFIXES) >= 1024:
            _PREFIXES.clear()                    # names are client-chosen: bounded
        # Holding p and audit_safe keeps their ids from being reused while the entry lives.
        memo = _PREFIXES[pkey] = (p, audit_safe, _prefix(ex, p, method, audit_safe))
    prefix = memo[2]
    fields: dict[str, Any] = {
        "request_id": f"{_ID_PREFIX}{next(_IDS):x}",     # unique across processes and replicas
        "level": "info" if ex.outcome == "ok" else "warning",
        "ts": ts,
        "status": ex.status,
        "outcome": ex.outcome,
        "client_address": client.of(ex.request) if client is not None else "",
        "duration_ms": elapsed * 1e3,
    }
    if ex.upstream_sent:
        # Before the upstream (the gateway's stages) and the upstream's time to answer
        # (status and headers); the rest of duration_ms is relaying the body or stream.
        fields["gateway_ms"] = (ex.upstream_sent - ex.started) * 1e3
        fields["upstream_ms"] = ex.upstream_wait * 1e3
    if ex.reason:
        fields["reason"] = ex.reason
    if ex.upstream_status:
        fields["upstream_status"] = ex.upstream_status
    if ex.session is not None:
        fields["session"] = ex.session.short
    if method == "tools/call" and ex.arguments is not None:
        # Size and hash by default; the arguments themselves (redacted) only when the
        # operator turned on logging.log_arguments.
        raw = orjson.dumps(ex.arguments)             # as parsed (the client's key order)
        fields["arguments_bytes"] = len(raw)
        h = _B2.copy()                                # _b2, inlined: this runs for every call
        h.update(raw)
        fields["arguments_b2"] = h.hexdigest()
        if log_arguments:
            fields["arguments"] = redact_value("arguments", ex.arguments)
    if ex.result_bytes >= 0:                          # closed formats: written as they are
        fields["result_bytes"] = ex.result_bytes
        if ex.result_body is not None:
            h = _B2.copy()
            h.update(ex.result_body)
            fields["result_b2"] = h.hexdigest()
    if ex.limit:
        fields["limit"] = ex.limit                    # closed set (limit ids come from the policy files)
    if ex.trace is not None:
        fields["trace_id"] = ex.trace.trace_id        # 32 lower-case hex digits, checked by the parser
    if ex.audit:
        for key, value in ex.audit.items():
            fields[key] = redact_value(key, value)
    return prefix + orjson.dumps(fields, default=str)[1:]


_PREFIXES: dict[tuple[Any, ...], tuple[Any, Any, bytes]] = {}
# BLAKE2b with an 8-byte digest (``b2sum -l 64`` computes the same): fewer instructions
# than SHA-256 through OpenSSL on these short inputs, and as collision-safe as the
# 64-bit SHA-256 prefix it replaces.  Copying this prepared object skips the keyword parsing.
_B2 = hashlib.blake2b(digest_size=8)


def _prefix(ex: "Exchange", p: Any, method: str | None, audit_safe: Any) -> bytes:
    """``{"event": ..., <the fields fixed for this key>,`` as bytes.  Closed sets as they
    are; principal, issuer, client id, method and target (token claims and client text)
    scrubbed."""
    name = p.name or p.subject
    fixed: dict[str, Any] = {
        "event": "mcp.request",
        "server": ex.server.name,
        "http_method": ex.request.method,
        "era": ex.era,
        "principal": scrub_text(name),
        "issuer": p.issuer and scrub_text(p.issuer),            # "" when anonymous
        "client_id": p.client_id and scrub_text(p.client_id),
    }
    if method is not None:
        fixed["method"] = scrub_text(method)
    if ex.name is not None:
        fixed["target"] = scrub_text(ex.name)
    if audit_safe is not None:
        fixed.update(audit_safe)
    if ex.via is not None:
        fixed["via"] = ex.via                 # a virtual server's name (configuration, not client text)
    return orjson.dumps(fixed, default=str)[:-1] + b","


def unknown_mount(request: Any, status: int, client: str) -> None:
    """The audit record of a request to a path where no server is mounted."""
    WRITER.write(orjson.dumps({
        "event": "mcp.request", "level": "warning", "ts": time.time_ns() // 1000 / 1e6, "server": "_unknown",
        "http_method": request.method, "status": status, "outcome": "rejected", "reason": "unknown_server",
        "client_address": client, "path": scrub_text(request.path[:256]),
    }))
