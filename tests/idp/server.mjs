// A real OAuth 2.1 authorization server for the tests: panva oidc-provider, configured
// the way ../shared/reference/idp.md established, with an auto-approve interaction
// handler so the MCP SDK's authorization-code flow runs headlessly.
//
//   IDP_PORT=0 node tests/idp/server.mjs
//   -> IDP_READY {"issuer":"http://127.0.0.1:41234","port":41234,"kids":["..."]}
//
// Binds 127.0.0.1 unless told otherwise. Environment (all optional):
//   IDP_PORT            port (0: the kernel picks; default 0)
//   IDP_HOST            address to bind (default 127.0.0.1; docker-compose.yml binds 0.0.0.0)
//   IDP_ISSUER          issuer URL (default http(s)://IDP_HOST:port): the name clients reach it by
//   IDP_TLS_CERT/KEY    PEM files: serve HTTPS (the gateway fetches JWKS over plain HTTP from
//                       loopback only, so the compose stack's AS on another host speaks TLS)
//   IDP_JWKS_FILE       keep the signing keys in this file (created when missing)
//   IDP_RESOURCES       JSON {"<resource url>": "scope scope"}: strict allow-list of resources
//   IDP_DEFAULT_SCOPES  scopes of any loopback resource when IDP_RESOURCES is unset
//                       (default "mcp:read mcp:write mcp:admin")
//   IDP_CLIENTS         JSON list of static clients (default: m2m-client / m2m-secret, client
//                       credentials + token exchange, and exchange-client / exchange-secret)
//   IDP_SUBJECT         account that logs in when the request has no login_hint (test-user)
//   IDP_DENY=1          end every authorization with access_denied (login_hint=deny does too)
//   IDP_DCR_PIN_SCOPE=1 keep `scope` in DCR bodies (oidc-provider then pins it per client)
//   IDP_TOKEN_TTL       access token lifetime in seconds (default 300)
//   IDP_CONTROL=1       enable POST /__test/rotate (new signing key first, old keys kept)
//                       and POST /__test/mint (sign arbitrary claims with the current key)
//                       and POST /__test/retire (only the current signing key stays published)
import crypto from "node:crypto";
import fs from "node:fs";
import http from "node:http";
import https from "node:https";

import * as jose from "jose";
import Provider, { errors } from "oidc-provider";

const HOST = process.env.IDP_HOST || "127.0.0.1";
const TLS = process.env.IDP_TLS_CERT && process.env.IDP_TLS_KEY
  ? { cert: fs.readFileSync(process.env.IDP_TLS_CERT), key: fs.readFileSync(process.env.IDP_TLS_KEY) } : null;
const env = process.env;
const TTL = Number(env.IDP_TOKEN_TTL || 300);
const SUBJECT = env.IDP_SUBJECT || "test-user";
const DEFAULT_SCOPES = env.IDP_DEFAULT_SCOPES || "mcp:read mcp:write mcp:admin";
const RESOURCES = env.IDP_RESOURCES ? JSON.parse(env.IDP_RESOURCES) : null;
const TOKEN_EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange";
const ACCESS_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:access_token";
const LOOPBACK_RESOURCE = /^https?:\/\/(127\.0\.0\.1|localhost|\[::1\])(:\d+)?(\/|$)/;

const CLIENTS = env.IDP_CLIENTS ? JSON.parse(env.IDP_CLIENTS) : [
  {
    client_id: "m2m-client", client_secret: "m2m-secret", redirect_uris: [], response_types: [],
    grant_types: ["client_credentials"], token_endpoint_auth_method: "client_secret_basic",
  },
  {
    client_id: "exchange-client", client_secret: "exchange-secret", redirect_uris: [], response_types: [],
    grant_types: ["client_credentials", TOKEN_EXCHANGE], token_endpoint_auth_method: "client_secret_basic",
  },
];

function newKey() {
  const { privateKey } = crypto.generateKeyPairSync("rsa", { modulusLength: 2048 });
  return { ...privateKey.export({ format: "jwk" }), kid: crypto.randomUUID(), alg: "RS256", use: "sig" };
}

function loadKeys() {
  if (env.IDP_JWKS_FILE && fs.existsSync(env.IDP_JWKS_FILE)) {
    return JSON.parse(fs.readFileSync(env.IDP_JWKS_FILE, "utf8")).keys;
  }
  const keys = [newKey()];
  saveKeys(keys);
  return keys;
}

function saveKeys(keys) {
  if (env.IDP_JWKS_FILE) fs.writeFileSync(env.IDP_JWKS_FILE, JSON.stringify({ keys }), { mode: 0o600 });
}

function resourceScopes(resource) {
  if (RESOURCES) return Object.hasOwn(RESOURCES, resource) ? RESOURCES[resource] : null;
  return LOOPBACK_RESOURCE.test(resource) ? DEFAULT_SCOPES : null;
}

