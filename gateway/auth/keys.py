"""One issuer's signing keys: discovered, fetched, cached, refreshed, rotated.

Contract: ``lookup(kid, alg)`` is synchronous and cheap (a dict read) and
is all a request pays while the keys are fresh.  ``refresh()`` is
single-flight: concurrent callers share one fetch.  An unknown ``kid`` may
force a refetch at most once per ``jwks_cooldown``, counted from the last fetch
an unknown kid caused (not from the periodic refresh: the first token signed
with a rotated key is then accepted at once, however recently the keys were
refreshed; a flood of random ``kid`` values still costs the IdP one request per
cool-down).  A failed refresh keeps the previous keys.  A key
that leaves the JWKS (the end of a rotation) is reported to ``on_removed``,
so that tokens it verified stop being accepted from the verified-token cache.
"""
from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass
from typing import Any, Callable

import aiohttp
import structlog
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from jwt import PyJWK
from jwt.exceptions import PyJWTError

from ..telemetry.metrics import AUTH_JWKS_FETCHES, BOUND
from .config import IssuerConfig
from .fetch import FetchError, discover, request_json
from .netpolicy import url_problem

log = structlog.get_logger("gateway.auth")

MIN_RSA_BITS = 2048
_CURVES = {"ES256": "secp256r1", "ES384": "secp384r1", "ES512": "secp521r1"}


@dataclass(frozen=True, slots=True)
class Key:
    kid: str | None
    key: Any            # a cryptography public key object
    alg: str | None     # the JWK's own "alg", if it names one

    def fits(self, alg: str) -> bool:
        """May this key verify a JWS with header ``alg``?  (Key type must match the algorithm.)"""
        if self.alg is not None and self.alg != alg:
            return False
        k = self.key
        if alg[:2] in ("RS", "PS"):
            return isinstance(k, rsa.RSAPublicKey)
        if alg in _CURVES:
            return isinstance(k, ec.EllipticCurvePublicKey) and k.curve.name == _CURVES[alg]
        if alg == "EdDSA":
            return isinstance(k, (ed25519.Ed25519PublicKey, ed448.Ed448PublicKey))
        return False


def parse_jwks(doc: dict[str, Any]) -> tuple[list[Key], list[str]]:
    """The usable signature keys of a JWKS document, and why others were skipped."""
    keys: list[Key] = []
    skipped: list[str] = []
    raw = doc.get("keys")
    if not isinstance(raw, list):
        raise FetchError("invalid_jwks", "JWKS has no 'keys' list")
    for item in raw:
        if not isinstance(item, dict):
            continue
        kid = item.get("kid") if isinstance(item.get("kid"), str) else None
        if item.get("use") not in (None, "sig"):
            continue
        if "d" in item or "k" in item:
            skipped.append(f"{kid}: private or symmetric key material in a JWKS")
            continue
        try:
            jwk = PyJWK(item)
        except PyJWTError as exc:
            skipped.append(f"{kid}: {type(exc).__name__}")
            continue
        key = jwk.key
        if isinstance(key, rsa.RSAPublicKey) and key.key_size < MIN_RSA_BITS:
            skipped.append(f"{kid}: RSA key shorter than {MIN_RSA_BITS} bits")
            continue
        if not isinstance(key, (rsa.RSAPublicKey, ec.EllipticCurvePublicKey,
                                ed25519.Ed25519PublicKey, ed448.Ed448PublicKey)):
            continue
        alg = item.get("alg") if isinstance(item.get("alg"), str) else None
        keys.append(Key(kid, key, alg))
    return keys, skipped


