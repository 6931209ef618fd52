"""``mcp-gateway pins``: fetch, diff and approve the tool definitions a server may show the model.

::

    mcp-gateway pins fetch   SERVER -c gateway.yaml [--force]   write the lock file from the live server
    mcp-gateway pins diff    SERVER -c gateway.yaml             what changed, tool by tool (exit 1 if anything)
    mcp-gateway pins approve SERVER [TOOL...] -c gateway.yaml [--accept-findings]
    mcp-gateway pins reset   SERVER -c gateway.yaml             forget the tofu pin in the shared store

The upstream is reached with the server's configured credentials; its tool
list is read raw (see ``tool_fetch``) so the fingerprints are the ones the
gateway computes on the wire.  Every fetched definition is also scanned for
poisoning: a tool with a blocking finding is not approved unless
``--accept-findings`` records that an operator read it.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import sys
from types import SimpleNamespace
from typing import Any

import aiohttp

from ..errors import ConfigError, Problem
from .lockfile import Approved, PinnedTool, load_lock, lock_path, write_lock
from .names import NameIndex
from .pin_diff import render_diff
from .pinning import classify, removed
from .poisoning import Finding
from .tool_fetch import FetchError, fetch_tools


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("pins", help="tool-definition pins: fetch, diff, approve, reset")
    sub = p.add_subparsers(dest="pins_command", required=True)

    def common(q: argparse.ArgumentParser) -> None:
        q.add_argument("server", help="server name from the config")
        q.add_argument("-c", "--config", required=True, help="gateway YAML file")

    q = sub.add_parser("fetch", help="write the lock file from the live server (first approval)")
    common(q)
    q.add_argument("--force", action="store_true", help="overwrite an existing lock file")
    q.add_argument("--accept-findings", action="store_true", help="approve tools with blocking findings too")
    q.set_defaults(func=cmd_fetch)
    q = sub.add_parser("diff", help="show what changed between the lock file and the live server")
    common(q)
    q.set_defaults(func=cmd_diff)
    q = sub.add_parser("approve", help="accept the live state (of the named tools, or all) into the lock file")
    common(q)
    q.add_argument("tools", nargs="*", help="only these tools (default: every tool)")
    q.add_argument("--accept-findings", action="store_true", help="approve tools with blocking findings too")
    q.set_defaults(func=cmd_approve)
    q = sub.add_parser("reset", help="forget the tofu pin in the store: the next state seen is pinned")
    common(q)
    q.set_defaults(func=cmd_reset)


# -- shared ---------------------------------------------------------------------

class CliError(Exception):
    pass


def _setup(args: argparse.Namespace) -> tuple[Any, Any, str]:
    from ..config.model import load_config

    try:
        config = load_config(args.config)
    except ConfigError as exc:
        raise CliError("\n".join(str(p) for p in exc.problems)) from exc
    virtual = config.virtual_servers.get(args.server)
    if virtual is not None:
        _to_origin(args, virtual)
    server = config.servers.get(args.server)
    if server is None:
        raise CliError(f"no server {args.server!r} in {args.config} (servers: {', '.join(sorted(config.servers))})")
    if server.pinning is None:
        raise CliError(f"server {args.server!r} has no pinning settings")
    pins_dir = config.pinning_dir or os.path.dirname(os.path.abspath(config.path))
    return config, server, lock_path(pins_dir, server.name, server.pinning.lock_file)


def _to_origin(args: argparse.Namespace, virtual: Any) -> None:
    """``pins approve <virtual> <published names>``: the same command on the names' one origin.

    Pins belong to origins (a virtual server re-enters its origins' pinning); any other
    command on a virtual name says which origins to run it on."""
    origins = ", ".join(i.server for i in virtual.includes)
    tools = getattr(args, "tools", None) or []
    if not tools:
        raise CliError(f"{virtual.name!r} is a virtual server; its pins are its origins' ({origins}): "
                       f"run this command on each, or approve published tool names on {virtual.name!r}")
    found = [virtual.resolve(name) for name in tools]
    missing = [name for name, f in zip(tools, found) if f is None]
    if missing:
        raise CliError(f"{virtual.name} does not publish {', '.join(missing)}")
    servers = {f[0].server for f in found if f is not None}
    if len(servers) != 1:
        raise CliError(f"{', '.join(tools)} come from several origins ({', '.join(sorted(servers))}): "
                       "approve them one origin at a time")
    args.server = servers.pop()
    args.tools = [f[1] for f in found if f is not None]
    print(f"{virtual.name}: {', '.join(tools)} -> {args.server}: {', '.join(args.tools)}")


async def _live(config: Any, server: Any) -> list[dict[str, Any]]:
    from ..auth.upstream_creds import make_credentials
    from ..pipeline import Principal

    timeout = aiohttp.ClientTimeout(total=None, sock_connect=server.connect_timeout, sock_read=60)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        provider = make_credentials(server, config)
        headers: dict[str, str] = {}
        if provider is not None:
            caller = SimpleNamespace(principal=Principal(issuer="", subject="mcp-gateway-pins", name="pins"),
                                     token=None, server=server, audit={})
            try:
                await provider.start(http)
                headers = dict(await provider.headers(caller))
            except Exception as exc:   # a credential kind that needs a live caller (token exchange)
                raise CliError(f"cannot obtain upstream credentials for {server.name!r}: {exc}") from exc
            finally:
                await provider.close()
        try:
            tools, _ = await fetch_tools(http, server.url, headers)
        except FetchError as exc:
            raise CliError(f"{server.name}: {exc}") from exc
    return tools


def _index(config: Any, server: Any, live: list[dict[str, Any]]) -> NameIndex:
    """Other servers' approved names (from their lock files) and this server's live names;
    every server's approved names, to tell a genuine tool from its look-alike."""
    names: dict[str, set[str]] = {server.name: {t.get("name", "") for t in live}}
    approved: dict[str, set[str]] = {}
    pins_dir = config.pinning_dir or os.path.dirname(os.path.abspath(config.path))
    for name, other in config.servers.items():
        if other.pinning is None:
            continue
        lock, _ = load_lock(lock_path(pins_dir, name, other.pinning.lock_file), name)
        if lock is None:
            continue
        approved[name] = set(lock.tools)
        if name != server.name:
            names[name] = set(lock.tools)
    return NameIndex.build(names, approved)


def _findings(config: Any, server: Any, live: list[dict[str, Any]]) -> dict[str, list[Finding]]:
    rules = server.pinning.rules
    index = _index(config, server, live)
    out: dict[str, list[Finding]] = {}
    for tool in live:
        scanned = rules.scan(tool)
        found = [*scanned.findings, *rules.scan_context(server.name, tool.get("name", ""), scanned, index)]
        found = [f for f in found if server.pinning.action(f.severity) != "ignore"]
        if found:
            out[tool.get("name", "")] = found
    return out


def _blocking(server: Any, findings: list[Finding]) -> list[Finding]:
    return [f for f in findings if server.pinning.action(f.severity) == "block"]


def _print_findings(server: Any, findings: dict[str, list[Finding]], names: set[str] | None = None,
                    file: Any = None) -> None:
    for tool in sorted(findings):
        if names is not None and tool not in names:
            continue
        for f in findings[tool]:
            action = server.pinning.action(f.severity)
            print(f"  ! {tool}: {f.rule} ({f.severity}, {action}) at {f.where}: {f.excerpt!r} - {f.message}",
                  file=file or sys.stdout)


def _run(coro: Any) -> int:
    try:
        return asyncio.run(coro)
    except CliError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


# -- commands ---------------------------------------------------------------------

def cmd_fetch(args: argparse.Namespace) -> int:
    return _run(_fetch(args))


async def _fetch(args: argparse.Namespace) -> int:
    config, server, path = _setup(args)
    if os.path.exists(path) and not args.force:
        print(f"{path} exists: review changes with `mcp-gateway pins diff {server.name}` and accept them with "
              f"`mcp-gateway pins approve {server.name}` (or pass --force)", file=sys.stderr)
        return 1
    live = await _live(config, server)
    return _write(args, config, server, path, live, None, set())


def _write(args: argparse.Namespace, config: Any, server: Any, path: str, live: list[dict[str, Any]],
           current: Approved | None, only: set[str]) -> int:
    findings = _findings(config, server, live)
    wanted = only or {t.get("name", "") for t in live}
    refused = sorted(n for n in wanted if _blocking(server, findings.get(n, [])))
    if refused and not args.accept_findings:
        print(f"refusing to approve {', '.join(refused)}: blocking poisoning findings (read them, then pass "
              f"--accept-findings to approve anyway):", file=sys.stderr)
        _print_findings(server, findings, set(refused), file=sys.stderr)
        return 1
    ignore = server.pinning.ignore_fields
    accepted = {n: frozenset(f.rule for f in _blocking(server, findings.get(n, []))) for n in wanted}
    fresh = Approved.from_definitions(server.name, "lock", [t for t in live if t.get("name") in wanted],
                                      ignore, accepted)
    tools: dict[str, PinnedTool] = dict(current.tools) if current is not None and only else {}
    for name in wanted:
        if name in fresh.tools:
            tools[name] = fresh.tools[name]
        else:
            tools.pop(name, None)   # approving a removal
    approved = Approved.build(server.name, "lock", tools, path)
    write_lock(path, approved)
    print(f"wrote {path}: {len(tools)} tool(s), tool set {approved.tool_set}")
    _print_findings(server, findings, wanted)
    return 0


def cmd_diff(args: argparse.Namespace) -> int:
    return _run(_diff(args))


async def _diff(args: argparse.Namespace) -> int:
    config, server, path = _setup(args)
    current, problems = load_lock(path, server.name, server.pinning.ignore_fields)
    if problems:
        raise CliError("\n".join(str(p) for p in problems))
    if current is None:
        raise CliError(f"no lock file at {path}: run `mcp-gateway pins fetch {server.name}` first")
    live = await _live(config, server)
    text, changed = render_diff(server.name, path, current, live, server.pinning.ignore_fields,
                                _findings(config, server, live), server.pinning.action)
    print(text, end="")
    return 1 if changed else 0


def cmd_approve(args: argparse.Namespace) -> int:
    return _run(_approve(args))


async def _approve(args: argparse.Namespace) -> int:
    config, server, path = _setup(args)
    current, problems = load_lock(path, server.name, server.pinning.ignore_fields)
    if problems and not args.tools:
        print(f"note: replacing an invalid lock file ({len(problems)} problem(s))", file=sys.stderr)
        current = None
    elif problems:
        raise CliError("\n".join(str(p) for p in problems))
    live = await _live(config, server)
    only = set(args.tools)
    if only:
        live_names = {t.get("name") for t in live}
        unknown = sorted(n for n in only if n not in live_names and (current is None or n not in current.tools))
        if unknown:
            raise CliError(f"{server.name} has no tool {', '.join(unknown)} (live or approved)")
    if current is not None:
        changes = _summary(current, live, server.pinning.ignore_fields, only)
        print(f"approving for {server.name}: {changes or 'nothing changed'}")
    return _write(args, config, server, path, live, current, only)


def _summary(current: Approved, live: list[dict[str, Any]], ignore: frozenset[str], only: set[str]) -> str:
    from .fingerprint import tool_print

    parts = []
    names = set()
    for tool in live:
        p = tool_print(tool, ignore)
        names.add(p.name)
        kinds, _ = classify(current, p)
        if kinds and (not only or p.name in only):
            parts.append(f"{p.name} ({', '.join(kinds)})")
    for name in removed(current, names):
        if not only or name in only:
            parts.append(f"{name} (tool_removed)")
    return ", ".join(parts)


def cmd_reset(args: argparse.Namespace) -> int:
    return _run(_reset(args))


async def _reset(args: argparse.Namespace) -> int:
    from ..store.redis import make_store
    from .pin_state import tofu_key

    config, server, _ = _setup(args)
    if config.store.kind == "memory":
        print("the store is 'memory': tofu pins live in the gateway process; restart it to forget them",
              file=sys.stderr)
        return 1
    store = make_store(config.store)
    await store.start()
    try:
        existed = await store.delete(tofu_key(server.name))
        await store.publish("pinning", f"reset:{server.name}".encode())
    finally:
        await store.close()
    print(f"{server.name}: tofu pin {'forgotten' if existed else 'was not set'}; the next tool set seen is pinned")
    return 0


# -- mcp-gateway check ------------------------------------------------------------------

def check_pins(config: Any) -> list[Problem]:
    """Lock files parse and verify; ``enforce`` servers have one."""
    problems: list[Problem] = []
    pins_dir = config.pinning_dir or os.path.dirname(os.path.abspath(config.path))
    for name, server in config.servers.items():
        cfg = server.pinning
        if cfg is None or not cfg.enabled:
            continue
        path = lock_path(pins_dir, name, cfg.lock_file)
        approved, found = load_lock(path, name, cfg.ignore_fields)
        problems.extend(found)
        if approved is None and not found and cfg.mode == "enforce":
            problems.append(Problem(cfg.loc or server.loc, f"servers.{name}.pinning: mode enforce needs a lock file "
                                                           f"at {path}; run `mcp-gateway pins fetch {name}`"))
    return problems


def main(argv: list[str] | None = None) -> int:
    """``python -m gateway.inspect.pins_cli pins ...`` (the same as ``mcp-gateway pins ...``)."""
    parser = argparse.ArgumentParser(prog="mcp-gateway")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
