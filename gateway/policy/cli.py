"""``mcp-gateway policy test|explain`` and the policy part of ``mcp-gateway check``."""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from ..config.yamlloc import Loc
from ..errors import ConfigError, Problem
from ..pipeline import ANONYMOUS, Principal
from .decide import ANY, UNKNOWN
from .explain import explain
from .lint import lint
from .load import load_policies
from .model import METHODS, PROMPTS, RESOURCES, TOOLS, PolicySet
from .testing import DEFAULT_ISSUER, run_tests


def issuer_scopes(config: Any) -> set[str] | None:
    """Every scope the configured issuers list, or None if any issuer does not say."""
    issuers = getattr(getattr(config, "auth", None), "issuers", ()) or ()
    if not issuers:
        return None
    scopes: set[str] = set()
    for issuer in issuers:
        listed = getattr(issuer, "scopes", None) or getattr(issuer, "scopes_supported", None)
        if not listed:
            return None
        scopes.update(listed)
    return scopes


def known_tools(config: Any) -> dict[str, list[dict[str, Any]]]:
    """Tool definitions approved in pin lock files (``<pins>/<server>.lock.yaml``), where present."""
    try:
        from ..inspect.lockfile import load_lock, lock_path
    except ImportError:
        return {}
    pins_dir = config.pinning_dir or os.path.dirname(os.path.abspath(config.path))
    out: dict[str, list[dict[str, Any]]] = {}
    for name, server in config.servers.items():
        configured = getattr(server.pinning, "lock_file", None)
        try:
            approved, _problems = load_lock(lock_path(pins_dir, name, configured), name)
        except Exception:   # a broken lock file is reported by check_pins, not here
            continue
        if approved is not None:
            out[name] = [t.definition for t in approved.tools.values()]
    return out


def check_policies(config: Any) -> list[Problem]:
    """Every policy problem for ``mcp-gateway check``: parse errors, then lint findings."""
    if config.policies_path is None:
        return []   # valid (everything is refused); ``mcp-gateway check`` warns about it
    policies, problems = load_policies(config.policies_path, [*config.servers, *config.virtual_servers])
    if policies is None:
        return problems
    published = {name: s.auth.scopes_supported for name, s in config.servers.items()
                 if getattr(s.auth, "scopes_supported", None) is not None}
    return lint(policies, issuer_scopes=issuer_scopes(config), server_scopes=published,
                known_tools=known_tools(config), servers=config.servers)


def _load(args: argparse.Namespace) -> tuple[PolicySet | None, Any, list[Problem]]:
    config = None
    root = args.policies
    if args.config:
        from ..config.model import load_config

        try:
            config = load_config(args.config, check_secrets=False)
        except ConfigError as exc:
            return None, None, exc.problems
        root = root or config.policies_path
        if root is None:
            return None, config, [Problem(Loc(args.config, 1, 1), "the config has no 'policies:' key")]
    if root is None:
        root = "policies" if os.path.isdir("policies") else None
    if root is None:
        return None, None, [Problem(Loc("<args>", 1, 1), "give -c CONFIG or --policies DIR")]
    args.policies = root
    known = [*config.servers, *config.virtual_servers] if config is not None else None
    policies, problems = load_policies(root, known)
    return policies, config, problems


def _fail(problems: list[Problem], code: int = 2) -> int:
    for p in problems:
        print(p, file=sys.stderr)
    print(f"{len(problems)} problem(s) in the policies", file=sys.stderr)
    return code


def cmd_test(args: argparse.Namespace) -> int:
    policies, config, problems = _load(args)
    if policies is None:
        return _fail(problems)
    paths = args.paths or [os.path.join(args.policies if os.path.isdir(args.policies)
                                        else os.path.dirname(args.policies), "tests")]
    report = run_tests(policies, paths, set(config.servers) | set(config.virtual_servers) | {"*"}
                       if config is not None else None)
    for o in report.outcomes:
        if not o.ok:
            print(f"FAIL {o.case.loc.file}:{o.case.loc.line}: {o.case.name}")
            for f in o.failures:
                print(f"     {f}")
        elif args.verbose:
            print(f"ok   {o.case.loc.file}:{o.case.loc.line}: {o.case.name} -> {o.got}")
    for p in report.problems:
        print(p, file=sys.stderr)
    failed = len(report.failed)
    print(f"{len(report.outcomes) - failed} passed, {failed} failed"
          + (f", {len(report.problems)} problem(s) in test files" if report.problems else "")
          + ("" if report.outcomes else " (no test cases found)"))
    return 0 if report.ok else 1


def _json_arg(text: str | None, what: str) -> Any:
    if text is None:
        return None
    try:
        return json.loads(text)
    except ValueError as exc:
        raise SystemExit(f"--{what}: not valid JSON: {exc}") from exc


