"""The gateway's configuration as frozen objects, parsed once at start.

``load_config(path)`` reads the YAML, checks every section and either returns
a ``Config`` or raises ``ConfigError`` with every problem found.  Nothing here
runs per request.  Sections owned by later stages (auth, pinning, policies)
are parsed by their own modules so that each stage's settings live next to it.
"""
from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import SplitResult, urlsplit

from ..errors import ConfigError, Problem
from .reader import Reader
from .yamlloc import LDict, Loc, load_file

SERVER_NAME = r"[a-z0-9][a-z0-9_-]{0,62}"
MiB = 1024 * 1024


@dataclass(frozen=True, slots=True)
class Listener:
    host: str
    port: int
    loc: Loc

    @property
    def is_loopback(self) -> bool:
        return is_loopback_host(self.host)


@dataclass(frozen=True, slots=True)
class SentinelConfig:
    """Redis behind Sentinel: the master is asked of the sentinels, again after each failover."""
    master: str                          # the name the sentinels monitor (``sentinel monitor <name> ...``)
    nodes: tuple[tuple[str, int], ...]   # the sentinels' (host, port)
    db: int = 0
    password: Any = None                 # SecretRef: AUTH for the master (requirepass)
    sentinel_password: Any = None        # SecretRef: AUTH for the sentinels themselves
    loc: Loc | None = None


@dataclass(frozen=True, slots=True)
class StoreConfig:
    kind: str                 # "memory" | "redis"
    url: str = ""             # redis kind without ``sentinel``
    prefix: str = "mcpgw:"
    session_ttl: float = 24 * 3600
    loc: Loc | None = None
    limit_timeout: float = 0.25      # longest a rate-limit check waits for Redis (then on_store_error)
    lease_ttl: float = 30.0          # a concurrency slot not renewed for this long is free (dead replica)
    sentinel: SentinelConfig | None = None   # redis kind: the master is found through Sentinel


@dataclass(frozen=True, slots=True)
class Limits:
    max_body_bytes: int = 4 * MiB          # request body; 413 past this
    max_response_bytes: int = 16 * MiB     # only for responses the gateway must inspect whole
    max_sse_event_bytes: int = 16 * MiB    # one SSE event or NDJSON line being framed for inspection
    connect_timeout: float = 5.0
    read_timeout: float = 300.0            # upstream silence (headers or between bytes) -> 504
    max_connections_per_server: int = 256
    max_tools_per_page: int = 1000         # a tools/list page with more is refused before it is scanned
    header_timeout: float = 10.0           # a request's header block must arrive whole within this
    body_timeout: float = 30.0             # ...and its body within this, once the headers are in
    pool_timeout: float = 10.0             # waiting for a free upstream connection -> 503 past this
    # Floods and slow readers (docs/faults.md): what one client may hold of the gateway.
    max_client_connections: int = 10_000   # open client connections per process; more get 503 and are closed
    max_stream_buffer_bytes: int = 256 * 1024   # bytes queued for one client before the relay waits for it
    stream_write_timeout: float = 60.0     # a stream whose client reads nothing for this long is closed
    # GET streams open at once per principal (0: unlimited, only when written); per store, so
    # across replicas with Redis.  A client needs one per session; 32 covers many sessions.
    max_streams_per_principal: int = 32
    # A GET stream on which the upstream sent nothing for this long is ended cleanly (the
    # client reconnects, with Last-Event-ID when it has one); replaces read_timeout there.
    stream_idle_timeout: float = 300.0
    stream_keepalive_interval: float = 25.0   # ": keepalive" comment on a silent SSE stream (0: none)
    keepalive_timeout: float = 75.0        # an idle kept-alive client connection is closed after this
    loc: Loc | None = None                 # the limits section (a built-in limit's file:line)


@dataclass(frozen=True, slots=True)
class HttpConfig:
    allowed_origins: tuple[str, ...] = ()
    allowed_hosts: tuple[str, ...] = ()     # besides the public_url host
    trust_forwarded_host: bool = False
    trusted_proxies: tuple[Any, ...] = ()   # ip_network objects whose X-Forwarded-For is believed


