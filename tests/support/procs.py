"""Child processes for the tests: start, wait until ready, read the log, stop by PID.

Every server the suite runs (the gateway, the SDK upstream, server-everything,
redis-server, the OAuth AS) goes through :func:`start`.  The rules it enforces:

* output (stdout and stderr, merged) is copied line by line to a log file and kept
  in memory, so a test can assert on it and a failure can show its tail;
* readiness is an *event*: a line matching a regex, or a probe that succeeds.  There
  is no fixed sleep anywhere; a probe is retried, paced by waiting for the child to
  exit, so an early crash is reported at once with the log tail;
* stopping is by PID only: SIGTERM, then SIGKILL after a timeout.  Each child runs in
  its own session so signals from the terminal never reach it twice.
"""
from __future__ import annotations

import atexit
import http.client
import os
import re
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

DEFAULT_READY_TIMEOUT = 20.0
DEFAULT_STOP_TIMEOUT = 5.0
TAIL_LINES = 40
PROBE_PACE = 0.02  # seconds between readiness probes (spent waiting for the child to exit)


# Children run in their own session, so an interrupted pytest would not take them along:
# stop whatever is still running at interpreter exit (Ctrl-C, a crashed fixture).
_LIVE: set[ManagedProcess] = set()


@atexit.register
def _stop_leftovers() -> None:
    for proc in list(_LIVE):
        proc.stop(timeout=2.0)


class ProcessError(RuntimeError):
    """A child did not become ready (timeout or early exit); the message carries its log tail."""


