"""The published JSON Schema and the config parser accept the same configurations.

Editors validate ``gateway.yaml`` against ``gateway/schema/gateway.schema.json``; the gateway
validates it with ``gateway.config.model.parse_config``.  These tests keep the two in step:

- every example under ``deploy/``, every gateway-config snippet in ``docs/`` and a curated set
  of full configs (every section, every credential kind) pass both;
- one unknown key in any section is refused by both, at that key;
- the keys each section's ``Reader`` accepts (recorded from ``Reader.done``) equal the schema's
  ``properties`` at that path, section by section, and no section exists on one side only;
- the value-level rules both sides can express (enums, kinds, required keys, secrets as
  references, forbidden headers, ...) agree case by case.
"""
from __future__ import annotations

import copy
import json
import re
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Iterator

import jsonschema
import pytest
import yaml

from gateway.auth import config as auth_config
from gateway.auth import credentials_config
from gateway.config import model
from gateway.config.reader import Reader
from gateway.config.yamlloc import load_text
from gateway.errors import Problem
from gateway.inspect import pinning_config

REPO = Path(__file__).resolve().parents[1]
SCHEMA_PATH = REPO / "gateway" / "schema" / "gateway.schema.json"
SCHEMA: dict[str, Any] = json.loads(SCHEMA_PATH.read_text())
UNKNOWN = "zz_unknown_key"
RULES_FILE = "extra-rules.yaml"          # referenced by the curated configs' pinning.rules

# --------------------------------------------------------------------------- curated configs

FULL_OAUTH = """\
$schema: https://github.com/mcp-gateway/mcp-gateway/gateway/schema/gateway.schema.json
listen: {host: 127.0.0.1, port: 8080}
admin: {host: 127.0.0.1, port: 9464}
public_url: https://mcp.example.com
store:
  prefix: "gw:"
  session_ttl: 8h
  sentinel:
    master: mymaster
    nodes: ["10.0.0.1:26379", "sentinel-2.example.com:26379", "[fd00::3]:26379"]
    db: 1
    password: env:REDIS_PASSWORD
    sentinel_password: file:/run/secrets/sentinel
auth:
  mode: oauth
  allow_none_on_public_listener: false
  max_token_bytes: 8KiB
  cache_size: 5000
  fetch_timeout: 2s
  issuers:
    - issuer: https://idp.example.com/realms/acme
      jwks_uri: https://idp.example.com/realms/acme/certs?v=1
      algorithms: [RS256, ES256, EdDSA]
      typ: [at+jwt, JWT]
      leeway: 10s
      required_claims: [email]
      scope_claim: scp
      subject_claim: oid
      client_claim: azp
      name_claim: preferred_username
      groups_claim: groups
      jwks_refresh: 10m
      jwks_cooldown: 2
      introspection:
        endpoint: https://idp.example.com/realms/acme/introspect
        client_id: mcp-gateway
        client_secret: env:INTROSPECTION_SECRET
        auth_method: client_secret_post
        cache_ttl: 30s
        negative_ttl: 1s
        require_audience: true
    - issuer: https://as.example.com/
      typ: at+jwt
http:
  allowed_origins: ["https://inspector.example.com"]
  allowed_hosts: ["mcp.internal"]
  trust_forwarded_host: true
limits:
  max_body_bytes: 4MiB
  max_response_bytes: 16777216
  max_sse_event_bytes: 1MiB
  connect_timeout: 5s
  read_timeout: 5m
  max_connections_per_server: 128
logging: {level: debug, audit: false, audit_file: audit.jsonl, log_arguments: true, redact: {fields: [x-tenant-key], patterns: ["acme_[0-9a-f]{12}"]}}
tracing: {otlp_endpoint: "http://127.0.0.1:4318/v1/traces", service_name: gw, start_traces: true}
shutdown_grace: 10s
policies: policies
pins: pins
servers:
  static:
    url: https://a.example.com/mcp
    credentials: {header: X-Api-Key, value: "env:A_TOKEN"}
    auth:
      issuers: [https://idp.example.com/realms/acme]
      scopes: [mcp:read]
      scopes_supported: [mcp:read, mcp:write]
      forward_identity: true
    pinning:
      mode: enforce
      lock_file: static.lock.yaml
      findings: {info: ignore, low: warn, medium: block, high: block, critical: block}
      rules: [extra-rules.yaml]
      ignore_fields: [_meta]
      recheck_after: 1m
    scan_results: {action: mask, tools: ["read_*"], resources: ["file:///**"], min_severity: medium, max_chars: 65536}
    connect_timeout: 2s
    read_timeout: 10m
    max_connections: 32
  bearer:
    url: https://a2.example.com/mcp
    credentials: {value: "file:/run/secrets/a2-token"}
  m2m:
    url: https://b.example.com/mcp
    credentials:
      client_credentials:
        token_url: https://as.example.com/token
        issuer: https://as.example.com
        client_id: mcp-gateway
        client_secret: file:/run/secrets/b-client-secret
        auth_method: client_secret_basic
        scope: "b:read"
        resource: https://b.example.com/mcp
        audience: b-api
        refresh_margin: 60s
  public-client:
    url: https://b2.example.com/mcp
    credentials:
      client_credentials: {issuer: https://as.example.com, client_id: public-client, auth_method: none}
  obo:
    url: https://c.example.com/mcp
    auth: {issuers: [https://as.example.com/], scopes: [c:use]}
    credentials:
      token_exchange:
        token_url: https://as.example.com/token
        issuer: https://as.example.com
        client_id: mcp-gateway
        client_secret: env:C_EXCHANGE_SECRET
        auth_method: client_secret_post
        scope: "c:read c:write"
        resource: https://c.example.com/mcp
        audience: c-api
        requested_token_type: urn:ietf:params:oauth:token-type:jwt
        cache_size: 100
virtual_servers:
  team:
    description: static and the search tools of bearer
    include:
      - server: static
      - {server: bearer, prefix: b_, tools: ["search_*"], prompts: [greet]}
    origin_timeout: 2s
    cursor_secret: env:TEAM_CURSOR_SECRET
    auth: {issuers: [https://idp.example.com/realms/acme], scopes: [mcp:read]}
"""

