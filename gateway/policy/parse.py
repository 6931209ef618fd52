"""Policy YAML -> frozen rules, collecting every problem with ``file:line:col``.

One file looks like::

    servers:
      files:
        default: deny                 # tools/resources/prompts no rule matches
        destructive: {scopes: [files:admin]}
        tools:
          - id: files-read
            match: [read_file, "list_*"]
            scopes: [files:read]
"""
from __future__ import annotations

import re
from functools import lru_cache
from typing import Any, Iterable

import orjson

from jsonschema import exceptions as js_exc
from jsonschema.validators import Draft202012Validator, validator_for

from ..config.reader import Reader, type_name
from ..config.yamlloc import LDict, LList, Loc
from ..errors import Problem
from .fastschema import compile_check
from .glob import GlobError, compile_glob
from .model import (ALLOW, DENY, KINDS, PROMPTS, TOOLS, WILDCARD, ClaimCond, Destructive, Rule,
                    ScopeReq, plain)

RULE_ID = r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}"
# RFC 6749 §3.3 scope-token: printable ASCII except space, '"' and '\'.
SCOPE_TOKEN = re.compile(r"[\x21\x23-\x5b\x5d-\x7e]+")
CLAIM_OPS = ("equals", "in", "not_in", "contains", "not_contains", "contains_any", "present")
_LIST_OPS = ("in", "not_in", "contains_any")
_SCALAR = (str, int, float, bool)


class ServerDraft:
    """A server's policy while files are being read (turned into ``ServerPolicy`` by ``build``)."""

    __slots__ = ("name", "loc", "default", "destructive", "rules", "limits")

    def __init__(self, name: str, loc: Loc) -> None:
        self.name = name
        self.loc = loc
        self.default = DENY
        self.destructive = Destructive("deny", (), None)
        self.rules: dict[str, list[Rule]] = {k: [] for k in KINDS}
        self.limits: tuple = ()


class Counter:
    __slots__ = ("n",)

    def __init__(self) -> None:
        self.n = 0

    def next(self) -> int:
        self.n += 1
        return self.n


def parse_file(node: Any, path: str, problems: list[Problem], drafts: dict[str, ServerDraft],
               known_servers: Iterable[str] | None, order: Counter) -> None:
    """Add the servers of one policy file to ``drafts``."""
    r = Reader(node, problems, "", Loc(path, 1, 1))
    if node is None:
        return  # an empty file is allowed (e.g. everything commented out)
    version = r.int("version", 1)
    if version != 1 and r.has("version"):
        r.error("version", "version must be 1 (the only policy language version)")
    r.str("description")
    servers = r.mapping("servers", required=True)
    known = set(known_servers) if known_servers is not None else None
    for name in list(servers.node):
        servers.seen.add(name)
        loc = servers.at(name)
        if not isinstance(name, str):
            servers.error(name, f"server name must be a string, not {type_name(name)}")
            continue
        if known is not None and name not in known and name != WILDCARD:
            hint = ", ".join(sorted(known)) or "none"
            servers.error(name, f"unknown server {name!r}: the config defines {hint}")
            _server(Reader(servers.node[name], problems, f"servers.{name}", loc), name, order)  # its problems too
            continue
        if name in drafts:
            servers.error(name, f"server {name!r} already has a policy at {drafts[name].loc}; "
                                "keep one server's rules in one file so their order is clear")
            continue
        drafts[name] = _server(Reader(servers.node[name], problems, f"servers.{name}", loc), name, order)
    r.done()


def _server(s: Reader, name: str, order: Counter) -> ServerDraft:
    draft = ServerDraft(name, s.loc)
    s.str("description")
    draft.default = s.str("default", DENY, choices=(ALLOW, DENY)) or DENY
    if s.has("destructive"):
        draft.destructive = _destructive(s, "destructive") or draft.destructive
    else:
        s.seen.add("destructive")
    for kind in KINDS:
        items = s.list(kind)
        for i, item in enumerate(items):
            rule = _rule(Reader(item, s.problems, f"{s.path}.{kind}[{i}]", items.at(i)),
                         name, kind, order.next())
            if rule is not None:
                draft.rules[kind].append(rule)
    from ..ratelimit.model import parse_limits     # rate and concurrency limits (gateway/ratelimit)
    draft.limits = parse_limits(s, name)
    s.done()
    return draft


