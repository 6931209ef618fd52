"""A virtual server is a protected resource of its own: its RFC 9728 document and its audience.

In process, against a real loopback issuer (JWKS over HTTP) and real aiohttp requests: a
token issued for the virtual mount passes there and nowhere else; a token for an origin's
mount is refused at the virtual mount (``token_wrong_audience``).
"""
from __future__ import annotations

import orjson
import pytest
from aiohttp.test_utils import make_mocked_request
from cryptography.hazmat.primitives.asymmetric import ec

from gateway.auth.metadata import routes
from gateway.config.model import parse_config
from gateway.config.yamlloc import load_text
from gateway.errors import Unauthorized
from gateway.pipeline import Exchange
from gateway.stages.authn import Authn
from tests.test_auth_units import AS, issuer, public_jwk, session, sign  # noqa: F401  (fixtures)

CONFIG = """
listen: {{host: 127.0.0.1, port: 8080}}
admin: {{host: 127.0.0.1, port: 9464}}
public_url: http://127.0.0.1:8080
auth:
  issuers:
    - issuer: {issuer}
servers:
  ledger: {{url: http://127.0.0.1:3001/mcp}}
virtual_servers:
  finance:
    include: [{{server: ledger}}]
    auth: {{scopes: [finance:use]}}
"""
FINANCE = "http://127.0.0.1:8080/mcp/finance"
LEDGER = "http://127.0.0.1:8080/mcp/ledger"


def _config(issuer_url: str):
    node, problems = load_text(CONFIG.format(issuer=issuer_url), "gw.yaml")
    config = parse_config(node, "gw.yaml", problems, check_secrets=False)
    assert config is not None and not problems, problems
    return config


async def test_the_virtual_mount_publishes_its_own_protected_resource_metadata() -> None:
    config = _config("https://idp.example.com")
    by_path = {r.path: r for r in routes(config) if r.method == "GET"}
    route = by_path["/.well-known/oauth-protected-resource/mcp/finance"]
    response = await route.handler(make_mocked_request("GET", route.path))
    doc = orjson.loads(response.body)
    assert doc["resource"] == FINANCE
    assert doc["authorization_servers"] == ["https://idp.example.com"]
    assert doc["scopes_supported"] == ["finance:use"]


@pytest.mark.parametrize("audience,mount,accepted", [
    (FINANCE, "finance", True),
    (LEDGER, "finance", False),        # an origin's token does not open the virtual server
    (FINANCE, "ledger", False),        # nor the other way round
    (LEDGER, "ledger", True),
])
async def test_a_token_opens_only_the_mount_it_was_issued_for(issuer: AS, session, audience: str,  # noqa: F811
                                                              mount: str, accepted: bool) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    issuer.keys = [public_jwk(key, "k1", "ES256")]
    config = _config(issuer.issuer)
    authn = Authn(config)
    await authn.start(session)
    try:
        server = config.servers.get(mount) or config.virtual_servers[mount].mount
        token = sign(key, "ES256", iss=issuer.issuer, aud=audience)
        ex = Exchange(make_mocked_request("POST", f"/mcp/{mount}", headers={"Authorization": f"Bearer {token}"}),
                      server)
        if accepted:
            await authn.on_request(ex)
            assert ex.principal.subject == "alice"
        else:
            with pytest.raises(Unauthorized) as refused:
                await authn.on_request(ex)
            assert refused.value.reason == "token_wrong_audience"
    finally:
        await authn.close()