@dataclass(frozen=True, slots=True)
class LoggingConfig:
    level: str = "info"
    audit: bool = True
    redact_fields: tuple[str, ...] = ()      # extra field names whose values are secrets
    redact_patterns: tuple[str, ...] = ()    # extra regexes of secret formats (operator's own)
    audit_file: str | None = None            # audit records go here (reopened on SIGHUP), else stdout
    log_arguments: bool = False              # debug: tool arguments (redacted) in the audit record


@dataclass(frozen=True, slots=True)
class TracingConfig:
    otlp_endpoint: str | None = None     # OTLP/HTTP JSON traces endpoint; None: no export
    service_name: str = "mcp-gateway"
    start_traces: bool = False           # start a trace for requests that carry no traceparent


@dataclass(frozen=True, slots=True)
class ServerConfig:
    name: str
    url: str
    mount_path: str              # /mcp/<name>
    resource_url: str            # <public_url>/mcp/<name>: RFC 8707 audience, RFC 9728 resource
    loc: Loc
    credentials: Any = None      # upstream credentials (gateway.auth.config)
    auth: Any = None             # per-server auth restrictions (gateway.auth.config)
    pinning: Any = None          # tool pinning settings (gateway.inspect.pinning)
    connect_timeout: float = 5.0
    read_timeout: float = 300.0
    max_connections: int = 256
    pool_timeout: float = 10.0
    forward_headers: frozenset[str] = frozenset()   # lower-case names forwarded besides the built-in allow-list
    mask_secrets: tuple[Any, ...] | None = None     # tool globs whose results are masked (None: none)
    scan_results: Any = None     # prompt-injection scan of results (gateway.inspect.result_scan_config)


@dataclass(frozen=True, slots=True)
class Config:
    path: str
    listen: Listener
    admin: Listener
    public_url: str
    public_host: str             # host[:port] clients must send in Host
    store: StoreConfig
    auth: Any                    # gateway.auth.config.AuthConfig
    http: HttpConfig
    limits: Limits
    logging: LoggingConfig
    shutdown_grace: float
    servers: dict[str, ServerConfig]
    policies_path: str | None = None
    policies: Any = None         # loaded policy set (gateway.policy)
    pinning_dir: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    shutdown_delay: float = 5.0    # SIGTERM: /readyz unready, still accepting, for this long
    tracing: TracingConfig = field(default_factory=TracingConfig)
    virtual_servers: dict[str, Any] = field(default_factory=dict)   # gateway.config.virtual