def _rule(r: Reader, server: str, kind: str, order: int) -> Rule | None:
    if not r.ok:
        return None
    before = len(r.problems)
    rid = r.str("id", required=True, pattern=RULE_ID)
    effect = r.str("effect", ALLOW, choices=(ALLOW, DENY)) or ALLOW
    description = r.str("description", "") or ""
    globs = _globs(r, "match", kind)
    scopes = _scopes(r, "scopes")
    claims = _claims(r.mapping("claims"))
    schema, validator = (None, None)
    if kind in (TOOLS, PROMPTS):
        schema, validator = _arguments(r, "arguments")
    elif r.has("arguments"):
        r.raw("arguments")
        r.error("arguments", f"arguments constraints apply to tools and prompts, not {kind}")
    # The fast check answers yes/no for the common subset; jsonschema otherwise (and for messages).
    check = (compile_check(schema) or validator.is_valid) if validator is not None else None
    destructive = None
    if kind == TOOLS:
        r.seen.add("destructive")
    if r.has("destructive"):
        if kind != TOOLS:
            r.raw("destructive")
            r.error("destructive", "destructive applies to tools only")
        else:
            destructive = _destructive(r, "destructive")
    if r.has("rate_limit"):
        r.raw("rate_limit")
        r.error("rate_limit", "rate limits are not written on a rule: add an entry to the server's "
                              "`limits:` list (see docs/policy.md, Rate and concurrency limits)")
    if effect == DENY:
        if scopes.all_of or scopes.any_of:
            r.error("scopes", "a deny rule cannot require scopes: it applies by name, claims and "
                              "arguments; write an allow rule for what a scope grants")
        if destructive is not None:
            r.error("destructive", "destructive applies to allow rules only")
    r.done()
    if len(r.problems) > before or rid is None or not globs:
        return None
    return Rule(id=rid, server=server, kind=kind, effect=effect, match=globs, loc=r.loc, order=order,
                scopes=scopes, claims=claims, schema=schema, validator=validator, check=check,
                destructive=destructive, description=description)


def _globs(r: Reader, key: str, kind: str) -> tuple:
    r.seen.add(key)
    if not r.has(key):
        r.error(None, f"{r.path}.{key} is required (a name, a glob, or a list of them)")
        return ()
    value = r.node[key]
    items, locs = ([value], [r.at(key)]) if isinstance(value, str) else (value, None)
    if not isinstance(items, list) or not items:
        r.error(key, f"{r.path}.{key} must be a glob or a non-empty list of globs")
        return ()
    out = []
    for i, text in enumerate(items):
        loc = locs[i] if locs else items.at(i)
        if not isinstance(text, str):
            r.problems.append(Problem(loc, f"{r.path}.{key}[{i}] must be a string, not {type_name(text)}"))
            continue
        try:
            out.append(compile_glob(text))
        except GlobError as exc:
            r.problems.append(Problem(loc, f"invalid glob {text!r}: {exc}"))
    return tuple(out)


def _scope_list(r: Reader, key: str, value: Any, loc: Loc) -> tuple[str, ...]:
    if isinstance(value, str):
        value_list, locs = value.split(), None   # "a b" as in an OAuth scope string
    elif isinstance(value, LList):
        value_list, locs = value, value
    else:
        r.problems.append(Problem(loc, f"{key} must be a list of scopes, not {type_name(value)}"))
        return ()
    out: list[str] = []
    for i, scope in enumerate(value_list):
        where = locs.at(i) if locs is not None else loc
        if not isinstance(scope, str) or not SCOPE_TOKEN.fullmatch(scope):
            r.problems.append(Problem(where, f"{key}[{i}] {scope!r} is not a valid OAuth scope token"))
        elif scope not in out:
            out.append(scope)
    return tuple(out)


def _scopes(r: Reader, key: str) -> ScopeReq:
    r.seen.add(key)
    if not r.has(key):
        return ScopeReq()
    value = r.node[key]
    if isinstance(value, LDict):
        sub = Reader(value, r.problems, f"{r.path}.{key}")
        all_of = _scope_list(sub, "all_of", sub.raw("all_of", LList(sub.loc)), sub.at("all_of"))
        any_of = _scope_list(sub, "any_of", sub.raw("any_of", LList(sub.loc)), sub.at("any_of"))
        sub.done()
        if sub.has("any_of") and not any_of:
            sub.error("any_of", "any_of must name at least one scope")
        return ScopeReq(all_of, any_of)
    return ScopeReq(_scope_list(r, f"{r.path}.{key}", value, r.at(key)))


def _claims(c: Reader) -> tuple[ClaimCond, ...]:
    out: list[ClaimCond] = []
    for claim in list(c.node):
        c.seen.add(claim)
        loc = c.at(claim)
        if not isinstance(claim, str) or not claim:
            c.error(claim, "a claim name must be a non-empty string")
            continue
        ops = Reader(c.node[claim], c.problems, f"{c.path}.{claim}", loc)
        if ops.ok and not ops.node:
            ops.error(None, f"{ops.path} needs a test: one of {', '.join(CLAIM_OPS)}")
        for op in CLAIM_OPS:
            if not ops.has(op):
                ops.seen.add(op)
                continue
            value = ops.raw(op)
            where = ops.at(op)
            if op == "present":
                if not isinstance(value, bool):
                    ops.error(op, f"{ops.path}.present must be true or false")
                    continue
            elif op in _LIST_OPS:
                if not isinstance(value, list) or not value or not all(isinstance(v, _SCALAR) for v in value):
                    ops.error(op, f"{ops.path}.{op} must be a non-empty list of strings or numbers")
                    continue
                value = tuple(value)
            elif not isinstance(value, _SCALAR):
                ops.error(op, f"{ops.path}.{op} must be a string, number or boolean, not {type_name(value)}")
                continue
            out.append(ClaimCond(claim, op, value, where))
        ops.done()
    return tuple(out)