def cmd_explain(args: argparse.Namespace) -> int:
    policies, _config, problems = _load(args)
    if policies is None:
        return _fail(problems)
    kind, name = next(((k, v) for k, v in ((TOOLS, args.tool), (RESOURCES, args.resource),
                                            (PROMPTS, args.prompt), (METHODS, args.method)) if v), (None, None))
    if kind is None:
        raise SystemExit("give one of --tool, --resource, --prompt or --method")
    claims = _json_arg(args.claims, "claims") or {}
    for item in args.claim or ():
        key, _, value = item.partition("=")
        claims[key] = _json_arg(value, "claim") if value[:1] in "[{\"" else value
    if args.anonymous:
        principal = ANONYMOUS
    else:
        principal = Principal(issuer=args.issuer, subject=args.subject, client_id=args.client_id or "",
                              scopes=frozenset((args.scopes or "").split()), claims=claims, name=args.subject)
    arguments = ANY if args.arguments is None else _json_arg(args.arguments, "arguments")
    annotations = _json_arg(args.annotations, "annotations") if args.annotations else UNKNOWN
    virtual = _config.virtual_servers.get(args.server) if _config is not None else None
    if virtual is not None:
        return _explain_virtual(policies, virtual, kind, name, principal, arguments, annotations)
    decision, lines = explain(policies, args.server, kind, name, principal, arguments, annotations)
    print("\n".join(lines))
    return 0 if decision.allowed else 1


def _explain_virtual(policies: PolicySet, virtual: Any, kind: str, name: str, principal: Any, arguments: Any,
                     annotations: Any) -> int:
    """A call through a virtual server: the origin's decision on the original name, then the
    virtual server's own section (when there is one) on the published name; deny wins."""
    if kind not in (TOOLS, PROMPTS):
        print(f"virtual:   {virtual.name!r} routes {kind} by the origin that listed them; "
              "explain the call on that origin")
        return 1
    found = virtual.resolve(name, prompt=kind == PROMPTS)
    if found is None:
        print(f"virtual:   {virtual.name!r} does not publish {kind} {name!r}: refused as unknown")
        return 1
    inc, original = found
    print(f"virtual:   {virtual.name!r} publishes {name!r} as {original!r} of {inc.server!r}")
    decision, lines = explain(policies, inc.server, kind, original, principal, arguments, annotations)
    print("\n".join(lines))
    allowed = decision.allowed
    if virtual.name in policies.servers:
        print(f"-- then the section of virtual server {virtual.name!r} (deny wins):")
        own, lines = explain(policies, virtual.name, kind, name, principal, arguments, annotations)
        print("\n".join(lines))
        allowed = allowed and own.allowed
    else:
        print(f"-- no section for virtual server {virtual.name!r}: the origin's decision stands")
    print(f"through {virtual.name}: {'allow' if allowed else 'deny'}")
    return 0 if allowed else 1


def register(subparsers: Any) -> None:
    """Add ``policy test`` and ``policy explain`` to the ``mcp-gateway`` command."""
    policy = subparsers.add_parser("policy", help="test and explain authorization policies")
    sub = policy.add_subparsers(dest="policy_command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("-c", "--config", help="gateway YAML file (its 'policies:' and servers are used)")
        p.add_argument("--policies", help="policy directory or file (default: from -c, else ./policies)")

    p = sub.add_parser("test", help="run YAML policy test cases; non-zero exit on failure")
    common(p)
    p.add_argument("paths", nargs="*", metavar="PATH", help="test files or directories "
                                                          "(default: <policies>/tests)")
    p.add_argument("-v", "--verbose", action="store_true", help="list passing cases too")
    p.set_defaults(func=cmd_test)

    p = sub.add_parser("explain", help="show every rule considered for one hypothetical call")
    common(p)
    p.add_argument("--server", required=True)
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--tool")
    target.add_argument("--resource", metavar="URI")
    target.add_argument("--prompt")
    target.add_argument("--method")
    p.add_argument("--scopes", default="", help='granted scopes, space-separated: "files:read files:write"')
    p.add_argument("--claim", action="append", metavar="NAME=VALUE",
                   help='a claim (repeatable); JSON values allowed: groups=\'["sre"]\'')
    p.add_argument("--claims", metavar="JSON", help="all claims as one JSON object")
    p.add_argument("--client-id", default="")
    p.add_argument("--subject", default="explain-user")
    p.add_argument("--issuer", default=DEFAULT_ISSUER)
    p.add_argument("--anonymous", action="store_true", help="no token (auth mode none)")
    p.add_argument("--arguments", "--args", metavar="JSON", help="call arguments (omit: as for list filtering)")
    p.add_argument("--annotations", metavar="JSON", help='tool annotations, e.g. \'{"readOnlyHint": true}\' '
                                                        "(omit: unknown, treated as destructive)")
    p.set_defaults(func=cmd_explain)