class ManagedProcess:
    """A running child whose merged output is captured by a reader thread."""

    def __init__(self, name: str, argv: Sequence[str], log_path: Path, popen: subprocess.Popen[bytes]) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self.popen = popen
        self._lines: list[str] = []
        self._changed = threading.Condition()
        self._eof = False
        self._reader = threading.Thread(target=self._pump, name=f"log-{name}", daemon=True)
        self._reader.start()
        _LIVE.add(self)

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def returncode(self) -> int | None:
        return self.popen.poll()

    def _pump(self) -> None:
        assert self.popen.stdout is not None
        with open(self.log_path, "ab", buffering=0) as log:
            for raw in iter(self.popen.stdout.readline, b""):
                log.write(raw)
                with self._changed:
                    self._lines.append(raw.decode("utf-8", "replace").rstrip("\r\n"))
                    self._changed.notify_all()
        with self._changed:
            self._eof = True
            self._changed.notify_all()

    def lines(self) -> list[str]:
        """Every output line so far (stdout and stderr merged, newline stripped)."""
        with self._changed:
            return list(self._lines)

    def text(self) -> str:
        return "\n".join(self.lines())

    def tail(self, n: int = TAIL_LINES) -> str:
        return "\n".join(self.lines()[-n:])

    def wait_for_line(self, pattern: str | re.Pattern[str], timeout: float = DEFAULT_READY_TIMEOUT,
                      *, start: int = 0) -> re.Match[str]:
        """Block until an output line (from index ``start`` on) matches ``pattern``; return the match.

        Raises ProcessError on timeout or if the child's output ends first.
        """
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern
        _, match = self.wait_for(regex.search, timeout, start=start, what=f"/{regex.pattern}/")
        return match

    def wait_for(self, predicate: Callable[[str], object], timeout: float = DEFAULT_READY_TIMEOUT,
                 *, start: int = 0, what: str = "the expected line") -> tuple[int, object]:
        """Block until ``predicate(line)`` is truthy for a line at index >= ``start``.

        Returns ``(index, predicate result)``.  Raises ProcessError on timeout or end of output.
        """
        deadline = time.monotonic() + timeout
        index = start
        with self._changed:
            while True:
                while index < len(self._lines):
                    result = predicate(self._lines[index])
                    index += 1
                    if result:
                        return index - 1, result
                if self._eof:
                    why = f"exited (code {self.popen.poll()}) before printing {what}"
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    why = f"did not print {what} within {timeout:.1f}s"
                    break
                self._changed.wait(remaining)
        # Raised outside the lock: _fail() reads the log and may join the reader thread.
        self._fail(why)
        raise AssertionError("unreachable")

    def wait_until(self, probe: Callable[[], bool], timeout: float = DEFAULT_READY_TIMEOUT,
                   what: str = "readiness probe") -> None:
        """Retry ``probe`` until it returns True; raise ProcessError on timeout or child exit."""
        deadline = time.monotonic() + timeout
        last_error: Exception | None = None
        while True:
            try:
                if probe():
                    return
            except (OSError, http.client.HTTPException) as exc:
                last_error = exc
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self._fail(f"{what} did not succeed within {timeout:.1f}s (last error: {last_error!r})")
            try:
                # Pacing doubles as crash detection: returns at once if the child exits.
                self.popen.wait(min(PROBE_PACE, remaining))
            except subprocess.TimeoutExpired:
                continue
            # The child exited: a probe its exit satisfies (a closed listener) may hold now.
            try:
                if probe():
                    return
            except (OSError, http.client.HTTPException):
                pass
            self._fail(f"exited (code {self.popen.returncode}) before the {what} succeeded")

    def _fail(self, why: str) -> None:
        # A child that exited may still have output in the pipe: let the reader drain it.
        self._reader.join(0.5 if self.popen.poll() is not None else 0)
        raise ProcessError(f"{self.name} (pid {self.pid}) {why}\n"
                           f"argv: {' '.join(self.argv)}\nlog: {self.log_path}\n--- last lines ---\n{self.tail()}")

    def stop(self, timeout: float = DEFAULT_STOP_TIMEOUT) -> int:
        """SIGTERM this PID, SIGKILL it after ``timeout``; return the exit code.  Idempotent."""
        if self.popen.poll() is None:
            _signal(self.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                _signal(self.pid, signal.SIGKILL)
                self.popen.wait(timeout)
        self._reader.join(timeout)
        _LIVE.discard(self)
        # A grandchild may still hold the pipe open; then the reader owns it until EOF.
        if self.popen.stdout is not None and not self._reader.is_alive():
            self.popen.stdout.close()
        return self.popen.returncode

    def __enter__(self) -> ManagedProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<ManagedProcess {self.name} pid={self.pid} rc={self.returncode}>"


def _signal(pid: int, sig: signal.Signals) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def start(
    argv: Sequence[str],
    *,
    name: str,
    log_path: Path | str,
    env: Mapping[str, str] | None = None,
    cwd: Path | str | None = None,
    ready_line: str | re.Pattern[str] | None = None,
    ready_probe: Callable[[], bool] | None = None,
    ready_timeout: float = DEFAULT_READY_TIMEOUT,
) -> tuple[ManagedProcess, re.Match[str] | None]:
    """Start ``argv`` and wait until it is ready.

    ``env`` is added to (not substituted for) the current environment; a value of ""
    removes the variable.  Readiness is ``ready_line`` (regex on an output line), then
    ``ready_probe`` if given.  Returns the process and the readiness-line match.
    """
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    child_env = dict(os.environ)
    child_env["PYTHONUNBUFFERED"] = "1"
    for key, value in (env or {}).items():
        if value == "":
            child_env.pop(key, None)
        else:
            child_env[key] = value
    popen = subprocess.Popen(
        list(argv),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=child_env,
        cwd=cwd,
        start_new_session=True,
    )
    proc = ManagedProcess(name, argv, log_path, popen)
    match = None
    try:
        if ready_line is not None:
            match = proc.wait_for_line(ready_line, ready_timeout)
        if ready_probe is not None:
            proc.wait_until(ready_probe, ready_timeout)
    except BaseException:
        proc.stop()
        raise
    return proc, match


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago.  Prefer letting a server bind port 0 itself.

    The kernel may hand the same port to two binds in a row once the first socket is
    closed, so a port is never handed out twice by this process; and each pytest-xdist
    worker takes only ports of its own class (``port // 2 % workers == index``: Linux hands
    even ports to ``bind``), so two workers never hold the same one."""
    index, workers = _worker_slot()
    with _HANDED_LOCK:
        for _ in range(1000):
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                sock.bind((host, 0))
                port = sock.getsockname()[1]
            if port // 2 % workers == index and port not in _HANDED:
                _HANDED.add(port)
                return port
    raise RuntimeError("no free port found in 1000 tries")


_HANDED: set[int] = set()
_HANDED_LOCK = threading.Lock()


def _worker_slot() -> tuple[int, int]:
    """(index, count) of this pytest-xdist worker; (0, 1) outside xdist."""
    name = os.environ.get("PYTEST_XDIST_WORKER", "")
    count = os.environ.get("PYTEST_XDIST_WORKER_COUNT", "")
    if name.startswith("gw") and name[2:].isdigit() and count.isdigit() and int(count) > 0:
        return int(name[2:]) % int(count), int(count)
    return 0, 1


def tcp_probe(host: str, port: int) -> Callable[[], bool]:
    """A probe that succeeds once ``host:port`` accepts a TCP connection."""

    def probe() -> bool:
        with socket.create_connection((host, port), timeout=1.0):
            return True

    return probe


def http_probe(url: str, expect_status: int = 200) -> Callable[[], bool]:
    """A probe that succeeds once ``GET url`` answers ``expect_status`` (plain http only)."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")

    def probe() -> bool:
        conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port or 80, timeout=2.0)
        try:
            conn.request("GET", path)
            return conn.getresponse().status == expect_status
        finally:
            conn.close()

    return probe
