"""A bare aiohttp pass-through proxy: the floor a Python gateway is compared against.

One ``ClientSession`` for the whole process; every request is forwarded to the
``--upstream`` origin with its path and query unchanged; the response is
streamed back chunk by chunk as it arrives (so SSE events pass unbuffered).
``--buffer`` reads the whole upstream body first, as a gateway that inspects
JSON answers would. No policy, no parsing, no logging.

Run ``python -m bench.bare_proxy --upstream http://127.0.0.1:P``; it prints
``BENCH_READY {"port": N}`` once listening.
"""
from __future__ import annotations

import argparse
import asyncio
import json

import aiohttp
from aiohttp import web

from .upstream import run

# RFC 9110 §7.6.1 hop-by-hop fields, plus the ones aiohttp sets itself.
_HOP = frozenset({"connection", "keep-alive", "proxy-connection", "te", "trailer",
                  "transfer-encoding", "upgrade", "host", "content-length"})

SESSION: web.AppKey[aiohttp.ClientSession] = web.AppKey("session", aiohttp.ClientSession)


def make_app(upstream: str, buffer: bool) -> web.Application:
    upstream = upstream.rstrip("/")

    async def client_session(app: web.Application):  # type: ignore[no-untyped-def]
        # limit=0: no pool cap, so the proxy never queues behind its own connector.
        connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=None)
        async with aiohttp.ClientSession(connector=connector, auto_decompress=False) as s:
            app[SESSION] = s
            yield

    async def forward(request: web.Request) -> web.StreamResponse:
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP}
        url = upstream + request.raw_path
        body = await request.read()
        async with request.app[SESSION].request(request.method, url, headers=headers,
                                                data=body or None,
                                                allow_redirects=False) as up:
            out = {k: v for k, v in up.headers.items() if k.lower() not in _HOP}
            if buffer:
                return web.Response(status=up.status, headers=out, body=await up.read())
            resp = web.StreamResponse(status=up.status, headers=out)
            if up.content_length is not None:
                resp.content_length = up.content_length
            await resp.prepare(request)
            async for chunk in up.content.iter_any():
                await resp.write(chunk)
            await resp.write_eof()
            return resp

    app = web.Application()
    app.cleanup_ctx.append(client_session)
    app.router.add_route("*", "/{tail:.*}", forward)
    return app


async def serve(host: str, port: int, upstream: str, buffer: bool) -> None:
    runner = web.AppRunner(make_app(upstream, buffer), access_log=None, handle_signals=True)
    await runner.setup()
    site = web.TCPSite(runner, host, port, backlog=1024)
    await site.start()
    bound = runner.addresses[0][1]
    print("BENCH_READY " + json.dumps({"port": bound}), flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.bare_proxy",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("--upstream", required=True, help="origin, e.g. http://127.0.0.1:P")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0, help="0 picks a free port")
    ap.add_argument("--uvloop", action="store_true")
    ap.add_argument("--buffer", action="store_true", help="read upstream bodies whole")
    args = ap.parse_args(argv)
    try:
        run(serve(args.host, args.port, args.upstream, args.buffer), uvloop=args.uvloop)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
