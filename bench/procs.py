"""Child processes of the harness: start, wait until ready, measure CPU, stop by PID.

Readiness is never a sleep: a server either prints a ``BENCH_READY {json}`` line or
answers an HTTP probe, and both waits have a deadline. Only processes started here
(and their descendants) are ever signalled.
"""
from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any

import aiohttp
import psutil

READY_PREFIX = "BENCH_READY "


class StartError(RuntimeError):
    """A server did not become ready; the message carries the tail of its output."""

    def __init__(self, message: str, summary: str) -> None:
        super().__init__(message)
        self.summary = summary  # one line: why, and the last line the server wrote


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago, for servers whose port must go in a config file."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class Proc:
    """One started server process and its log file (stderr, and stdout unless it is scanned).

    With ``ready_line`` stdout is a pipe scanned for ``BENCH_READY``; otherwise it goes to
    the log too, so a chatty server (the gateway's audit log) never costs the harness CPU.
    """

    def __init__(self, name: str, proc: asyncio.subprocess.Process, log_path: Path) -> None:
        self.name = name
        self.proc = proc
        self.pid = proc.pid
        self.log_path = log_path
        self.ready_info: dict[str, Any] | None = None
        self._ready = asyncio.get_running_loop().create_future()
        self._lines: deque[str] = deque(maxlen=50)  # a tail for error messages, bounded
        self._reader = (asyncio.ensure_future(self._read_stdout())
                        if proc.stdout is not None else None)
        self._ps = psutil.Process(self.pid)

    @classmethod
    async def start(cls, name: str, argv: list[str], run_dir: Path, cwd: Path | None = None,
                    env: dict[str, str] | None = None, ready_line: bool = True,
                    nice: int | None = None) -> "Proc":
        log_path = run_dir / f"{name}.log"
        log = open(log_path, "wb")  # noqa: SIM115 - the child owns it from here
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv, stdout=asyncio.subprocess.PIPE if ready_line else log, stderr=log,
                stdin=asyncio.subprocess.DEVNULL,
                cwd=cwd, env={**os.environ, **(env or {})}, start_new_session=True)
        finally:
            log.close()
        if nice is not None:
            set_priority(proc.pid, nice)
        return cls(name, proc, log_path)

    async def _read_stdout(self) -> None:
        assert self.proc.stdout is not None
        while line_b := await self.proc.stdout.readline():
            line = line_b.decode(errors="replace").rstrip()
            self._lines.append(line)
            if line.startswith(READY_PREFIX) and not self._ready.done():
                self._ready.set_result(json.loads(line[len(READY_PREFIX):]))
        if not self._ready.done():
            self._ready.set_result(None)  # EOF: the process exited (or closed stdout) unready

    async def wait_ready_line(self, timeout: float = 15.0) -> dict[str, Any]:
        """Wait for ``BENCH_READY {json}`` on stdout and return the JSON."""
        if self._reader is None:
            raise ValueError(f"{self.name} was started without ready_line")
        try:
            info = await asyncio.wait_for(asyncio.shield(self._ready), timeout)
        except asyncio.TimeoutError as exc:
            raise self.failure(f"not ready after {timeout:g} s") from exc
        if info is None:
            raise self.failure("exited before it was ready")
        self.ready_info = info
        return info

    async def wait_http_ready(self, url: str, timeout: float = 30.0) -> None:
        """Poll ``url`` until it answers 200; fail early if the process exits."""
        deadline = time.monotonic() + timeout
        last = "no answer"
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as s:
            while time.monotonic() < deadline:
                if self.proc.returncode is not None:
                    raise self.failure(
                        f"exited with code {self.proc.returncode} before {url} answered 200")
                try:
                    async with s.get(url) as r:
                        if r.status == 200:
                            return
                        last = f"HTTP {r.status}"
                except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                    last = type(exc).__name__
                # A probe interval, not a readiness guess: the loop ends on the 200 or the deadline.
                await asyncio.sleep(0.05)
        raise self.failure(f"{url} not 200 after {timeout:g} s ({last})")

    async def wait_redis_ready(self, port: int, timeout: float = 15.0) -> None:
        """Send PING until the server answers +PONG; fail early if the process exits."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.returncode is not None:
                raise self.failure(f"exited with code {self.proc.returncode}")
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                try:
                    writer.write(b"PING\r\n")
                    if (await asyncio.wait_for(reader.readline(), 2)).startswith(b"+PONG"):
                        return
                finally:
                    writer.close()
            except (OSError, asyncio.TimeoutError):
                pass
            await asyncio.sleep(0.05)  # a probe interval; the loop ends on PONG or the deadline
        raise self.failure(f"no PONG on port {port} after {timeout:g} s")

    def failure(self, why: str) -> StartError:
        stderr_tail = ""
        try:
            stderr_tail = self.log_path.read_text(errors="replace")[-2000:]
        except OSError:
            pass
        out = "\n".join(self._lines)
        last = next((ln.strip() for ln in reversed((out + "\n" + stderr_tail).splitlines())
                     if ln.strip()), "")
        return StartError(f"{self.name} (pid {self.pid}): {why}\n--- stdout tail ---\n{out}\n"
                          f"--- log tail ({self.log_path}) ---\n{stderr_tail}",
                          f"{why}: {last}"[:400])

    def tree(self) -> list[psutil.Process]:
        try:
            return [self._ps, *self._ps.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def cpu_seconds(self) -> float:
        """User + system CPU of the process and its live descendants (worker processes)."""
        total = 0.0
        for p in self.tree():
            try:
                t = p.cpu_times()
            except psutil.NoSuchProcess:
                continue
            total += t.user + t.system
        return total

    def cpu_seconds_fine(self) -> float:
        """``cpu_seconds`` to the nanosecond where Linux says it (each live thread's
        ``schedstat``): clock ticks (10 ms) are too coarse for a per-call figure of a round of
        a few thousand calls.  A thread that ended between two readings is not counted."""
        total = 0.0
        for p in self.tree():
            ns = _schedstat_ns(p.pid)
            if ns is None:
                return self.cpu_seconds()
            total += ns / 1e9
        return total

    async def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout``; descendants found now get the same."""
        if self.proc.returncode is not None:
            if self._reader is not None:
                await self._reader
            return
        family = self.tree()
        for p in reversed(family):
            _signal(p, signal.SIGTERM)
        try:
            await asyncio.wait_for(self.proc.wait(), timeout)
        except asyncio.TimeoutError:
            print(f"bench: {self.name} (pid {self.pid}) ignored SIGTERM; killing", file=sys.stderr)
        for p in family:
            if p.is_running():
                _signal(p, signal.SIGKILL)
        await self.proc.wait()
        if self._reader is not None:
            await asyncio.wait_for(self._reader, timeout)


def set_priority(pid: int, nice: int) -> None:
    """Nice ``pid`` and, where the kernel groups by session (autogroup), its session too.

    With autogroup on, CPU is shared fairly between sessions first and nice values count
    only inside one, so a nice value alone does nothing against other sessions' work.
    Each server here runs in its own session, so each gets the autogroup nice as well.
    """
    os.setpriority(os.PRIO_PROCESS, pid, nice)
    try:
        Path(f"/proc/{pid}/autogroup").write_text(str(nice))
    except OSError:
        pass  # no autogroup on this kernel: the plain nice value is all there is


def _signal(p: psutil.Process, sig: int) -> None:
    try:
        p.send_signal(sig)
    except psutil.NoSuchProcess:
        pass


def _schedstat_ns(pid: int) -> int | None:
    """Nanoseconds ``pid``'s threads have spent on a CPU (Linux ``/proc/<pid>/task/*/schedstat``)."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return None
    total = 0
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            continue              # a thread that ended meanwhile
    return total
