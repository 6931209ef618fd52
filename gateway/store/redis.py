"""Redis store: shared state for several replicas.

Every key is prefixed (``store.prefix``) so several gateways or test runs can
share one Redis.  With ``store.sentinel`` the client asks the sentinels for the
master, and asks again when a connection fails or the master it holds answers
``READONLY`` (it was demoted by a failover): redis-py's Sentinel pool does both.  Pub/sub carries invalidations (e.g. a session deleted on
one replica) to the others' local caches.
"""
from __future__ import annotations

import asyncio
import inspect
import time
from typing import Any

import redis.asyncio as aioredis
import structlog
from redis.exceptions import RedisError

from .base import Listener, StoreError
from ..telemetry.metrics import BOUND, STORE_ERRORS, STORE_LATENCY_TALLY

log = structlog.get_logger("gateway.store")

# Atomic "increment, and set the TTL when the key is new" for fixed windows.
_INCR_WINDOW = """
local v = redis.call('INCRBY', KEYS[1], ARGV[1])
if v == tonumber(ARGV[1]) then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return v
"""


def _failed(operation: str) -> StoreError:
    """Count a failed store call; the error to raise."""
    BOUND.get(STORE_ERRORS, operation).inc()
    return StoreError(f"redis {operation} failed")


class RedisStore:
    kind = "redis"

    def __init__(self, url: str, prefix: str = "mcpgw:", sentinel: Any = None) -> None:
        self._url = url
        self._prefix = prefix
        self._sentinel_cfg = sentinel        # config.model.SentinelConfig, or None: a plain URL
        self._sentinel: Any = None
        self._client: Any = None
        self._subs: dict[str, list[Listener]] = {}
        self._pubsub: Any = None
        self._listener_task: asyncio.Task[None] | None = None
        self._incr: Any = None
        self._pending: set[asyncio.Task[Any]] = set()

    def _k(self, key: str) -> str:
        return self._prefix + key

    async def start(self) -> None:
        options: dict[str, Any] = dict(socket_connect_timeout=2.0, socket_timeout=2.0,
                                       health_check_interval=15, decode_responses=False)
        cfg = self._sentinel_cfg
        if cfg is None:
            self._client = aioredis.from_url(self._url, **options)
        else:
            from redis.asyncio.sentinel import Sentinel

            sentinel_auth = {"password": cfg.sentinel_password.resolve()} if cfg.sentinel_password else {}
            self._sentinel = Sentinel(list(cfg.nodes), socket_timeout=2.0, socket_connect_timeout=2.0,
                                      sentinel_kwargs={"socket_timeout": 2.0, "socket_connect_timeout": 2.0,
                                                       **sentinel_auth})
            self._client = self._sentinel.master_for(
                cfg.master, db=cfg.db, password=cfg.password.resolve() if cfg.password else None, **options)
        self._incr = self._client.register_script(_INCR_WINDOW)
        if self._subs:
            await self._start_listener()

    async def close(self) -> None:
        if self._listener_task is not None:
            self._listener_task.cancel()
            try:
                await self._listener_task
            except (asyncio.CancelledError, Exception):
                pass
        if self._pubsub is not None:
            try:
                await self._pubsub.aclose()
            except RedisError:
                pass
        if self._client is not None:
            await self._client.aclose()
        if self._sentinel is not None:
            await self._sentinel.aclose()

    async def ping(self) -> bool:
        try:
            return bool(await self._client.ping())
        except (RedisError, OSError):
            return False

    async def get(self, key: str) -> bytes | None:
        start = time.perf_counter()
        try:
            return await self._client.get(self._k(key))
        except (RedisError, OSError) as exc:
            raise _failed("get") from exc
        finally:
            STORE_LATENCY_TALLY.observe(("get",), time.perf_counter() - start)

    async def set(self, key: str, value: bytes, ttl: float | None = None) -> None:
        start = time.perf_counter()
        try:
            await self._client.set(self._k(key), value, px=int(ttl * 1000) if ttl else None)
        except (RedisError, OSError) as exc:
            raise _failed("set") from exc
        finally:
            STORE_LATENCY_TALLY.observe(("set",), time.perf_counter() - start)

    async def set_if_absent(self, key: str, value: bytes, ttl: float | None = None) -> bool:
        start = time.perf_counter()
        try:
            return bool(await self._client.set(self._k(key), value, nx=True,
                                               px=int(ttl * 1000) if ttl else None))
        except (RedisError, OSError) as exc:
            raise _failed("set") from exc
        finally:
            STORE_LATENCY_TALLY.observe(("set",), time.perf_counter() - start)

    async def delete(self, key: str) -> bool:
        start = time.perf_counter()
        try:
            return bool(await self._client.delete(self._k(key)))
        except (RedisError, OSError) as exc:
            raise _failed("delete") from exc
        finally:
            STORE_LATENCY_TALLY.observe(("delete",), time.perf_counter() - start)

    async def incr_window(self, key: str, amount: int, ttl: float) -> int:
        try:
            return int(await self._incr(keys=[self._k(key)], args=[amount, int(ttl * 1000)]))
        except (RedisError, OSError) as exc:
            raise _failed("incr") from exc

    async def publish(self, channel: str, message: bytes) -> None:
        try:
            await self._client.publish(self._k(channel), message)
        except (RedisError, OSError) as exc:
            raise _failed("publish") from exc

    def subscribe(self, channel: str, callback: Listener) -> None:
        new_channel = channel not in self._subs
        self._subs.setdefault(channel, []).append(callback)
        if self._client is None:
            return          # start() subscribes every channel registered so far
        loop = asyncio.get_running_loop()
        if self._listener_task is None:
            task = loop.create_task(self._start_listener())
        elif new_channel:
            task = loop.create_task(self._pubsub.subscribe(self._k(channel)))
        else:
            return
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _start_listener(self) -> None:
        if self._listener_task is not None:
            return
        self._pubsub = self._client.pubsub(ignore_subscribe_messages=True)
        subscribed = True
        try:
            await self._pubsub.subscribe(*[self._k(c) for c in self._subs])
        except (RedisError, OSError):
            # Redis down at start: start anyway, unready (/readyz) and failing closed per
            # request, and subscribe as soon as it answers.
            BOUND.get(STORE_ERRORS, "subscribe").inc()
            log.warning("store.unreachable_at_start", detail="subscribing again every second")
            subscribed = False
        self._listener_task = asyncio.get_running_loop().create_task(self._listen(subscribed))

    async def _listen(self, subscribed: bool) -> None:
        plen = len(self._prefix)
        while True:
            try:
                if not subscribed:
                    await self._pubsub.subscribe(*[self._k(c) for c in self._subs])
                    subscribed = True
                    log.info("store.pubsub_subscribed", detail="Redis answers again")
                async for msg in self._pubsub.listen():
                    if msg.get("type") != "message":
                        continue
                    channel = msg["channel"].decode()[plen:]
                    for callback in list(self._subs.get(channel, ())):
                        try:
                            result = callback(channel, msg["data"])
                            if inspect.isawaitable(result):
                                await result
                        except Exception:  # a bad listener must not kill the loop
                            log.exception("store.listener_failed", channel=channel)
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError):
                log.warning("store.pubsub_reconnect")
                subscribed = False
            await asyncio.sleep(1.0)


def make_store(config: Any):
    """The store for ``config.store`` (a ``StoreConfig``)."""
    if config.kind == "redis":
        return RedisStore(config.url, config.prefix, config.sentinel)
    from .memory import MemoryStore
    return MemoryStore(config.prefix)
