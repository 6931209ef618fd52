"""The client's address for the audit record: the peer, or X-Forwarded-For from trusted proxies.

``X-Forwarded-For`` is believed only when the TCP peer is one of
``http.trusted_proxies``; then the list is read right to left, skipping trusted
proxies, and the first address that is not one is the client (an address the
client wrote itself, further left, is never taken).  The header is never
forwarded upstream either way.
"""
from __future__ import annotations

import ipaddress
from typing import Any, Sequence

_MAX_HOPS = 16          # addresses read from X-Forwarded-For; a longer list is not believed further


class ClientAddress:
    __slots__ = ("_proxies",)

    def __init__(self, proxies: Sequence[Any]) -> None:
        self._proxies = tuple(proxies)

    def _trusted(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in net for net in self._proxies)

    def of(self, request: Any) -> str:
        peer = request.remote or ""
        if not self._proxies or not self._trusted(peer):
            return peer
        hops = [h.strip() for v in request.headers.getall("X-Forwarded-For", ()) for h in v.split(",")]
        for hop in reversed(hops[-_MAX_HOPS:]):
            if not self._trusted(hop):
                try:
                    return str(ipaddress.ip_address(hop))
                except ValueError:
                    return peer       # garbage where an address should be: fall back to what TCP says
        return peer
