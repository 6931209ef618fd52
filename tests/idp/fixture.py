"""A real OAuth authorization server for the tests (``oidc-provider``, see ``server.mjs``).

Fixture ``idp`` (registered from ``tests/conftest.py``) is a factory::

    as_ = idp()                          # IDP_PORT=0, control endpoints on
    as_ = idp(env={"IDP_TOKEN_TTL": "5"})
    as_.issuer                           # "http://127.0.0.1:<port>"
    as_.client_credentials(resource, scope="mcp:read")   # a real RS256 at+jwt
    as_.rotate()                         # new signing key first; old ones still published
    as_.retire()                         # only the current key stays published
    as_.mint(claims, header=None)        # sign arbitrary claims with the current key

``HeadlessBrowser`` plays the user agent for the MCP SDK's ``OAuthClientProvider``:
it follows the authorization redirects (the server auto-approves) and hands the
code, state and RFC 9207 ``iss`` to the SDK.  ``MemoryTokenStorage`` is the SDK's
token storage, one per client.
"""
from __future__ import annotations

import json
import re
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx2
import pytest
from mcp.client.auth import AuthorizationCodeResult, OAuthClientProvider
from mcp.shared.auth import OAuthClientInformationFull, OAuthClientMetadata, OAuthToken

from tests.support.components import REPO, node_binary
from tests.support.procs import ManagedProcess, start

SERVER_MJS = Path(__file__).resolve().parent / "server.mjs"
REDIRECT_URI = "http://127.0.0.1:1/callback"   # never listened on: the browser stops before it


@dataclass
class Idp:
    issuer: str
    port: int
    proc: ManagedProcess
    kids: list[str]
    env: dict[str, str] = field(default_factory=dict)

    def _post(self, path: str, data: bytes, headers: dict[str, str]) -> dict[str, Any]:
        req = urllib.request.Request(self.issuer + path, data=data, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            return {"_status": exc.code, **json.loads(exc.read() or b"{}")}

    def token(self, form: dict[str, str], client: tuple[str, str] = ("m2m-client", "m2m-secret")) -> dict[str, Any]:
        import base64

        basic = base64.b64encode(f"{client[0]}:{client[1]}".encode()).decode()
        return self._post("/token", urllib.parse.urlencode(form).encode(),
                          {"Authorization": f"Basic {basic}",
                           "Content-Type": "application/x-www-form-urlencoded"})

    def client_credentials(self, resource: str | None, scope: str | None = "mcp:read",
                           client: tuple[str, str] = ("m2m-client", "m2m-secret")) -> str:
        form = {"grant_type": "client_credentials"}
        if resource:
            form["resource"] = resource
        if scope:
            form["scope"] = scope
        answer = self.token(form, client)
        assert "access_token" in answer, answer
        return answer["access_token"]

    def _control(self, path: str, body: dict[str, Any] | None = None) -> Any:
        return self._post(path, json.dumps(body or {}).encode(), {"Content-Type": "application/json"})

    def rotate(self) -> list[str]:
        """A new signing key becomes current; the previous ones stay in the JWKS."""
        self.kids = self._control("/__test/rotate")["kids"]
        return self.kids

    def retire(self) -> list[str]:
        """Only the current signing key stays in the JWKS (the end of a rotation)."""
        self.kids = self._control("/__test/retire")["kids"]
        return self.kids

    def mint(self, claims: dict[str, Any], header: dict[str, Any] | None = None) -> str:
        return self._control("/__test/mint", {"claims": claims, "header": header or {}})["token"]

    def exchanges(self) -> list[dict[str, Any]]:
        return self._control("/__test/exchanges")

    def stop(self) -> None:
        self.proc.stop()


def start_idp(workdir: Path, *, env: dict[str, str] | None = None) -> Idp:
    workdir.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:8]
    full_env = {"IDP_PORT": "0", "IDP_CONTROL": "1", "NODE_NO_WARNINGS": "1", **(env or {})}
    proc, match = start([node_binary(), str(SERVER_MJS)], name=f"idp-{tag}",
                        log_path=workdir / f"idp-{tag}.log", env=full_env, cwd=REPO,
                        ready_line=r"^IDP_READY (\{.*\})$", ready_timeout=30)
    assert match is not None
    info = json.loads(match.group(1))
    return Idp(issuer=info["issuer"], port=info["port"], proc=proc, kids=info["kids"], env=full_env)