def _destructive(r: Reader, key: str) -> Destructive | None:
    r.seen.add(key)
    value = r.node[key]
    loc = r.at(key)
    if value in (ALLOW, DENY):
        return Destructive(value, (), loc)
    if isinstance(value, LDict):
        sub = Reader(value, r.problems, f"{r.path}.{key}")
        scopes = _scope_list(sub, f"{sub.path}.scopes", sub.raw("scopes", LList(sub.loc)), sub.at("scopes"))
        if not sub.has("scopes"):
            sub.error(None, f"{sub.path}.scopes is required")
        elif not scopes:
            sub.error("scopes", f"{sub.path}.scopes must name at least one scope (or write "
                                f"'{key}: allow')")
        sub.done()
        return Destructive("scopes", scopes, loc) if scopes else None
    r.error(key, f"{r.path}.{key} must be allow, deny, or {{scopes: [...]}}")
    return None


def _arguments(r: Reader, key: str) -> tuple[Any, Any]:
    r.seen.add(key)
    if not r.has(key):
        return None, None
    node = r.node[key]
    if not isinstance(node, (LDict, bool)):
        r.error(key, f"{r.path}.{key} must be a JSON Schema (a mapping), not {type_name(node)}")
        return None, None
    schema = plain(node)
    for parent, k, _ in _walk(node):
        if not isinstance(k, str):
            r.problems.append(Problem(parent.at(k), f"JSON Schema keys are strings: quote {k!r}"))
            return None, None
    for where, ref in _refs(node):
        if not ref.startswith("#"):
            r.problems.append(Problem(where, f"$ref {ref!r}: only local references ('#/...') are "
                                             "allowed; the gateway never fetches schemas"))
            return None, None
    cls = validator_for(schema, default=Draft202012Validator) if isinstance(schema, dict) else Draft202012Validator
    try:
        error = _schema_error(cls, orjson.dumps(schema, option=orjson.OPT_SORT_KEYS))
    except TypeError:   # not JSON (e.g. a YAML date): let jsonschema say what is wrong
        error = _schema_error.__wrapped__(cls, None, schema)
    if error is not None:
        path, message = error
        r.problems.append(Problem(_loc_in(node, path) or r.at(key), f"invalid JSON Schema: {message}"))
        return None, None
    validator = cls(schema, format_checker=cls.FORMAT_CHECKER)
    try:  # compile every pattern now so a bad regex is a load error, not a request-time one
        for where, pattern in _patterns(node):
            re.compile(pattern)
    except re.error as exc:
        r.problems.append(Problem(where, f"invalid JSON Schema: pattern {pattern!r}: {exc}"))
        return None, None
    return schema, validator


@lru_cache(maxsize=1024)
def _schema_error(cls: Any, canonical: bytes | None, schema: Any = None) -> tuple[tuple[Any, ...], str] | None:
    """Metaschema check (~10 ms each), memoised: a reload re-checks only schemas that changed."""
    try:
        cls.check_schema(orjson.loads(canonical) if canonical is not None else schema)
    except js_exc.SchemaError as exc:
        return tuple(exc.absolute_path), exc.message
    return None


def _walk(node: Any):
    if isinstance(node, LDict):
        for k, v in node.items():
            yield node, k, v
            yield from _walk(v)
    elif isinstance(node, LList):
        for v in node:
            yield from _walk(v)


def _refs(node: Any):
    for parent, k, v in _walk(node):
        if k in ("$ref", "$dynamicRef") and isinstance(v, str):
            yield parent.at(k), v


def _patterns(node: Any):
    for parent, k, v in _walk(node):
        if k == "pattern" and isinstance(v, str):
            yield parent.at(k), v
        elif k == "patternProperties" and isinstance(v, LDict):
            for pk in v:
                if isinstance(pk, str):
                    yield v.at(pk), pk


def _loc_in(node: Any, path: Iterable[Any]) -> Loc | None:
    loc = getattr(node, "loc", None)
    for part in path:
        if isinstance(node, LDict) and part in node:
            loc, node = node.at(part), node[part]
        elif isinstance(node, LList) and isinstance(part, int) and part < len(node):
            loc, node = node.at(part), node[part]
        else:
            break
    return loc