NO_AUTH_LOOPBACK = """\
listen: {port: 8080}
admin: {}
public_url: http://localhost:8080
store: memory
auth: {mode: none}
servers:
  local: {url: "http://127.0.0.1:3001/mcp"}
"""

NO_AUTH_PUBLIC = """\
listen: {host: "::", port: 8080}
admin: {host: "::", port: 9464}
public_url: https://mcp.example.com
store: {url: "rediss://redis.example.com:6380/0", limit_timeout: 100ms, lease_ttl: 10s}
auth: {mode: none, allow_none_on_public_listener: true, issuers: []}
servers:
  local:
    url: http://everything:3001/mcp
    pinning: {mode: "off"}
    credentials: {header: Authorization, value: "env:UPSTREAM_TOKEN"}
"""

_FULL = yaml.safe_load(FULL_OAUTH)
CURATED = {"full oauth config": FULL_OAUTH, "no auth on loopback": NO_AUTH_LOOPBACK,
           "no auth on a public listener": NO_AUTH_PUBLIC}


# --------------------------------------------------------------------------- helpers

@pytest.fixture(scope="module")
def validator() -> jsonschema.protocols.Validator:
    cls = jsonschema.Draft202012Validator
    cls.check_schema(SCHEMA)
    return cls(SCHEMA, format_checker=cls.FORMAT_CHECKER)