@pytest.fixture
def idp(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Any]:
    from tests.conftest import Factory

    factory = Factory(start_idp, tmp_path / "idp", request.node)
    try:
        yield factory
    finally:
        factory.stop_all()


# --------------------------------------------------------------------------- SDK helpers

class MemoryTokenStorage:
    """The SDK's ``TokenStorage`` in memory (one per client and AS instance)."""

    def __init__(self) -> None:
        self.tokens: OAuthToken | None = None
        self.client_info: OAuthClientInformationFull | None = None

    async def get_tokens(self) -> OAuthToken | None:
        return self.tokens

    async def set_tokens(self, tokens: OAuthToken) -> None:
        self.tokens = tokens

    async def get_client_info(self) -> OAuthClientInformationFull | None:
        return self.client_info

    async def set_client_info(self, client_info: OAuthClientInformationFull) -> None:
        self.client_info = client_info


class HeadlessBrowser:
    """Follows ``/auth`` -> ``/interaction/<uid>`` -> ... -> redirect_uri with a cookie jar.

    ``authorizations`` counts completed interactive authorizations; ``requested`` keeps
    the query of each authorization URL (scope, resource, code_challenge ...).
    """

    def __init__(self, login_hint: str | None = None) -> None:
        self.login_hint = login_hint
        self.authorizations = 0
        self.requested: list[dict[str, str]] = []
        self._result: AuthorizationCodeResult | None = None

    async def redirect(self, url: str) -> None:
        query = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(url).query))
        self.requested.append(query)
        if self.login_hint:
            url += "&" + urllib.parse.urlencode({"login_hint": self.login_hint})
        async with httpx2.AsyncClient(follow_redirects=False, timeout=10) as browser:
            for _ in range(20):
                resp = await browser.get(url)
                location = resp.headers.get("location")
                assert resp.status_code in (302, 303) and location, (resp.status_code, resp.text[:300])
                url = urllib.parse.urljoin(url, location)
                if url.startswith(REDIRECT_URI):
                    params = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(url).query))
                    assert "code" in params, params
                    self._result = AuthorizationCodeResult(code=params["code"], state=params.get("state"),
                                                           iss=params.get("iss"))
                    self.authorizations += 1
                    return
        raise AssertionError("authorization did not come back to the redirect URI")

    async def callback(self) -> AuthorizationCodeResult:
        assert self._result is not None, "the redirect handler did not complete"
        result, self._result = self._result, None
        return result


def oauth_provider(server_url: str, browser: HeadlessBrowser, storage: MemoryTokenStorage | None = None,
                   **metadata: Any) -> OAuthClientProvider:
    """The SDK's ``OAuthClientProvider`` wired to the headless browser (DCR, PKCE, resource)."""
    client_metadata = OAuthClientMetadata(
        client_name="mcp-gateway tests", redirect_uris=[REDIRECT_URI],
        grant_types=["authorization_code", "refresh_token"], response_types=["code"], **metadata)
    return OAuthClientProvider(server_url=server_url, client_metadata=client_metadata,
                               storage=storage or MemoryTokenStorage(),
                               redirect_handler=browser.redirect, callback_handler=browser.callback)


# --------------------------------------------------------------------------- leak guard

_JWT_SHAPE = re.compile(r"eyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.")
_BEARER = re.compile(r"[Bb]earer [A-Za-z0-9._~+/-]{8,}")


@pytest.fixture(autouse=True)
def no_token_in_gateway_logs(request: pytest.FixtureRequest) -> Iterator[None]:
    """After every test: no gateway process printed anything shaped like a JWT or a Bearer credential."""
    yield
    from tests.conftest import _PROCS_KEY

    for proc in request.node.stash.get(_PROCS_KEY, []):
        if not proc.name.startswith("gateway"):
            continue
        for line in proc.lines():
            assert not _JWT_SHAPE.search(line), f"{proc.name} logged a JWT: {line[:200]}"
            assert not _BEARER.search(line), f"{proc.name} logged a Bearer credential: {line[:200]}"