function allScopes() {
  const scopes = new Set(["openid", "offline_access"]);
  const lists = RESOURCES ? Object.values(RESOURCES) : [DEFAULT_SCOPES];
  for (const list of lists) for (const s of list.split(" ")) if (s) scopes.add(s);
  return [...scopes];
}

function buildProvider(issuer, keys) {
  const provider = new Provider(issuer, {
    jwks: { keys },
    clients: CLIENTS,
    scopes: allScopes(), // pitfall 2: resource scopes must be AS scopes too, or DCR refuses them
    responseTypes: ["code"],
    pkce: { required: () => true },
    clientDefaults: { grant_types: ["authorization_code", "refresh_token"], response_types: ["code"] },
    features: {
      devInteractions: { enabled: false },
      clientCredentials: { enabled: true },
      introspection: { enabled: true, allowedPolicy: async () => true },
      revocation: { enabled: true },
      registration: {
        enabled: true,
        // Pitfall 1: a DCR `scope` becomes a per-client allow-list and breaks step-up.
        idFactory(ctx) {
          if (!env.IDP_DCR_PIN_SCOPE && ctx.oidc?.body) delete ctx.oidc.body.scope;
          return crypto.randomUUID();
        },
      },
      resourceIndicators: {
        enabled: true,
        defaultResource: async (_ctx, _client, oneOf) => oneOf,
        useGrantedResource: async () => true,
        getResourceServerInfo: async (_ctx, resource) => {
          const scope = resourceScopes(resource);
          if (scope === null) throw new errors.InvalidTarget();
          return { scope, audience: resource, accessTokenFormat: "jwt", accessTokenTTL: TTL,
                   jwt: { sign: { alg: "RS256" } } };
        },
      },
    },
    ttl: { AccessToken: TTL, ClientCredentials: TTL, Interaction: 600, Session: 3600, Grant: 3600,
           RefreshToken: 86400, AuthorizationCode: 60 },
    rotateRefreshToken: true,
    findAccount: async (_ctx, sub) => ({ accountId: sub, claims: async () => ({ sub }) }),
    renderError: async (ctx, out) => {
      ctx.type = "application/json";
      ctx.body = JSON.stringify(out);
    },
  });
  provider.registerGrantType(TOKEN_EXCHANGE, tokenExchange(provider),
                             ["subject_token", "subject_token_type", "resource", "audience", "scope",
                              "requested_token_type"]);
  provider.on("server_error", (_ctx, err) => console.error("server_error", err));
  return provider;
}

// RFC 8693 token exchange (oidc-provider has no built-in grant for it): the authenticated
// client trades a subject token this AS issued for a token for `resource`, on behalf of its sub.
function tokenExchange(provider) {
  return async function handler(ctx) {
    const { params, client } = ctx.oidc;
    if (params.subject_token_type !== ACCESS_TOKEN_TYPE) {
      throw new errors.InvalidRequest("subject_token_type must be an access token");
    }
    let subject;
    try {
      const jwks = jose.createLocalJWKSet({ keys: state.keys.map(publicJwk) });
      ({ payload: subject } = await jose.jwtVerify(params.subject_token, jwks, { issuer: state.issuer }));
    } catch {
      throw new errors.InvalidGrant("subject_token is invalid");
    }
    const resource = params.resource || params.audience;
    const allowed = resource ? resourceScopes(resource) : null;
    if (allowed === null) throw new errors.InvalidTarget();
    const wanted = (params.scope || subject.scope || allowed).split(" ");
    const scope = wanted.filter((s) => allowed.split(" ").includes(s)).join(" ");
    const now = Math.floor(Date.now() / 1000);
    const key = await jose.importJWK(state.keys[0], "RS256");
    const token = await new jose.SignJWT({
      sub: subject.sub, scope, client_id: client.clientId, act: { sub: client.clientId },
      jti: crypto.randomUUID(),
    }).setProtectedHeader({ alg: "RS256", typ: "at+jwt", kid: state.keys[0].kid })
      .setIssuer(state.issuer).setAudience(resource).setIssuedAt(now).setExpirationTime(now + TTL)
      .sign(key);
    exchanges.push({ client: client.clientId, sub: subject.sub, subject_aud: subject.aud, resource });
    ctx.body = { access_token: token, issued_token_type: ACCESS_TOKEN_TYPE, token_type: "Bearer",
                 expires_in: TTL, scope };
  };
}

function publicJwk({ kty, n, e, kid, alg, use }) {
  return { kty, n, e, kid, alg, use };
}

const state = { provider: null, issuer: null, keys: null, callback: null };
const exchanges = [];

