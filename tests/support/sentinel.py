"""Redis under Sentinel on loopback: a master, one replica and three sentinels, all real processes.

``start_sentinel_group(workdir)`` returns once the replica is in sync and every sentinel
knows the master, the replica and the two other sentinels (so each one follows a
failover).  ``failover()`` asks one sentinel for ``SENTINEL FAILOVER`` and returns once
every sentinel names the new master and the old one replicates from it;
``kill_master()`` kills the master (SIGKILL) and returns once the replica is promoted.
"""
from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import redis

from .components import RedisServer, start_redis
from .procs import ManagedProcess, ProcessError, free_port, start

MASTER_NAME = "mymaster"
QUORUM = 2
DOWN_AFTER_MS = 1000       # a master silent this long is subjectively down
FAILOVER_TIMEOUT_MS = 5000
DEADLINE = 60.0            # failover and reconfiguration: sentinels work on 1-10 s periods


PACE = 0.05


def wait_until(probe: Callable[[], Any], what: str, pace: ManagedProcess, timeout: float = DEADLINE) -> Any:
    """Poll ``probe`` until it returns something true (errors count as not yet); return it.
    Between polls, wait on ``pace`` exiting: a crashed process fails the wait at once."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            if result := probe():
                return result
        except (redis.RedisError, OSError) as exc:
            last = exc
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what} (last error: {last!r})")
        try:
            pace.popen.wait(PACE)
        except subprocess.TimeoutExpired:
            continue
        raise ProcessError(f"{pace.name} exited while waiting for {what}\n{pace.tail()}")


@dataclass
class SentinelGroup:
    servers: list[RedisServer]          # [first master, first replica]
    sentinels: list[tuple[int, ManagedProcess]]
    password: str
    clients: dict[int, redis.Redis] = field(default_factory=dict)

    @property
    def nodes(self) -> list[str]:
        """The sentinels as ``store.sentinel.nodes`` wants them."""
        return [f"127.0.0.1:{port}" for port, _ in self.sentinels]

    def redis(self, port: int) -> redis.Redis:
        """A client of the data node on ``port`` (either role)."""
        if port not in self.clients:
            self.clients[port] = redis.Redis(host="127.0.0.1", port=port, password=self.password,
                                             socket_timeout=5, decode_responses=True)
        return self.clients[port]

    def sentinel(self, i: int) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.sentinels[i][0], socket_timeout=5, decode_responses=True)

    def master_port(self, i: int = 0) -> int:
        host, port = self.sentinel(i).execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", MASTER_NAME)
        return int(port)

    def master(self) -> redis.Redis:
        return self.redis(self.master_port())

    def replicate(self) -> None:
        """Every write so far has reached the replica (``WAIT 1``)."""
        assert self.master().execute_command("WAIT", 1, 5000) == 1

    def failover(self) -> tuple[int, int]:
        """``SENTINEL FAILOVER``; (old master port, new master port) once the fleet agrees."""
        self.replicate()
        old = self.master_port()
        # NOGOODSLAVE until the sentinel has fresh INFO from the replica: ask again.
        wait_until(self._ask_failover, "a sentinel to accept SENTINEL FAILOVER", self.sentinels[0][1])
        new = wait_until(lambda: all(self.master_port(i) != old for i in range(len(self.sentinels)))
                         and self.master_port(), "every sentinel to name the new master", self.sentinels[0][1])
        wait_until(lambda: self._replicates(old, new), "the old master to replicate from the new one",
                   self.sentinels[0][1])
        return old, new

    def kill_master(self) -> tuple[int, int]:
        """Stop the master's process; (its port, the new master's port) once the sentinels
        have promoted the replica (subjective then objective down, an election, the promotion)."""
        self.replicate()
        old = self.master_port()
        next(s for s in self.servers if s.port == old).proc.popen.kill()
        new = wait_until(lambda: all(self.master_port(i) != old for i in range(len(self.sentinels)))
                         and self.master_port(), "every sentinel to name the promoted replica", self.sentinels[0][1])
        wait_until(lambda: self.redis(new).info("replication")["role"] == "master", "the promotion",
                   self.sentinels[0][1])
        return old, new

    def _ask_failover(self) -> bool:
        try:
            return bool(self.sentinel(0).execute_command("SENTINEL", "FAILOVER", MASTER_NAME))
        except redis.ResponseError as exc:
            if "NOGOODSLAVE" in str(exc) or "INPROG" in str(exc):
                return False
            raise

    def _replicates(self, replica: int, master: int) -> bool:
        info = self.redis(replica).info("replication")
        return (info.get("role") == "slave" and int(info.get("master_port", 0)) == master
                and info.get("master_link_status") == "up")

    def stop(self) -> None:
        for client in self.clients.values():
            client.close()
        for _, proc in self.sentinels:
            proc.stop()
        for server in self.servers:
            server.stop()


def _sentinel_conf(path: Path, port: int, master_port: int, password: str) -> None:
    path.write_text(
        f"port {port}\nbind 127.0.0.1\ndaemonize no\ndir {path.parent}\n"
        f"sentinel monitor {MASTER_NAME} 127.0.0.1 {master_port} {QUORUM}\n"
        f"sentinel auth-pass {MASTER_NAME} {password}\n"
        f"sentinel down-after-milliseconds {MASTER_NAME} {DOWN_AFTER_MS}\n"
        f"sentinel failover-timeout {MASTER_NAME} {FAILOVER_TIMEOUT_MS}\n"
        f"sentinel parallel-syncs {MASTER_NAME} 1\n")


def start_sentinel_group(workdir: Path, password: str) -> SentinelGroup:
    """Master, replica (``--replicaof``) and three sentinels; every one bound to 127.0.0.1."""
    auth = ("--requirepass", password, "--masterauth", password)
    started: list[Any] = []
    try:
        master = start_redis(workdir / "master", auth)
        started.append(master)
        replica = start_redis(workdir / "replica", (*auth, "--replicaof", "127.0.0.1", str(master.port)))
        started.append(replica)
        group = SentinelGroup([master, replica], [], password)
        wait_until(lambda: group._replicates(replica.port, master.port), "the replica to sync", replica.proc)
        binary = master.proc.argv[0]
        for i in range(3):
            sdir = workdir / f"sentinel-{i}"
            sdir.mkdir(parents=True, exist_ok=True)
            for _ in range(3):
                port = free_port()
                _sentinel_conf(sdir / "sentinel.conf", port, master.port, password)
                try:
                    proc, _ = start([binary, str(sdir / "sentinel.conf"), "--sentinel"], name=f"sentinel-{port}",
                                    log_path=sdir / f"sentinel-{port}.log", ready_line=r"\+monitor master")
                except ProcessError as exc:
                    if "Address already in use" in str(exc):
                        continue
                    raise
                break
            else:
                raise ProcessError("no free port for a sentinel")
            group.sentinels.append((port, proc))
            started.append(proc)
        for i in range(3):
            s = group.sentinel(i)
            wait_until(lambda: _knows_everyone(s), f"sentinel {i} to see the replica and the other sentinels",
                       group.sentinels[i][1])
        return group
    except BaseException:
        for item in reversed(started):
            item.stop()
        raise


def _knows_everyone(s: redis.Redis) -> bool:
    replicas = s.execute_command("SENTINEL", "REPLICAS", MASTER_NAME)
    others = s.execute_command("SENTINEL", "SENTINELS", MASTER_NAME)
    return len(replicas) == 1 and len(others) == 2