@pytest.fixture(scope="module")
def config_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where parsed configs live: relative ``pinning.rules`` files resolve (and exist) here."""
    directory = tmp_path_factory.mktemp("configs")
    (directory / RULES_FILE).write_text("version: 1\n")
    return directory


def load(text: str) -> Any:
    return yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


def dump(config: dict[str, Any]) -> str:
    return yaml.dump(config, Dumper=getattr(yaml, "CSafeDumper", yaml.SafeDumper),
                     sort_keys=False, default_flow_style=False, allow_unicode=True)


def full_config() -> dict[str, Any]:
    """A fresh copy of FULL_OAUTH as data, for a test to edit."""
    return copy.deepcopy(_FULL)


def parse(text: str, directory: Path) -> list[Problem]:
    """Every problem ``parse_config`` finds in ``text`` (secrets are references, not resolved)."""
    path = str(directory / "gateway.yaml")
    node, problems = load_text(text, path)
    if not problems:
        model.parse_config(node, path, problems, check_secrets=False)
    return problems


def schema_errors(validator: Any, config: Any) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(config)]


@pytest.fixture(scope="module")
def clean_base(validator: Any, config_dir: Path) -> None:
    """Edits of FULL_OAUTH prove something only while FULL_OAUTH itself passes both."""
    assert schema_errors(validator, full_config()) == []
    assert [str(p) for p in parse(FULL_OAUTH, config_dir)] == []


def locate(config: dict[str, Any], path: str) -> dict[str, Any]:
    """The mapping at a reader path such as ``auth.issuers[0].introspection`` ('' is the root)."""
    node: Any = config
    for part in filter(None, path.split(".")):
        name, *indexes = re.split(r"\[(\d+)\]", part)
        node = node[name]
        for index in filter(None, indexes):
            node = node[int(index)]
    return node


def normalize(path: str) -> str:
    """``servers.m2m.credentials`` -> ``servers.*.credentials``; ``issuers[1]`` -> ``issuers[]``."""
    return re.sub(r"\[\d+\]", "[]", re.sub(r"^(virtual_servers|servers)\.[^.]+", r"\1.*", path))


@pytest.fixture(scope="module")
def accepted_keys(config_dir: Path) -> dict[str, set[str]]:
    """normalized reader path -> every key the parser asked for there, over all curated configs.

    ``Reader.done`` is wrapped to record ``(path, seen)`` of every mapping read from the config
    file (poisoning rule files are read by Readers too; they are left out by file name).  Most
    getters mark their key as seen whether or not it is present, so one config per section
    suffices; the exceptions (``credentials`` sees only the kind present, ``findings`` only the
    severities present) are each covered by the curated configs.
    """
    seen: dict[str, set[str]] = defaultdict(set)
    config_file = str(config_dir / "gateway.yaml")
    original = Reader.done

    def recording_done(self: Reader) -> None:
        if self.loc.file == config_file:
            seen[normalize(self.path)].update(self.seen)
        original(self)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Reader, "done", recording_done)
        for text in CURATED.values():
            assert parse(text, config_dir) == []
    return dict(seen)


# --- walking the schema

def resolve(node: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in node:
        target: Any = SCHEMA
        for part in node["$ref"].removeprefix("#/").split("/"):
            target = target[part]
        node = {**target, **{k: v for k, v in node.items() if k != "$ref"}}
    return node


def branches(node: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """``node`` and every subschema that applies to the same instance (not ``if``/``not``)."""
    node = resolve(node)
    yield node
    for key in ("allOf", "anyOf", "oneOf"):
        for sub in node.get(key, ()):
            yield from branches(sub)
    for key in ("then", "else"):
        if key in node:
            yield from branches(node[key])


def schema_sections() -> dict[str, set[str]]:
    """normalized path -> union of ``properties`` of every schema object reachable there."""
    sections: dict[str, set[str]] = defaultdict(set)

    def walk(nodes: list[dict[str, Any]], path: str) -> None:
        props: dict[str, list[dict[str, Any]]] = defaultdict(list)
        items: list[dict[str, Any]] = []
        named: list[dict[str, Any]] = []
        for b in (b for n in nodes for b in branches(n)):
            for key, sub in b.get("properties", {}).items():
                props[key].append(sub)
            if isinstance(b.get("items"), dict):
                items.append(b["items"])
            if isinstance(b.get("additionalProperties"), dict):
                named.append(b["additionalProperties"])
        if props:
            sections[path].update(props)
        join = (lambda k: f"{path}.{k}") if path else (lambda k: k)
        for key, subs in props.items():
            walk(subs, join(key))
        if items:
            walk(items, f"{path}[]")
        if named:
            walk(named, f"{path}.*")

    walk([SCHEMA], "")
    return dict(sections)


def schema_at(pointer: str) -> Any:
    node: Any = SCHEMA
    for part in pointer.split("/"):
        node = resolve(node)[part] if isinstance(node, dict) else node[int(part)]
    return node


# --------------------------------------------------------------------------- (a) documented configs

DEPLOY_EXAMPLES = sorted(p for p in (REPO / "deploy").rglob("*.yaml")
                         if p.read_text().startswith("# yaml-language-server: $schema="))
DOC_BLOCKS = [(f"{doc.relative_to(REPO).as_posix()}#{i}", block)
              for doc in sorted((REPO / "docs").glob("*.md"))
              for i, block in enumerate(re.findall(r"```yaml\n(.*?)```", doc.read_text(), re.S))]


def doc_block_kind(block: str) -> str:
    """What a YAML block in the docs is; only ``gateway config`` blocks are checked here."""
    data = load(block)
    if not isinstance(data, dict):
        return "other"
    if "version" in data and "tools" in data:
        return "lock file"
    if "version" in data and ({"rules", "detectors"} & data.keys()):
        return "poisoning rules file"
    if "cases" in data:
        return "policy test file"
    servers = data.get("servers")
    if isinstance(servers, dict) and servers and not any(isinstance(s, dict) and "url" in s
                                                         for s in servers.values()):
        return "policy file"
    return "gateway config"


DOC_CONFIGS = [(name, block) for name, block in DOC_BLOCKS if doc_block_kind(block) == "gateway config"]
DOC_BASE = {"listen": {"host": "127.0.0.1", "port": 8080}, "admin": {"host": "127.0.0.1", "port": 9464},
            "public_url": "https://gateway.example.com"}


def complete(snippet: dict[str, Any]) -> dict[str, Any]:
    """A documented fragment plus what a whole config needs (as tests/test_auth_docs.py does)."""
    config = {**DOC_BASE, **snippet}
    config.setdefault("auth", {"issuers": [{"issuer": "https://as.example.com"}]})
    config.setdefault("servers", {"demo": {"url": "https://mcp.example.com/mcp"}})
    return config


def test_every_yaml_block_in_the_docs_is_a_known_kind_of_file() -> None:
    kinds = {name: doc_block_kind(block) for name, block in DOC_BLOCKS}
    assert "other" not in kinds.values(), kinds
    by_doc = {name.split("#")[0] for name, _ in DOC_CONFIGS}
    assert by_doc == {"docs/auth.md", "docs/pinning.md", "docs/policy.md"}


@pytest.mark.parametrize("example", DEPLOY_EXAMPLES, ids=[p.relative_to(REPO).as_posix() for p in DEPLOY_EXAMPLES])
def test_every_deploy_example_is_accepted_by_the_schema_and_the_parser(example: Path, validator: Any) -> None:
    text = example.read_text()
    assert schema_errors(validator, load(text)) == []
    node, problems = load_text(text, str(example))
    model.parse_config(node, str(example), problems, check_secrets=False)
    assert [str(p) for p in problems] == []


@pytest.mark.parametrize("snippet", [b for _, b in DOC_CONFIGS], ids=[n for n, _ in DOC_CONFIGS])
def test_every_gateway_config_in_the_docs_is_accepted_by_the_schema_and_the_parser(
        snippet: str, validator: Any, tmp_path: Path) -> None:
    config = complete(load(snippet))
    assert schema_errors(validator, config) == []
    for server in config["servers"].values():          # pinning.rules files must exist to parse
        for rules in (server.get("pinning") or {}).get("rules", []):
            (tmp_path / rules).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / rules).write_text("version: 1\n")
    assert [str(p) for p in parse(dump(config), tmp_path)] == []


@pytest.mark.parametrize("text", CURATED.values(), ids=CURATED.keys())
def test_every_curated_full_config_is_accepted_by_the_schema_and_the_parser(
        text: str, validator: Any, config_dir: Path) -> None:
    assert schema_errors(validator, load(text)) == []
    assert [str(p) for p in parse(text, config_dir)] == []


def test_the_curated_configs_use_every_credential_kind_and_both_auth_modes() -> None:
    configs = [load(t) for t in CURATED.values()]
    kinds = {k for c in configs for s in c["servers"].values() for k in s.get("credentials", {})}
    assert kinds == {"header", "value", "client_credentials", "token_exchange"}
    assert {c["auth"].get("mode", "oauth") for c in configs} == {"oauth", "none"}


# --------------------------------------------------------------------------- (b) unknown keys

UNKNOWN_KEY_SECTIONS = [
    "", "listen", "admin", "store", "store.sentinel", "auth", "auth.issuers[0]", "auth.issuers[1]",
    "auth.issuers[0].introspection", "http", "limits", "logging", "logging.redact", "tracing",
    "servers.static", "servers.static.credentials", "servers.static.auth", "servers.static.pinning",
    "servers.static.pinning.findings", "servers.static.scan_results", "servers.m2m.credentials",
    "servers.m2m.credentials.client_credentials", "servers.obo.credentials",
    "servers.obo.credentials.token_exchange", "virtual_servers.team", "virtual_servers.team.include[1]",
    "virtual_servers.team.auth",
]


@pytest.mark.parametrize("section", UNKNOWN_KEY_SECTIONS, ids=[s or "top level" for s in UNKNOWN_KEY_SECTIONS])
def test_an_unknown_key_is_refused_by_the_schema_and_by_the_parser_at_that_key(
        section: str, validator: Any, config_dir: Path, clean_base: None) -> None:
    config = full_config()
    locate(config, section)[UNKNOWN] = "x"
    assert any(UNKNOWN in e for e in schema_errors(validator, config))
    text = dump(config)
    line_no, line = next((i, ln) for i, ln in enumerate(text.splitlines(), 1) if f"{UNKNOWN}:" in ln)
    problems = parse(text, config_dir)
    assert [(p.loc.line, p.loc.col) for p in problems] == [(line_no, line.index(UNKNOWN) + 1)], problems


def test_every_section_the_parser_reads_has_an_unknown_key_case(accepted_keys: dict[str, set[str]]) -> None:
    assert {normalize(s) for s in UNKNOWN_KEY_SECTIONS} == set(accepted_keys)


# --------------------------------------------------------------------------- (c) key sets agree

def test_the_schema_and_the_parser_have_the_same_sections(accepted_keys: dict[str, set[str]]) -> None:
    assert set(schema_sections()) == set(accepted_keys)


@pytest.mark.parametrize("section", sorted(schema_sections()), ids=lambda s: s or "top level")
def test_each_section_accepts_the_same_keys_in_the_schema_and_in_the_parser(
        section: str, accepted_keys: dict[str, set[str]]) -> None:
    assert schema_sections()[section] == accepted_keys.get(section)


def test_server_names_follow_the_same_pattern_in_the_schema_and_the_parser() -> None:
    assert SCHEMA["properties"]["servers"]["propertyNames"]["pattern"] == f"^{model.SERVER_NAME}$"


SHARED_CONSTANTS = [
    ("algorithms", "$defs/issuer/properties/algorithms/items/enum", auth_config.KNOWN_ALGORITHMS),
    ("default algorithms", "$defs/issuer/properties/algorithms/default", auth_config.DEFAULT_ALGORITHMS),
    ("introspection auth methods", "$defs/introspection/properties/auth_method/enum",
     ("client_secret_basic", "client_secret_post")),
    ("client auth methods (client credentials)", "$defs/clientCredentials/properties/auth_method/enum",
     ("client_secret_basic", "client_secret_post", "none")),
    ("client auth methods (token exchange)", "$defs/tokenExchange/properties/auth_method/enum",
     ("client_secret_basic", "client_secret_post", "none")),
    ("requested token type", "$defs/tokenExchange/properties/requested_token_type/default",
     (credentials_config.TOKEN_TYPE_ACCESS,)),
    ("pinning modes", "$defs/server/properties/pinning/properties/mode/enum", pinning_config.MODES),
    ("default pinning mode", "$defs/server/properties/pinning/properties/mode/default",
     (pinning_config.DEFAULT_MODE,)),
    ("finding severities", "$defs/server/properties/pinning/properties/findings/properties",
     pinning_config.SEVERITIES),
    ("finding actions", "$defs/server/properties/pinning/properties/findings/properties/high/enum",
     pinning_config.ACTIONS),
    ("unignorable fields", "$defs/server/properties/pinning/properties/ignore_fields/items/not/enum",
     tuple(pinning_config._UNIGNORABLE)),
    ("auth modes", "properties/auth/properties/mode/enum", ("none", "oauth")),
    ("log levels", "properties/logging/properties/level/enum", ("debug", "info", "warning", "error")),
]


@pytest.mark.parametrize("pointer,values", [c[1:] for c in SHARED_CONSTANTS], ids=[c[0] for c in SHARED_CONSTANTS])
def test_enumerations_in_the_schema_are_the_parsers_constants(pointer: str, values: tuple[str, ...]) -> None:
    found = schema_at(pointer)
    found = [found] if isinstance(found, str) else list(found)
    assert sorted(found) == sorted(values)


# --------------------------------------------------------------------------- value-level agreement

def _set(path: str, key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    return lambda c: locate(c, path).__setitem__(key, value)


def _del(path: str, key: str) -> Callable[[dict[str, Any]], None]:
    return lambda c: locate(c, path).pop(key)


def _auth_none_only(keep: str) -> Callable[[dict[str, Any]], None]:
    """auth.mode none, with every server's auth restriction and token exchange removed but ``keep``."""
    def edit(c: dict[str, Any]) -> None:
        c["auth"] = {"mode": "none"}
        for name, server in list(c["servers"].items()):
            server.pop("auth", None)
            for virtual in c.get("virtual_servers", {}).values():
                virtual.pop("auth", None)
            if "token_exchange" in server.get("credentials", {}) and keep != "token_exchange":
                del c["servers"][name]
        if keep == "scopes":
            c["servers"]["static"]["auth"] = {"scopes": ["mcp:read"]}
        if keep == "issuers":
            c["servers"]["static"]["auth"] = {"issuers": ["https://idp.example.com/realms/acme"]}
    return edit


