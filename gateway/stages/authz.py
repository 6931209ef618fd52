"""Authorization: the policy decision for every call, the same decision for every list.

Runs after parse (it decides on the checked JSON-RPC body) and authn (it
needs the principal).  ``on_request`` fires once per client message:

- calls (``tools/call``, ``resources/read``, ``resources/(un)subscribe``,
  ``prompts/get``) and other methods are decided here; a refusal for missing
  scopes is ``InsufficientScope`` (403 step-up naming every scope the call
  needs), any other refusal is ``PolicyDenied`` worded exactly like an
  unknown tool/resource/prompt, so a refusal never reveals existence.
  Arguments are checked here, before anything reaches the upstream.
- lists (``tools/list``, ``resources/list``, ``resources/templates/list``,
  ``prompts/list``) go upstream and a response hook removes, from every
  result message (JSON or each SSE event, every page), what this caller may
  not use, deciding with the same function and the same policy set.

The policy set is read once per request from the holder; the call decision
and the list hook both use that snapshot, so a reload never changes the
rules under a request in flight.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Awaitable, Callable, NoReturn

import structlog

from ..errors import GatewayError, InsufficientScope, PolicyDenied
from ..inspect.catalog import ToolCatalog
from ..policy.decide import ALLOWED, ANY, STEP_UP, UNKNOWN, Decision, decide, decide_template
from ..policy.load import load_policies_strict
from ..policy.metrics import DECISIONS_TALLY, POLICY_HIDDEN, TOOL_CALLS_TALLY
from ..policy.model import EMPTY, METHODS, PROMPTS, RESOURCES, TOOLS, PolicySet
from ..policy.reload import PolicyHolder, PolicyWatcher
from ..telemetry.metrics import BOUND
from ..telemetry.redact import scrub_text

if TYPE_CHECKING:
    from ..config.model import Config
    from ..pipeline import Exchange

log = structlog.get_logger("gateway.policy")

# Protocol plumbing that grants nothing by itself; every other method is decided.
ALWAYS_ALLOWED = frozenset({"initialize", "ping", "server/discover"})
# method -> (kind, params field naming the target)
TARGETED = {
    "tools/call": (TOOLS, "name"),
    "resources/read": (RESOURCES, "uri"),
    "resources/subscribe": (RESOURCES, "uri"),
    "resources/unsubscribe": (RESOURCES, "uri"),
    "prompts/get": (PROMPTS, "name"),
}
# method -> (result field holding the items, item field naming each, kind)
LISTS = {
    "tools/list": ("tools", "name", TOOLS),
    "resources/list": ("resources", "uri", RESOURCES),
    "resources/templates/list": ("resourceTemplates", "uriTemplate", RESOURCES),
    "prompts/list": ("prompts", "name", PROMPTS),
}
_DECISIONS = DECISIONS_TALLY.pending
_TOOL_CALLS = TOOL_CALLS_TALLY.pending
# What the caller is told: the same words an MCP server uses for a name it does not know.
_UNKNOWN = {TOOLS: "Unknown tool: {}", RESOURCES: "Resource not found: {}", PROMPTS: "Unknown prompt: {}",
            METHODS: "Method not found: {}"}


def target(method: str, message: dict[str, Any] | None) -> tuple[str, str, Any]:
    """(kind, name, arguments) for a method that is decided per call."""
    params = message.get("params") if isinstance(message, dict) else None
    params = params if isinstance(params, dict) else {}
    if method in TARGETED:
        kind, field = TARGETED[method]
        name = params.get(field)
        return kind, name if isinstance(name, str) else "", params.get("arguments")
    return METHODS, method, None


class Authz:
    """The authz stage; ``policies`` is the holder every request reads its snapshot from."""

    name = "authz"

    def __init__(self, policies: PolicyHolder, catalog: ToolCatalog | None = None,
                 watcher: PolicyWatcher | None = None,
                 refresh: Callable[["Exchange"], Awaitable[None]] | None = None) -> None:
        """``refresh(ex)``, when given, fills ``catalog`` with the server's live tools (e.g. a
        side ``tools/list``); it is awaited only for a tool the catalog does not know *and*
        whose annotations would change the decision (a replica that has not relayed a list yet)."""
        self.policies = policies
        self.catalog = catalog if catalog is not None else ToolCatalog()
        self.watcher = watcher
        self.refresh = refresh
        # pinned(server): the names of the server's approved (pinned) tools, or None; set by
        # the app when pinning is on, so the tool label knows them before any listing.
        self.pinned: Callable[[str], Any] | None = None
        self._records: dict[tuple[int, int, str], tuple[Any, ...]] = {}

    async def start(self) -> None:
        if self.watcher is not None:
            await self.watcher.start(sighup=False)   # app.py routes SIGHUP to reload()

    async def close(self) -> None:
        if self.watcher is not None:
            await self.watcher.close()

    def reload(self) -> None:
        """SIGHUP: rebuild the policy set now, even if no file looks changed."""
        if self.watcher is not None:
            self.watcher.request_reload()

    async def on_request(self, ex: "Exchange") -> None:
        """Fires after parse, before the upstream is contacted; ``ex.principal`` and ``ex.message`` are set."""
        pending = self.check(ex)
        if pending is not None:
            await pending

    def check(self, ex: "Exchange") -> Awaitable[None] | None:
        """``on_request`` without a coroutine unless the catalog must be refreshed first (pipeline.py)."""
        method = ex.method
        if method is None or method in ALWAYS_ALLOWED or method[:14] == "notifications/":
            return None   # responses to server requests, notifications, handshake
        policies = self.policies.current
        listing = LISTS.get(method)
        if listing is not None:
            ex.response_hooks.append(ListFilter(policies, self.catalog, *listing))
            ex.audit_safe = {"decision": "filter", "policy": policies.digest[:12]}
            return None
        if method == "tools/call" and ex.name is not None:
            kind, name, arguments = TOOLS, ex.name, ex.arguments    # what target() reads; parse checked it
        else:
            kind, name, arguments = target(method, ex.message)
        annotations = UNKNOWN
        if kind == TOOLS:
            tool = self.catalog.get(ex.server.name, name)
            if tool is None and self.refresh is not None and _annotations_matter(policies, ex, name, arguments):
                return self._refresh_then_decide(ex, policies, name, arguments)
            annotations = (tool.get("annotations") or {}) if tool is not None else UNKNOWN
        self._decide(ex, policies, kind, name, arguments, annotations)
        if method == "completion/complete":
            self._decide_ref(ex, policies)
        return None

    def _decide_ref(self, ex: "Exchange", policies: PolicySet) -> None:
        """``completion/complete`` completes arguments of a prompt or resource template: the
        caller must be allowed that prompt or resource too, or the completions would reveal it.
        A refused ref is answered exactly like an unknown one."""
        params = ex.message.get("params") if isinstance(ex.message, dict) else None
        ref = params.get("ref") if isinstance(params, dict) else None
        kind = ref.get("type") if isinstance(ref, dict) else None
        if kind == "ref/prompt" and isinstance(ref.get("name"), str):
            d = decide(policies, ex.server.name, PROMPTS, ref["name"], ex.principal, ANY, UNKNOWN)
            if not d.allowed:
                raise PolicyDenied(_UNKNOWN[PROMPTS].format(ref["name"]))
        elif kind == "ref/resource" and isinstance(ref.get("uri"), str):
            uri = ref["uri"]
            d = (decide_template(policies, ex.server.name, uri, ex.principal) if "{" in uri
                 else decide(policies, ex.server.name, RESOURCES, uri, ex.principal, ANY, UNKNOWN))
            if not d.allowed:
                raise PolicyDenied(_UNKNOWN[RESOURCES].format(uri))
        else:
            raise PolicyDenied("Invalid params: completion/complete needs a ref/prompt or ref/resource",
                               reason="invalid_params")

    async def _refresh_then_decide(self, ex: "Exchange", policies: PolicySet, name: str, arguments: Any) -> None:
        assert self.refresh is not None
        try:
            await self.refresh(ex)
        except GatewayError:
            log.warning("policy.catalog_refresh_failed", server=ex.server.name)   # stays unknown
        tool = self.catalog.get(ex.server.name, name)
        annotations = (tool.get("annotations") or {}) if tool is not None else UNKNOWN
        self._decide(ex, policies, TOOLS, name, arguments, annotations)

    def _decide(self, ex: "Exchange", policies: PolicySet, kind: str, name: str, arguments: Any,
                annotations: Any) -> None:
        d = decide(policies, ex.server.name, kind, name, ex.principal, arguments, annotations)
        self._record(ex, d, policies)
        if d.effect != ALLOWED:
            refuse(d, kind, name, ex.principal)

    def count_call(self, ex: "Exchange") -> None:
        """When an exchange ends: count a decided tools/call per tool.  At the end, not at the
        decision, so a tool pinning fetched for this very call is already in the catalog.
        A label per tool the server listed or its pins approve (a lock file is read at start,
        so a replica that has not listed yet labels pinned tools by name too), 'other' for
        the rest: a client cycling through names cannot grow the series."""
        safe = ex.audit_safe
        if safe is None or ex.method != "tools/call":
            return
        server, name = ex.server.name, ex.name or ""
        known = name in self.catalog.server(server).tools
        if not known and self.pinned is not None:
            pinned = self.pinned(server)
            known = pinned is not None and name in pinned
        label = scrub_text(name) if known else "other"
        key = (server, label, safe["decision"])
        _TOOL_CALLS[key] = _TOOL_CALLS.get(key, 0) + 1

    def _record(self, ex: "Exchange", d: Decision, policies: PolicySet) -> None:
        # Closed sets only (effects, reasons, and rule ids and scopes from the policy
        # files): the audit writes them without redaction.  decide() shares the Decision
        # of a rule that allows or denies, so the read-only audit fields and the metric
        # key are built once per (decision, policy set, server).
        server = ex.server.name
        memo = self._records.get((id(d), id(policies), server))
        if memo is None or memo[0] is not d or memo[1] is not policies:
            safe = {"decision": d.effect, "decision_reason": d.reason, "rules": d.rules,
                    "policy": policies.digest[:12]}
            if d.scopes:
                safe["required_scopes"] = d.scopes
            if len(self._records) >= 1024:
                self._records.clear()
            # Holding d and policies keeps their ids from being reused while the entry lives.
            # A plain dict (the audit's dict.update is twice as fast on one as on a
            # MappingProxyType); it is shared, so nothing may modify ex.audit_safe.
            memo = self._records[(id(d), id(policies), server)] = (
                d, policies, safe, (server, d.effect, d.reason))
        ex.audit_safe = memo[2]
        key = memo[3]
        _DECISIONS[key] = _DECISIONS.get(key, 0) + 1


def refuse(d: Decision, kind: str, name: str, principal: Any) -> NoReturn:
    """Raise the answer to a decision that did not allow ``name`` (a mount's or a virtual
    server's): step-up, invalid arguments, or the same "unknown" a missing name gets."""
    # Without an issuer (auth mode none) no token can ever carry more scopes: no step-up.
    if d.effect == STEP_UP and principal.issuer:
        raise InsufficientScope(f"this call needs the scope(s): {' '.join(d.scopes)}", scopes=d.scopes)
    if d.reason == "arguments_invalid":
        raise PolicyDenied(f"Invalid arguments for {name}: {d.detail}")
    raise PolicyDenied(_UNKNOWN[kind].format(name))


def _annotations_matter(policies: PolicySet, ex: "Exchange", name: str, arguments: Any) -> bool:
    """Would this call be decided differently if the tool were known to be read-only?"""
    unknown = decide(policies, ex.server.name, TOOLS, name, ex.principal, arguments, UNKNOWN)
    safe = decide(policies, ex.server.name, TOOLS, name, ex.principal, arguments, _READ_ONLY)
    return (unknown.effect, unknown.scopes) != (safe.effect, safe.scopes)


_READ_ONLY = {"readOnlyHint": True}


class ListFilter:
    """Response hook: keeps the list items this caller may use (see module docstring)."""

    __slots__ = ("policies", "catalog", "field", "key", "kind")

    def __init__(self, policies: PolicySet, catalog: ToolCatalog, field: str, key: str, kind: str) -> None:
        self.policies = policies
        self.catalog = catalog
        self.field = field
        self.key = key
        self.kind = kind

    def __call__(self, ex: "Exchange", message: dict[str, Any]) -> dict[str, Any] | None:
        result = message.get("result")
        if "method" in message or not isinstance(result, dict) or self.field not in result:
            return message   # notifications, server requests, errors: not a list result
        items = result[self.field]
        if not isinstance(items, list):
            result[self.field] = []
            return message
        server = ex.server.name
        if self.kind == TOOLS:
            self.catalog.update(server, items)
        kept = [item for item in items if self._visible(server, ex.principal, item)]
        hidden = len(items) - len(kept)
        if hidden:
            result[self.field] = kept
            ex.audit["hidden"] = ex.audit.get("hidden", 0) + hidden
            BOUND.get(POLICY_HIDDEN, server).inc(hidden)
        return message

    def _visible(self, server: str, principal: Any, item: Any) -> bool:
        if not isinstance(item, dict):
            return False
        name = item.get(self.key)
        if not isinstance(name, str):
            return False   # malformed entries are dropped, not guessed at
        if self.field == "resourceTemplates":
            return decide_template(self.policies, server, name, principal).allowed
        annotations = (item.get("annotations") or {}) if self.kind == TOOLS else UNKNOWN
        return decide(self.policies, server, self.kind, name, principal, ANY, annotations).allowed


def make_authz(config: "Config", catalog: ToolCatalog,
               refresh: Callable[["Exchange"], Awaitable[None]] | None = None) -> Authz:
    """Build the stage for ``app.py``: load the policies (raise ``ConfigError``) and set up reload.

    ``catalog`` is the shared tool catalog (annotations for ``tools/call``);
    ``refresh(ex)`` fills it for a server this replica has not listed yet.
    With no ``policies:`` key every server is default-deny: only protocol
    plumbing passes, lists come back empty, and a warning says so at start.
    """
    if config.policies_path is None:
        log.warning("policy.none_configured", detail="no 'policies:' in the config: every tool, resource, "
                    "prompt and method call is refused (default deny); see docs/policy.md")
        return Authz(PolicyHolder(EMPTY), catalog)
    known = [*config.servers, *config.virtual_servers]   # a section may name a virtual server
    initial = load_policies_strict(config.policies_path, known)
    holder = PolicyHolder(initial)
    log.info("policy.loaded", rules=initial.rule_count, files=len(initial.files), digest=initial.digest[:12])
    watcher = PolicyWatcher(holder, config.policies_path, known)
    return Authz(holder, catalog, watcher, refresh=refresh)