class KeySet:
    """The cached keys of one issuer plus the machinery that keeps them current."""

    def __init__(self, cfg: IssuerConfig, timeout: float,
                 on_removed: Callable[[str, frozenset[str]], None] | None = None) -> None:
        self.cfg = cfg
        self.timeout = timeout
        self._on_removed = on_removed     # (issuer, kids no longer published)
        self.jwks_uri: str | None = cfg.jwks_uri
        self.metadata: dict[str, Any] | None = None
        self._by_kid: dict[str, list[Key]] = {}
        self._all: list[Key] = []
        self.fetched_at: float | None = None      # monotonic time of the last fetch attempt
        self.kid_fetched_at: float | None = None  # ... of the last one an unknown kid caused
        self.loaded = False
        self._inflight: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None
        self._loop_task: asyncio.Task[None] | None = None
        self._deferred: asyncio.TimerHandle | None = None
        self._kid_task: asyncio.Task[None] | None = None
        self.fetches = 0

    # -- request path ---------------------------------------------------------
    def lookup(self, kid: str | None, alg: str) -> Key | None:
        if kid is not None:
            for key in self._by_kid.get(kid, ()):
                if key.fits(alg):
                    return key
            return None
        # No kid: only unambiguous when exactly one key fits (never try them all).
        fitting = [k for k in self._all if k.fits(alg)]
        return fitting[0] if len(fitting) == 1 else None

    def install(self, keys: list[Key]) -> None:
        """Replace the usable keys (after a fetch; tests and fuzzers load keys directly)."""
        by_kid: dict[str, list[Key]] = {}
        for key in keys:
            if key.kid is not None:
                by_kid.setdefault(key.kid, []).append(key)
        removed = frozenset(self._by_kid.keys() - by_kid.keys())
        self._by_kid, self._all, self.loaded = by_kid, keys, True
        if removed and self._on_removed is not None:
            self._on_removed(self.cfg.issuer, removed)

    def may_refetch(self) -> bool:
        return self.kid_fetched_at is None or time.monotonic() - self.kid_fetched_at >= self.cfg.jwks_cooldown

    def kid_fetch_running(self) -> bool:
        return self._kid_task is not None and not self._kid_task.done()

    async def refetch_for_kid(self) -> None:
        """Fetch because a token named an unknown kid (starts the cool-down), or join the one running.

        A fetch already under way (the periodic refresh) may predate the new key, so this
        one starts after it; tokens naming unknown kids meanwhile wait for the same fetch.
        """
        task = self._kid_task
        if task is None or task.done():
            self.kid_fetched_at = time.monotonic()
            task = self._kid_task = asyncio.create_task(self._fetch_after_inflight())
            task.add_done_callback(lambda t: t.cancelled() or t.exception())   # failures: logged by _fetch
        await asyncio.shield(task)

    async def _fetch_after_inflight(self) -> None:
        inflight = self._inflight
        if inflight is not None and not inflight.done():
            try:
                await inflight
            except FetchError:
                pass
        await self._fetch_task()

    def refetch_after_cooldown(self) -> None:
        """An unknown kid inside the cool-down: fetch once the cool-down ends.

        A rotated key then becomes known without waiting for the next periodic
        refresh, while fetches stay at most one per cool-down whatever kids
        clients send (at most one deferred fetch is pending).
        """
        if self._deferred is not None or self.kid_fetched_at is None:
            return
        delay = max(0.0, self.kid_fetched_at + self.cfg.jwks_cooldown - time.monotonic())
        self._deferred = asyncio.get_running_loop().call_later(delay, self._deferred_fetch)

    def _deferred_fetch(self) -> None:
        self._deferred = None
        self.kid_fetched_at = time.monotonic()
        # A failure is logged and counted by _fetch; nothing awaits this task.
        self._fetch_task().add_done_callback(lambda t: t.cancelled() or t.exception())

    # -- lifecycle --------------------------------------------------------------
    async def start(self, session: aiohttp.ClientSession) -> None:
        """Fetch once (a failure is logged, not fatal) and keep refreshing in the background."""
        self._session = session
        try:
            await self.refresh()
        except FetchError:
            pass
        self._loop_task = asyncio.create_task(self._refresh_loop(), name=f"jwks:{self.cfg.issuer}")

    async def close(self) -> None:
        if self._deferred is not None:
            self._deferred.cancel()
            self._deferred = None
        for task in (self._loop_task, self._kid_task, self._inflight):
            if task is not None and not task.done():
                task.cancel()
        for task in (self._loop_task, self._kid_task, self._inflight):
            if task is not None:
                try:
                    await task
                except (asyncio.CancelledError, Exception):
                    pass
        self._loop_task = self._kid_task = self._inflight = None

    async def _refresh_loop(self) -> None:
        while True:
            # Jitter so replicas do not hit the IdP in lockstep; retry sooner while empty.
            base = self.cfg.jwks_refresh if self.loaded else min(self.cfg.jwks_refresh, 30.0)
            await asyncio.sleep(base * random.uniform(0.8, 1.0))
            try:
                await self.refresh()
            except FetchError:
                pass

    async def refresh(self) -> None:
        """Fetch metadata (when needed) and the JWKS; concurrent callers share one fetch."""
        await asyncio.shield(self._fetch_task())

    def _fetch_task(self) -> asyncio.Task[None]:
        """The fetch in flight, or a new one: concurrent callers share one fetch."""
        if self._inflight is None or self._inflight.done():
            self._inflight = asyncio.create_task(self._fetch())
        return self._inflight

    async def _fetch(self) -> None:
        assert self._session is not None, "KeySet.start() was not called"
        self.fetched_at = time.monotonic()
        self.fetches += 1
        iss = self.cfg.issuer
        try:
            if self.jwks_uri is None:
                self.metadata = await discover(self._session, iss, timeout=self.timeout)
                uri = self.metadata.get("jwks_uri")
                if not isinstance(uri, str) or (why := url_problem(uri, allow_query=True)):
                    raise FetchError("invalid_metadata", f"{iss}: unusable jwks_uri in metadata"
                                     + (f" ({why})" if isinstance(uri, str) else ""))
                self.jwks_uri = uri
            doc = await request_json(self._session, "GET", self.jwks_uri, timeout=self.timeout)
            keys, skipped = parse_jwks(doc)
        except FetchError as exc:
            log.warning("auth.jwks_fetch_failed", issuer=iss, reason=exc.reason, detail=str(exc),
                        keys_kept=len(self._all))
            _metric_fetch(iss, exc.reason)
            raise
        self.install(keys)
        _metric_fetch(iss, "ok")
        log.info("auth.jwks_loaded", issuer=iss, keys=len(keys), skipped=skipped or None)


def _metric_fetch(issuer: str, outcome: str) -> None:
    BOUND.get(AUTH_JWKS_FETCHES, issuer, outcome).inc()