AGREEMENT = [
    # (behaviour, edit of FULL_OAUTH, accepted)
    ("a duration may be a number of seconds", _set("auth", "fetch_timeout", 3), True),
    ("a duration may be a fractional string", _set("servers.static", "read_timeout", "1.5m"), True),
    ("a size may be an integer", _set("auth", "max_token_bytes", 4096), True),
    ("typ may be an empty string meaning no typ header", _set("auth.issuers[0]", "typ", ""), True),
    ("auth mode none needs no per-server restrictions", _auth_none_only(""), True),
    ("a public client needs no secret", lambda c: (
        _set("servers.m2m.credentials.client_credentials", "auth_method", "none")(c),
        _del("servers.m2m.credentials.client_credentials", "client_secret")(c)), True),
    ("a duration with an unknown unit is refused", _set("auth", "fetch_timeout", "5 days"), False),
    ("a negative duration is refused", _set("auth.issuers[0]", "jwks_cooldown", -1), False),
    ("a leeway over five minutes is refused", _set("auth.issuers[0]", "leeway", 301), False),
    ("a jwks refresh under a second is refused", _set("auth.issuers[0]", "jwks_refresh", 0.5), False),
    ("a size that is not a size is refused", _set("auth", "max_token_bytes", "lots"), False),
    ("a token cache size out of range is refused", _set("auth", "cache_size", -1), False),
    ("an unknown auth mode is refused", _set("auth", "mode", "basic"), False),
    ("a symmetric algorithm is refused", _set("auth.issuers[0]", "algorithms", ["HS256"]), False),
    ("an empty algorithm list is refused", _set("auth.issuers[0]", "algorithms", []), False),
    ("typ must be a string or a list of strings", _set("auth.issuers[0]", "typ", 1), False),
    ("an issuer entry needs issuer", _del("auth.issuers[1]", "issuer"), False),
    ("an issuer with a fragment is refused", _set("auth.issuers[1]", "issuer", "https://as.example.com/#x"), False),
    ("an issuer URL with credentials is refused", _set("auth.issuers[1]", "issuer", "https://u:p@as.example.com/"),
     False),
    ("introspection needs client_id", _del("auth.issuers[0].introspection", "client_id"), False),
    ("introspection needs client_secret", _del("auth.issuers[0].introspection", "client_secret"), False),
    ("an inline introspection secret is refused",
     _set("auth.issuers[0].introspection", "client_secret", "hunter2"), False),
    ("introspection has no public-client auth method",
     _set("auth.issuers[0].introspection", "auth_method", "none"), False),
    ("auth mode oauth needs issuers", lambda c: c.__setitem__("auth", {"mode": "oauth"}), False),
    ("auth without mode needs issuers", lambda c: c.__setitem__("auth", {"cache_size": 10}), False),
    ("auth mode none refuses issuers", lambda c: (_auth_none_only("")(c), c["auth"].__setitem__(
        "issuers", [{"issuer": "https://as.example.com"}])), False),
    ("auth mode none refuses per-server scopes", _auth_none_only("scopes"), False),
    ("auth mode none refuses per-server issuers", _auth_none_only("issuers"), False),
    ("auth mode none refuses token exchange", _auth_none_only("token_exchange"), False),
    ("the auth section is required", lambda c: c.pop("auth"), False),
    ("the listen section is required", lambda c: c.pop("listen"), False),
    ("the admin section is required", lambda c: c.pop("admin"), False),
    ("public_url is required", lambda c: c.pop("public_url"), False),
    ("servers are required", lambda c: c.pop("servers"), False),
    ("at least one server is required", _set("", "servers", {}), False),
    ("a server needs url", _del("servers.bearer", "url"), False),
    ("a scope with a space is refused", _set("servers.static.auth", "scopes", ["mcp read"]), False),
    ("a supported scope with a quote is refused", _set("servers.static.auth", "scopes_supported", ['a"b']), False),
    ("empty credentials are refused", _set("servers.static", "credentials", {}), False),
    ("a header without a value is refused", _set("servers.static", "credentials", {"header": "X-Api-Key"}), False),
    ("two credential kinds are refused", _set("servers.m2m.credentials", "value", "env:B_TOKEN"), False),
    ("a header next to client credentials is refused", _set("servers.m2m.credentials", "header", "X-Key"), False),
    ("an inline static credential is refused", _set("servers.static.credentials", "value", "sk-inline"), False),
    ("a relative file secret is refused", _set("servers.static.credentials", "value", "file:secret.txt"), False),
    ("a header name with a space is refused", _set("servers.static.credentials", "header", "X Api Key"), False),
    ("an X-Gateway header cannot carry a credential",
     _set("servers.static.credentials", "header", "x-gateway-subject"), False),
    ("client credentials need token_url or issuer", lambda c: (
        _del("servers.m2m.credentials.client_credentials", "token_url")(c),
        _del("servers.m2m.credentials.client_credentials", "issuer")(c)), False),
    ("client credentials need client_id", _del("servers.m2m.credentials.client_credentials", "client_id"), False),
    ("client credentials need a secret unless the client is public",
     _del("servers.m2m.credentials.client_credentials", "client_secret"), False),
    ("token exchange needs a secret unless the client is public",
     _del("servers.obo.credentials.token_exchange", "client_secret"), False),
    ("a token exchange cache size out of range is refused",
     _set("servers.obo.credentials.token_exchange", "cache_size", 10_000_001), False),
    ("an unknown pinning mode is refused", _set("servers.static.pinning", "mode", "strict"), False),
    ("an unknown finding action is refused", _set("servers.static.pinning.findings", "medium", "drop"), False),
    ("the description cannot be left out of the fingerprint",
     _set("servers.static.pinning", "ignore_fields", ["_meta", "description"]), False),
    ("a recheck under a second is refused", _set("servers.static.pinning", "recheck_after", 0.5), False),
    ("a server timeout of zero is refused", _set("servers.static", "connect_timeout", 0), False),
    ("a sentinel store may leave out db and passwords", lambda c: (
        _del("store.sentinel", "db")(c), _del("store.sentinel", "password")(c),
        _del("store.sentinel", "sentinel_password")(c)), True),
    ("a store with both url and sentinel is refused", _set("store", "url", "redis://redis:6379/0"), False),
    ("a sentinel store needs master", _del("store.sentinel", "master"), False),
    ("a sentinel store needs nodes", _del("store.sentinel", "nodes"), False),
    ("a sentinel store needs at least one node", _set("store.sentinel", "nodes", []), False),
    ("a sentinel node without a port is refused", _set("store.sentinel", "nodes", ["10.0.0.1"]), False),
    ("an inline sentinel password is refused", _set("store.sentinel", "password", "hunter2"), False),
    ("a server name with capitals is refused",
     lambda c: c["servers"].__setitem__("Static", c["servers"].pop("static")), False),
]


@pytest.mark.parametrize("edit,accepted", [a[1:] for a in AGREEMENT], ids=[a[0] for a in AGREEMENT])
def test_the_schema_and_the_parser_agree_on_values(edit: Callable[[dict[str, Any]], Any], accepted: bool,
                                                   validator: Any, config_dir: Path, clean_base: None) -> None:
    config = full_config()
    edit(config)
    in_schema = schema_errors(validator, config)
    in_parser = [str(p) for p in parse(dump(config), config_dir)]
    assert (in_schema == [], in_parser == []) == (accepted, accepted), (in_schema, in_parser)


@pytest.mark.parametrize("header", sorted(credentials_config.FORBIDDEN_HEADERS))
def test_a_forbidden_header_is_refused_by_the_schema_and_the_parser_in_any_case(
        header: str, validator: Any, config_dir: Path, clean_base: None) -> None:
    for spelling in (header, header.upper(), header.title()):
        config = full_config()
        config["servers"]["static"]["credentials"]["header"] = spelling
        assert schema_errors(validator, config) != []
        assert parse(dump(config), config_dir) != []

