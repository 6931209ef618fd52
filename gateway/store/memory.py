"""In-process store: one replica, nothing survives a restart."""
from __future__ import annotations

import inspect
import time

from .base import Listener


class MemoryStore:
    kind = "memory"

    def __init__(self, prefix: str = "") -> None:
        self._data: dict[str, tuple[bytes, float | None]] = {}
        self._subs: dict[str, list[Listener]] = {}

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        self._data.clear()

    async def ping(self) -> bool:
        return True

    def _live(self, key: str) -> bytes | None:
        item = self._data.get(key)
        if item is None:
            return None
        value, expires = item
        if expires is not None and expires <= time.monotonic():
            del self._data[key]
            return None
        return value

    async def get(self, key: str) -> bytes | None:
        return self._live(key)

    async def set(self, key: str, value: bytes, ttl: float | None = None) -> None:
        self._data[key] = (value, time.monotonic() + ttl if ttl else None)

    async def set_if_absent(self, key: str, value: bytes, ttl: float | None = None) -> bool:
        if self._live(key) is not None:
            return False
        await self.set(key, value, ttl)
        return True

    async def delete(self, key: str) -> bool:
        return self._data.pop(key, None) is not None

    async def incr_window(self, key: str, amount: int, ttl: float) -> int:
        current = self._live(key)
        value = int(current or b"0") + amount
        expires = self._data[key][1] if current is not None else time.monotonic() + ttl
        self._data[key] = (str(value).encode(), expires)
        return value

    async def publish(self, channel: str, message: bytes) -> None:
        for callback in list(self._subs.get(channel, ())):
            result = callback(channel, message)
            if inspect.isawaitable(result):
                await result

    def subscribe(self, channel: str, callback: Listener) -> None:
        self._subs.setdefault(channel, []).append(callback)

    def __len__(self) -> int:  # for tests and /readyz detail
        return len(self._data)