async function finishInteraction(provider, req, res) {
  const details = await provider.interactionDetails(req, res);
  const { prompt, params, session, grantId } = details;
  const deny = env.IDP_DENY === "1" || params.login_hint === "deny";
  if (deny) {
    return provider.interactionFinished(req, res, { error: "access_denied", error_description: "denied by test" },
                                        { mergeWithLastSubmission: false });
  }
  if (prompt.name === "login") {
    const accountId = params.login_hint || SUBJECT;
    return provider.interactionFinished(req, res, { login: { accountId } }, { mergeWithLastSubmission: false });
  }
  // consent: grant every missing OIDC scope, claim and resource scope that was asked for
  const grant = grantId ? await provider.Grant.find(grantId)
    : new provider.Grant({ accountId: session.accountId, clientId: params.client_id });
  const { missingOIDCScope, missingOIDCClaims, missingResourceScopes } = prompt.details;
  if (missingOIDCScope) grant.addOIDCScope(missingOIDCScope.join(" "));
  if (missingOIDCClaims) grant.addOIDCClaims(missingOIDCClaims);
  if (missingResourceScopes) {
    for (const [indicator, scopes] of Object.entries(missingResourceScopes)) {
      grant.addResourceScope(indicator, scopes.join(" "));
    }
  }
  const id = await grant.save();
  return provider.interactionFinished(req, res, { consent: { grantId: id } }, { mergeWithLastSubmission: true });
}

function json(res, status, body) {
  res.writeHead(status, { "Content-Type": "application/json" });
  res.end(JSON.stringify(body));
}

async function readBody(req) {
  const chunks = [];
  for await (const chunk of req) chunks.push(chunk);
  return chunks.length ? JSON.parse(Buffer.concat(chunks).toString("utf8")) : {};
}

async function control(req, res, path) {
  if (path === "/__test/rotate") {
    state.keys = [newKey(), ...state.keys];
    saveKeys(state.keys);
    install(buildProvider(state.issuer, state.keys));
    console.log(`IDP_ROTATED ${JSON.stringify({ kids: state.keys.map((k) => k.kid) })}`);
    return json(res, 200, { kids: state.keys.map((k) => k.kid) });
  }
  if (path === "/__test/retire") {
    // The end of a rotation: every key but the current one leaves the JWKS.
    state.keys = [state.keys[0]];
    saveKeys(state.keys);
    install(buildProvider(state.issuer, state.keys));
    console.log(`IDP_RETIRED ${JSON.stringify({ kids: state.keys.map((k) => k.kid) })}`);
    return json(res, 200, { kids: state.keys.map((k) => k.kid) });
  }
  if (path === "/__test/mint") {
    // Sign arbitrary claims/header with the current key (for claim-level edge cases).
    // Signed by hand: jose refuses headers such as an unknown `crit`, which is the point here.
    const { header = {}, claims = {} } = await readBody(req);
    const b64url = (obj) => Buffer.from(JSON.stringify(obj)).toString("base64url");
    const input = `${b64url({ alg: "RS256", typ: "at+jwt", kid: state.keys[0].kid, ...header })}.${b64url(claims)}`;
    const key = crypto.createPrivateKey({ key: state.keys[0], format: "jwk" });
    const signature = crypto.sign("RSA-SHA256", Buffer.from(input), key).toString("base64url");
    return json(res, 200, { token: `${input}.${signature}` });
  }
  if (path === "/__test/exchanges") return json(res, 200, exchanges);
  return json(res, 404, { error: "not_found" });
}

function install(provider) {
  state.provider = provider;
  state.callback = provider.callback();
}

const handler = async (req, res) => {
  try {
    const path = new URL(req.url, state.issuer).pathname;
    if (env.IDP_CONTROL === "1" && req.method === "POST" && path.startsWith("/__test/")) {
      return await control(req, res, path);
    }
    const m = /^\/interaction\/([^/]+)$/.exec(path);
    if (m && req.method === "GET") return await finishInteraction(state.provider, req, res);
    return state.callback(req, res);
  } catch (err) {
    console.error("request failed", err);
    if (!res.headersSent) json(res, 500, { error: "server_error", error_description: String(err.message) });
  }
};
const server = TLS ? https.createServer(TLS, handler) : http.createServer(handler);

server.listen(Number(env.IDP_PORT || 0), HOST, () => {
  const { port } = server.address();
  // pitfall 4: at the root, no trailing slash
  state.issuer = env.IDP_ISSUER || `${TLS ? "https" : "http"}://${HOST}:${port}`;
  state.keys = loadKeys();
  install(buildProvider(state.issuer, state.keys));
  console.log(`IDP_READY ${JSON.stringify({ issuer: state.issuer, port, kids: state.keys.map((k) => k.kid) })}`);
});

for (const sig of ["SIGTERM", "SIGINT"]) process.on(sig, () => server.close(() => process.exit(0)));