def is_loopback_host(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _listener(r: Reader, key: str, default_port: int) -> Listener:
    sub = r.mapping(key, required=True)
    host = sub.str("host", "127.0.0.1")
    port = sub.int("port", default_port, min=0, max=65535)
    sub.done()
    return Listener(host or "127.0.0.1", port if port is not None else default_port, sub.loc)


def _split(url: str) -> SplitResult | None:
    """``urlsplit`` for operator text: None for what it, or ``.port``, would raise on."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018  (raises on a port that is not a number in 0-65535)
    except ValueError:          # bad port, unbalanced IPv6 brackets, NFKC-unsafe netloc
        return None
    return parts


def _public_url(r: Reader) -> tuple[str, str]:
    url = r.str("public_url", "", required=True) or ""
    if not url:
        return "http://127.0.0.1", "127.0.0.1"
    parts = _split(url)
    if parts is None:
        r.error("public_url", f"public_url is not a valid URL (bad port or IPv6 literal); got {url!r}")
        return "http://127.0.0.1", "127.0.0.1"
    port = parts.port
    if parts.scheme not in ("http", "https") or not parts.hostname:
        r.error("public_url", f"public_url must be an absolute http(s) URL; got {url!r}")
    if parts.query or parts.fragment:
        r.error("public_url", "public_url must not have a query or fragment")
    if parts.scheme == "http" and parts.hostname and not is_loopback_host(parts.hostname):
        r.error("public_url", "public_url must be https unless it is a loopback address "
                "(OAuth 2.1 requires TLS; terminate it in front of the gateway)")
    # RFC 8707 canonical form: lower-case scheme and host, no trailing slash.
    netloc = (parts.hostname or "").lower()
    if ":" in netloc:
        netloc = f"[{netloc}]"
    if port is not None:
        netloc = f"{netloc}:{port}"
    canonical = f"{parts.scheme.lower()}://{netloc}{parts.path.rstrip('/')}"
    return canonical, netloc


def _store(r: Reader, check_secrets: bool) -> StoreConfig:
    r.seen.add("store")
    value = r.node.get("store", "memory")
    loc = r.at("store")
    sentinel = None
    if isinstance(value, str):
        url, prefix, ttl, limit_timeout, lease_ttl = value, "mcpgw:", 24 * 3600.0, 0.25, 30.0
    elif isinstance(value, LDict):
        sub = Reader(value, r.problems, "store")
        url = sub.str("url", "memory") or "memory"
        prefix = sub.str("prefix", "mcpgw:") or "mcpgw:"
        ttl = sub.duration("session_ttl", 24 * 3600.0, min=1)
        limit_timeout = sub.duration("limit_timeout", 0.25, min=0.001)
        lease_ttl = sub.duration("lease_ttl", 30.0, min=0.3)
        if sub.has("sentinel"):
            if sub.has("url"):
                sub.error("sentinel", "store.url and store.sentinel are exclusive: with sentinel, "
                          "the sentinels name the master")
            sentinel = _sentinel(sub.mapping("sentinel"), check_secrets)
        else:
            sub.seen.add("sentinel")
        sub.done()
    else:
        r.error("store", "store must be 'memory', a redis:// URL, or a mapping with url/prefix or sentinel")
        return StoreConfig("memory", loc=loc)
    if sentinel is not None:
        return StoreConfig("redis", prefix=prefix, session_ttl=ttl, loc=loc, limit_timeout=limit_timeout,
                           lease_ttl=lease_ttl, sentinel=sentinel)
    if url == "memory":
        return StoreConfig("memory", prefix=prefix, session_ttl=ttl, loc=loc, lease_ttl=lease_ttl)
    if url.startswith(("redis://", "rediss://", "unix://")):
        return StoreConfig("redis", url=url, prefix=prefix, session_ttl=ttl, loc=loc, limit_timeout=limit_timeout,
                           lease_ttl=lease_ttl)
    r.error("store", f"store must be 'memory' or a redis:// URL; got {url!r}")
    return StoreConfig("memory", loc=loc)


_HOST_PORT = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[^\s:\[\]]+):([0-9]{1,5})$")


def _sentinel(sub: Reader, check_secrets: bool) -> SentinelConfig | None:
    master = sub.str("master", "", required=True, pattern=r"[A-Za-z0-9._-]+") or ""
    nodes: list[tuple[str, int]] = []
    items = sub.list("nodes", required=True)
    for i, item in enumerate(items):
        m = _HOST_PORT.match(item) if isinstance(item, str) else None
        if m is None or not 0 < int(m.group(2)) < 65536:
            sub.problems.append(Problem(items.at(i), f"{sub.path}.nodes[{i}] must be 'host:port' of a sentinel "
                                                     f"(e.g. '10.0.0.1:26379'); got {item!r}"))
            continue
        nodes.append((m.group(1).strip("[]"), int(m.group(2))))
    if "nodes" in sub.node and not items:
        sub.error("nodes", f"{sub.path}.nodes must list at least one sentinel")
    db = sub.int("db", 0, min=0, max=15)
    password = sub.secret("password")
    sentinel_password = sub.secret("sentinel_password")
    sub.done()
    for key, ref in (("password", password), ("sentinel_password", sentinel_password)):
        if ref is not None and check_secrets and (why := ref.check()):
            sub.error(key, f"{sub.path}.{key} ({ref}): {why}")
    if not master or not nodes:
        return None
    return SentinelConfig(master, tuple(nodes), db, password, sentinel_password, sub.loc)


def _limits(r: Reader) -> Limits:
    sub = r.mapping("limits")
    d = Limits()
    limits = Limits(
        max_body_bytes=sub.size("max_body_bytes", d.max_body_bytes),
        max_response_bytes=sub.size("max_response_bytes", d.max_response_bytes),
        max_sse_event_bytes=sub.size("max_sse_event_bytes", d.max_sse_event_bytes),
        connect_timeout=sub.duration("connect_timeout", d.connect_timeout, min=0.001),
        read_timeout=sub.duration("read_timeout", d.read_timeout, min=0.001),
        max_connections_per_server=sub.int("max_connections_per_server", d.max_connections_per_server, min=1),
        max_tools_per_page=sub.int("max_tools_per_page", d.max_tools_per_page, min=1),
        header_timeout=sub.duration("header_timeout", d.header_timeout, min=0.001),
        body_timeout=sub.duration("body_timeout", d.body_timeout, min=0.001),
        pool_timeout=sub.duration("pool_timeout", d.pool_timeout, min=0.001),
        max_client_connections=sub.int("max_client_connections", d.max_client_connections, min=1),
        max_stream_buffer_bytes=sub.size("max_stream_buffer_bytes", d.max_stream_buffer_bytes),
        stream_write_timeout=sub.duration("stream_write_timeout", d.stream_write_timeout, min=0.001),
        max_streams_per_principal=sub.int("max_streams_per_principal", d.max_streams_per_principal, min=0),
        stream_idle_timeout=sub.duration("stream_idle_timeout", d.stream_idle_timeout, min=0.001),
        stream_keepalive_interval=sub.duration("stream_keepalive_interval", d.stream_keepalive_interval),
        keepalive_timeout=sub.duration("keepalive_timeout", d.keepalive_timeout, min=0.001),
        loc=sub.loc,
    )
    sub.done()
    return limits


def _origin_ok(origin: str) -> bool:
    parts = _split(origin)
    return parts is not None and bool(parts.scheme and parts.netloc) and not parts.path.strip("/") and not parts.query


def _http(r: Reader) -> HttpConfig:
    sub = r.mapping("http")
    origins = sub.str_list("allowed_origins")
    for origin in origins:
        if origin != "*" and not _origin_ok(origin):
            sub.error("allowed_origins", f"allowed origin {origin!r} must look like https://host[:port]")
        if origin == "*":
            sub.error("allowed_origins", "'*' is not accepted: list the origins browsers may call from")
    hosts = sub.str_list("allowed_hosts")
    trust = sub.bool("trust_forwarded_host", False)
    proxies = []
    for cidr in sub.str_list("trusted_proxies"):
        try:
            proxies.append(ipaddress.ip_network(cidr, strict=False))
        except ValueError:
            sub.error("trusted_proxies", f"{cidr!r} is not an IP address or CIDR block")
    sub.done()
    return HttpConfig(tuple(o.rstrip("/") for o in origins), tuple(h.lower() for h in hosts), trust,
                      tuple(proxies))


def _tracing(r: Reader) -> TracingConfig:
    if "tracing" not in r.node:
        r.seen.add("tracing")
        return TracingConfig()
    sub = r.mapping("tracing")
    endpoint = sub.str("otlp_endpoint")
    if endpoint is not None and not re.fullmatch(r"https?://[^\s/]+(/\S*)?", endpoint):
        sub.error("otlp_endpoint", f"tracing.otlp_endpoint must be an http(s) URL; got {endpoint!r}")
        endpoint = None
    cfg = TracingConfig(otlp_endpoint=endpoint, service_name=sub.str("service_name", "mcp-gateway") or "mcp-gateway",
                        start_traces=sub.bool("start_traces", False))
    sub.done()
    return cfg


def _logging(r: Reader, base_dir: str) -> LoggingConfig:
    sub = r.mapping("logging")
    fields: tuple[str, ...] = ()
    patterns: list[str] = []
    if "redact" in sub.node:
        red = sub.mapping("redact")
        fields = red.str_list("fields")
        for i, pattern in enumerate(red.str_list("patterns")):
            if len(pattern) > 512:
                red.error("patterns", f"logging.redact.patterns[{i}] is longer than 512 characters")
                continue
            try:
                re.compile(pattern)
            except re.error as exc:
                red.error("patterns", f"logging.redact.patterns[{i}] is not a valid regular expression: {exc}")
                continue
            patterns.append(pattern)
        red.done()
    audit_file = sub.str("audit_file")
    if audit_file is not None and not os.path.isabs(audit_file):
        audit_file = os.path.normpath(os.path.join(base_dir, audit_file))
    cfg = LoggingConfig(
        level=sub.str("level", "info", choices=("debug", "info", "warning", "error")),
        audit=sub.bool("audit", True),
        audit_file=audit_file,
        log_arguments=sub.bool("log_arguments", False),
        redact_fields=fields,
        redact_patterns=tuple(patterns),
    )
    sub.done()
    return cfg


def _servers(r: Reader, public_url: str, limits: Limits, ctx: dict[str, Any]) -> dict[str, ServerConfig]:
    from ..auth.config import parse_server_auth, parse_server_credentials
    from ..inspect.pinning_config import parse_pinning
    from ..inspect.result_scan_config import parse_scan_results

    sub = r.mapping("servers", required=True)
    servers: dict[str, ServerConfig] = {}
    for name in list(sub.node):
        sub.seen.add(name)
        if not isinstance(name, str) or not re.fullmatch(SERVER_NAME, name):
            sub.error(name, f"server name {name!r} must match {SERVER_NAME} (it becomes the URL path /mcp/<name>)")
            continue
        s = Reader(sub.node[name], r.problems, f"servers.{name}", sub.at(name))
        url = s.str("url", "", required=True) or ""
        if url:
            parts = _split(url)
            if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
                s.error("url", f"servers.{name}.url must be an absolute http(s) URL; got {url!r}")
        mount = f"/mcp/{name}"
        pinning = parse_pinning(s, ctx)
        server = ServerConfig(
            name=name,
            url=url,
            mount_path=mount,
            resource_url=f"{public_url}{mount}",
            loc=sub.at(name),
            credentials=parse_server_credentials(s, ctx),
            auth=parse_server_auth(s, ctx),
            pinning=pinning,
            connect_timeout=s.duration("connect_timeout", limits.connect_timeout, min=0.001),
            read_timeout=s.duration("read_timeout", limits.read_timeout, min=0.001),
            max_connections=s.int("max_connections", limits.max_connections_per_server, min=1),
            pool_timeout=s.duration("pool_timeout", limits.pool_timeout, min=0.001),
            forward_headers=_forward_headers(s),
            mask_secrets=_mask_secrets(s),
            scan_results=parse_scan_results(s, pinning.rules),
        )
        s.done()
        servers[name] = server
    if not servers and sub.ok and "servers" in r.node:
        sub.error(None, "servers must name at least one MCP server")
    return servers


# A header the gateway owns or checks can never be added to a server's forward list.
_NOT_FORWARDABLE = frozenset({
    "authorization", "cookie", "host", "content-length", "transfer-encoding", "connection", "upgrade",
    "mcp-session-id", "last-event-id", "origin", "forwarded", "x-forwarded-for", "x-forwarded-host",
    "x-forwarded-proto", "proxy-authorization", "te", "trailer", "keep-alive", "expect",
    "content-encoding", "accept-encoding", "traceparent", "tracestate",
})
_TOKEN = re.compile(r"[!#$%&'*+.^`|~0-9A-Za-z-]{1,64}")


def _mask_secrets(s: Reader) -> tuple[Any, ...] | None:
    """``servers.<name>.mask_secrets``: true (every tool) or a list of tool-name globs."""
    from ..policy.glob import compile_glob

    if "mask_secrets" not in s.node:
        s.seen.add("mask_secrets")
        return None
    value = s.node["mask_secrets"]
    if value is True or value is False:
        s.seen.add("mask_secrets")
        return (compile_glob("*"),) if value else None
    globs = s.str_list("mask_secrets")
    return tuple(compile_glob(g) for g in globs) or None


def _forward_headers(s: Reader) -> frozenset[str]:
    """``servers.<name>.forward_headers``: extra client headers this upstream may see."""
    names = s.str_list("forward_headers")
    out = set()
    for name in names:
        low = name.lower()
        if not _TOKEN.fullmatch(name):
            s.error("forward_headers", f"{name!r} is not a header name (letters, digits and -; no _)")
        elif low in _NOT_FORWARDABLE or low.startswith("x-gateway-"):
            s.error("forward_headers", f"{name!r} is owned or checked by the gateway and is never forwarded")
        else:
            out.add(low)
    return frozenset(out)


def parse_config(node: Any, path: str, problems: list[Problem], *, check_secrets: bool = True) -> Config | None:
    from ..auth.config import parse_auth
    from .virtual import parse_virtual_servers

    r = Reader(node, problems, "", Loc(path, 1, 1))
    if node is None:
        problems.append(Problem(Loc(path, 1, 1), "the config file is empty"))
        return None
    ctx: dict[str, Any] = {"path": path, "base_dir": os.path.dirname(os.path.abspath(path)),
                           "check_secrets": check_secrets}
    r.str("$schema")   # editors' schema pointer, allowed and ignored
    listen = _listener(r, "listen", 8080)
    admin = _listener(r, "admin", 9464)
    public_url, public_host = _public_url(r)
    ctx["public_url"] = public_url
    store = _store(r, check_secrets)
    limits = _limits(r)
    http = _http(r)
    logging_cfg = _logging(r, ctx["base_dir"])
    tracing = _tracing(r)
    auth = parse_auth(r, ctx, listen)
    shutdown_grace = r.duration("shutdown_grace", 30.0)
    shutdown_delay = r.duration("shutdown_delay", 5.0, min=0.0)
    policies_path = r.str("policies")
    pins_dir = r.str("pins")
    servers = _servers(r, public_url, limits, ctx)
    virtual = parse_virtual_servers(r, servers, ctx)
    r.done()
    if listen.port and admin.port and listen.port == admin.port and listen.host == admin.host:
        problems.append(Problem(admin.loc, "admin must not share the public listener: /metrics and /readyz "
                                           "stay off the public port"))
    base = ctx["base_dir"]
    if policies_path is not None and not os.path.isabs(policies_path):
        policies_path = os.path.normpath(os.path.join(base, policies_path))
    if pins_dir is not None and not os.path.isabs(pins_dir):
        pins_dir = os.path.normpath(os.path.join(base, pins_dir))
    return Config(
        path=path, listen=listen, admin=admin, public_url=public_url, public_host=public_host,
        store=store, auth=auth, http=http, limits=limits, logging=logging_cfg,
        shutdown_grace=shutdown_grace, shutdown_delay=shutdown_delay, servers=servers, policies_path=policies_path,
        pinning_dir=pins_dir if pins_dir is not None else _default_pins_dir(policies_path), tracing=tracing,
        virtual_servers=virtual,
    )


def _default_pins_dir(policies_path: str | None) -> str | None:
    """Lock files live next to the policies: the directory, or the file's directory."""
    if policies_path is None or os.path.isdir(policies_path):
        return policies_path
    return os.path.dirname(policies_path)


def load_config(path: str, *, check_secrets: bool = True) -> Config:
    """Parse and validate ``path``; raise ``ConfigError`` listing every problem."""
    node, problems = load_file(path)
    config = None
    if node is not None or not problems:
        config = parse_config(node, path, problems, check_secrets=check_secrets)
    if problems or config is None:
        raise ConfigError(problems)
    return config
