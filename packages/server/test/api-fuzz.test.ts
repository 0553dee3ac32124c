/**
 * Fuzzes every operation of the OpenAPI document against the real in-process server: a new route
 * is covered as soon as it is in the route table. Per operation, some 150 requests (generated:
 * malformed and mistyped bodies, hostile strings, numbers as hex, exponents and signs, prototype
 * keys, hostile header values; fixed: an oversized body and abused HTTP heads sent raw, such as
 * duplicate and oversized headers, conflicting framing and control characters), sent with the
 * token kind the operation takes (an organization owner's for user routes, so authorization does
 * not short-circuit validation) and anonymously. Every answer must hold to:
 * - never a 5xx;
 * - an error is one of the media types the document declares for it (problem+json), with a `code`
 *   and the HTTP status, and small (validation errors are capped);
 * - a refused request changed nothing: temporary triggers log every insert, update and delete on
 *   every table of the store, except what refusals write by design (their own audit entry, which
 *   records the refusal, and the token's last-use time), and a refusal must leave that log as it was.
 *
 * The seed is fixed and printed; `DEVYARD_FUZZ_SEED` tries another one, `DEVYARD_FUZZ_RUNS`
 * changes how many requests each operation gets (the default keeps the file under a minute on a
 * slow two-core machine: the server answers a request in a few milliseconds there).
 */
import fc from 'fast-check';
import { sql, type Kysely } from 'kysely';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { buildOpenApiDocument } from '@devyard/api/openapi-document';
import { routeById, type OperationId } from '@devyard/api/routes';
import { rawHttp } from './raw-http-client.js';
import { startTestControlPlane, type TestControlPlane } from './test-control-plane.js';

const SEED = Number(process.env.DEVYARD_FUZZ_SEED ?? 20_240_611);
/** Requests per operation with the operation's own token kind; a quarter as many go anonymously. */
const RUNS = Number(process.env.DEVYARD_FUZZ_RUNS ?? 100);
const ANONYMOUS_RUNS = Math.ceil(RUNS / 4);
/** An error answer larger than this is an amplification (a small request, a large answer). */
const MAX_ERROR_BYTES = 32 * 1024;

type Json = Record<string, unknown>;
interface JsonSchema {
  $ref?: string;
  type?: string | string[];
  enum?: unknown[];
  const?: unknown;
  pattern?: string;
  minLength?: number;
  maxLength?: number;
  minimum?: number;
  maximum?: number;
  properties?: Record<string, JsonSchema>;
  required?: string[];
  additionalProperties?: JsonSchema | boolean;
  propertyNames?: JsonSchema;
  items?: JsonSchema;
  anyOf?: JsonSchema[];
  oneOf?: JsonSchema[];
  allOf?: JsonSchema[];
}
interface Parameter {
  name: string;
  in: 'path' | 'query' | 'header';
  schema: JsonSchema;
}
interface Operation {
  operationId: string;
  parameters: Parameter[];
  requestBody?: { content: Record<string, { schema: JsonSchema }> };
  responses: Record<string, { content?: Record<string, unknown> }>;
}
interface Walked {
  method: string;
  path: string;
  op: Operation;
}

// The document the server serves (checked in beforeAll) lists what is fuzzed; tests are declared
// before the server runs, so they are declared from the same generator.
const DOC = buildOpenApiDocument('http://fuzz.invalid') as { paths: Record<string, Record<string, Operation>>; components: { schemas: Record<string, JsonSchema> } };
// Reads first: they find the fixtures as set up, and an audit log not yet grown by the refusals
// of the writes (verifyAudit reads all of it on every call).
const OPERATIONS: Walked[] = Object.entries(DOC.paths)
  .flatMap(([path, methods]) => Object.entries(methods).map(([method, op]) => ({ method: method.toUpperCase(), path, op })))
  .sort((a, b) => Number(a.method !== 'GET') - Number(b.method !== 'GET') || a.op.operationId.localeCompare(b.op.operationId));

const resolve = (s: JsonSchema): JsonSchema => (s.$ref ? resolve(DOC.components.schemas[s.$ref.replace('#/components/schemas/', '')]!) : s);

// ---- what is sent ----

const LONG = 'x'.repeat(70_000);
const HOSTILE_TEXT = [
  '',
  ' ',
  'ok\u202egnp.exe',
  '\u2066x\u2069',
  '\u202a\u202b\u202c\u202d',
  'a\r\nb',
  'a\nSet-Cookie: x=1',
  '\r',
  '\t',
  '\u0000',
  'nul\u0000end',
  '\u0007\u0008',
  '\u001b[31mred\u001b[0m',
  '\u007f',
  '\u0085',
  '\u009b31m',
  '\u2028',
  '\u2029',
  '\ud800',
  '\udfff',
  'a\ud83d',
  '\ufeff',
  '\u200b',
  '\ufffd',
  '\uffff',
  'Ａｄｍｉｎ',
  'e\u0301',
  '😀',
  '\u{10ffff}',
  'İ',
  '../../etc/passwd',
  '..',
  '.',
  '%2e%2e%2f',
  '%00',
  '%',
  '${jndi:ldap://x/a}',
  "' OR 1=1 --",
  '<script>alert(1)</script>',
  '__proto__',
  'constructor',
  'prototype',
  'toString',
  'hasOwnProperty',
  'x'.repeat(300),
  'x'.repeat(4000),
];
const HOSTILE_NUMBERS = ['0x1F', '0X1f', '-1', '-0', '+1', ' 1', '1 ', '01', '1e3', '1E3', '1.5', '1.0', '.5', '0b11', '0o7', '99999999999999999999', '9007199254740993', 'NaN', 'Infinity', '0', '65536', '１２', '٣', '1_000', '1,000', '0x', ''];
const EDGE_JSON_NUMBERS = [0, -0, -1, 1.5, 1e308, -1e308, 2 ** 53, 2 ** 31, 2 ** 32 + 1, Number.MIN_VALUE, 65_536];
const MALFORMED_BODIES = [
  '{',
  '{"a":',
  '{"a":1,}',
  "{'a':1}",
  'nul',
  '\ufeff{}',
  '{"a":1}garbage',
  '[1,2',
  '['.repeat(20_000),
  '{"__proto__":{"polluted":true}}',
  '{"constructor":{"prototype":{"polluted":true}}}',
  '{"a":"\\ud800"}',
  '"\\u0000"',
  '1e999',
  '{"a":1,"a":2}',
  'NaN',
  '\u0000',
];
/** Over the body limit; sent once per operation (each one is a megabyte to move). */
const OVERSIZED_BODY = `{"k":"${'x'.repeat(1_100_000)}"}`;
const CONTENT_TYPES = ['application/json', 'application/json; charset=utf-8', 'application/json; charset=utf-16', 'text/plain', 'application/x-www-form-urlencoded', 'multipart/form-data; boundary=x', 'application/xml', 'application/json, text/plain', 'APPLICATION/JSON', ''];

const hostileText = fc.oneof(
  { weight: 4, arbitrary: fc.constantFrom(...HOSTILE_TEXT) },
  { weight: 2, arbitrary: fc.string({ maxLength: 40 }) },
  { weight: 2, arbitrary: fc.string({ unit: 'binary', maxLength: 20 }) },
  { weight: 1, arbitrary: fc.constantFrom(...HOSTILE_NUMBERS) },
);
/** Text for bodies: the same, and sometimes far longer than any field allows. */
const hostileBodyText = fc.oneof({ weight: 9, arbitrary: hostileText }, { weight: 1, arbitrary: fc.constant(LONG) });
const hostileKey = fc.oneof(hostileText, fc.constantFrom('__proto__', 'constructor', 'prototype', 'A', 'ok.key', 'x'.repeat(1000)));

function textFor(s: JsonSchema): fc.Arbitrary<string> {
  const min = s.minLength ?? 0;
  // Short strings mostly, but never shorter than the schema's minimum (a PKCE verifier is 43+).
  if (!s.pattern) return fc.string({ minLength: min, maxLength: Math.max(min, Math.min(s.maxLength ?? 20, 20)) });
  try {
    const re = new RegExp(s.pattern);
    const max = s.maxLength ?? 64;
    return fc.stringMatching(re).filter((v) => v.length <= max && v.length >= (s.minLength ?? 0));
  } catch {
    return fc.string({ maxLength: 20 });
  }
}

/** Values the schema allows (often) and values it does not (as often): both reach validation. */
function valueFor(schema: JsonSchema, depth = 0): fc.Arbitrary<unknown> {
  const s = resolve(schema);
  const wrong = fc.oneof(hostileBodyText, fc.constantFrom<unknown>(...EDGE_JSON_NUMBERS, true, false, null, [], {}, [null], { '': 1 }));
  let right: fc.Arbitrary<unknown>;
  const branches = s.anyOf ?? s.oneOf ?? s.allOf;
  const type = Array.isArray(s.type) ? s.type[0] : s.type;
  if (s.enum) right = fc.constantFrom(...s.enum);
  else if (s.const !== undefined) right = fc.constant(s.const);
  else if (branches && branches.length > 0) right = fc.oneof(...branches.map((b) => valueFor(b, depth + 1)));
  else if (type === 'string') right = textFor(s);
  else if (type === 'integer') right = fc.integer({ min: Math.max(s.minimum ?? -1000, -(2 ** 31)), max: Math.min(s.maximum ?? 1_000_000, 2 ** 31) });
  else if (type === 'number') right = fc.double({ noNaN: true, noDefaultInfinity: true, min: s.minimum ?? -1e6, max: s.maximum ?? 1e6 });
  else if (type === 'boolean') right = fc.boolean();
  else if (type === 'array') right = depth > 3 ? fc.constant([]) : fc.array(valueFor(s.items ?? {}, depth + 1), { maxLength: 4 });
  else if (type === 'object' || s.properties) right = depth > 3 ? fc.constant({}) : objectFor(s, depth + 1);
  else right = fc.jsonValue({ maxDepth: 2 });
  return fc.oneof({ weight: 3, arbitrary: right }, { weight: 2, arbitrary: wrong });
}

function objectFor(s: JsonSchema, depth: number): fc.Arbitrary<Json> {
  const props = Object.entries(s.properties ?? {});
  const known = fc.record(Object.fromEntries(props.map(([k, v]) => [k, valueFor(v, depth)])), { requiredKeys: [] }) as fc.Arbitrary<Json>;
  const extra = typeof s.additionalProperties === 'object' ? valueFor(s.additionalProperties, depth) : hostileBodyText;
  const extraKeys = s.propertyNames ? fc.oneof(textFor(resolve(s.propertyNames)), hostileKey) : hostileKey;
  const extras = fc.dictionary(extraKeys, extra, { maxKeys: typeof s.additionalProperties === 'object' ? 6 : 2 });
  return fc.tuple(known, fc.option(extras, { freq: 3 })).map(([k, e]) => ({ ...(e ?? {}), ...k }));
}

/** A body as sent: JSON of a schema-shaped object, any JSON, malformed text, prototype keys spliced in, or none. */
function bodyFor(op: Operation): fc.Arbitrary<string | undefined> {
  const schema = op.requestBody?.content['application/json']?.schema;
  const shaped = schema ? valueFor(schema).map((v) => JSON.stringify(v)) : fc.constant('{}');
  const withProto = shaped.map((text) => (text.startsWith('{') && text.length > 2 ? `{"__proto__":{"polluted":1},${text.slice(1)}` : text));
  return fc.oneof(
    { weight: schema ? 12 : 2, arbitrary: shaped },
    { weight: 2, arbitrary: fc.jsonValue({ maxDepth: 3 }).map((v) => JSON.stringify(v)) },
    { weight: 3, arbitrary: fc.constantFrom(...MALFORMED_BODIES) },
    { weight: 1, arbitrary: withProto },
    { weight: schema ? 1 : 4, arbitrary: fc.constantFrom(undefined, '', ' ') },
  );
}

/** A path or query value: a fixture that exists, one the schema allows, or a hostile one. */
function paramValue(p: Parameter, fixture: string | undefined): fc.Arbitrary<string> {
  const s = resolve(p.schema);
  const allowed = s.enum ? fc.constantFrom(...s.enum.map(String)) : s.type === 'string' ? textFor(s) : fc.integer({ min: 0, max: 70_000 }).map(String);
  return fc.oneof(
    { weight: fixture ? 4 : 0, arbitrary: fc.constant(fixture ?? '') },
    { weight: 3, arbitrary: allowed },
    { weight: 3, arbitrary: hostileText },
    { weight: 2, arbitrary: fc.constantFrom(...HOSTILE_NUMBERS) },
  );
}

/** Percent-encodes the UTF-8 bytes of a value (lone surrogates become U+FFFD, as any client sends them). */
function encode(v: string): string {
  return [...Buffer.from(v, 'utf8')].map((b) => (/[A-Za-z0-9_.~-]/.test(String.fromCharCode(b)) ? String.fromCharCode(b) : `%${b.toString(16).toUpperCase().padStart(2, '0')}`)).join('');
}

/**
 * A header value as bytes on the wire (UTF-8 read as latin1). fetch refuses control characters in
 * one; the raw requests below send those.
 */
const headerValue = (v: string) => Buffer.from(v, 'utf8').toString('latin1').replace(/[^\t\x20-\x7e\x80-\xff]/g, '');

interface FuzzRequest {
  method: string;
  url: string;
  headers: Record<string, string>;
  body: string | undefined;
}

type Identity = 'own' | 'anonymous';

// ---- the server and what it may change ----

let f: TestControlPlane;
let boxId: string;
const tokens = () => ({ user: f.cp.tokens.adminToken, node: f.cp.tokens.nodeToken, gateway: f.cp.tokens.gatewayToken, none: f.cp.tokens.adminToken });

function fixtures(w: Walked): Record<string, string> {
  const id = w.path.startsWith('/v1/agent/') ? f.nodeId : w.path.startsWith('/v1/gateway/') ? boxId : 't_missing';
  return { name: 'fz', team: 'fzteam', user: 'fzuser', id, port: '8080', scope: 'org' };
}

function requestFor(w: Walked, identity: Identity): fc.Arbitrary<FuzzRequest> {
  const auth = routeById(w.op.operationId as OperationId).auth;
  const fx = fixtures(w);
  const pathParams = w.op.parameters.filter((p) => p.in === 'path');
  const queryParams = w.op.parameters.filter((p) => p.in === 'query');
  const path = fc.tuple(...pathParams.map((p) => paramValue(p, fx[p.name]))).map((values) =>
    pathParams.reduce((acc, p, i) => acc.replace(`{${p.name}}`, encode(values[i]!)), w.path),
  );
  const query = fc
    .tuple(
      fc.tuple(...queryParams.map((p) => fc.option(paramValue(p, undefined), { freq: 2 }))),
      fc.array(fc.constantFrom('__proto__=x', '__proto__[polluted]=1', 'constructor[prototype][polluted]=1', 'a=1&a=2', 'watch=1&watch=0', '=', '&&', '%ZZ', 'x=%E0%A4%A'), { maxLength: 2 }),
    )
    .map(([values, extras]) => {
      const parts = queryParams.flatMap((p, i) => (values[i] === null ? [] : [`${p.name}=${encode(values[i]!)}`]));
      const all = [...parts, ...extras];
      return all.length ? `?${all.join('&')}` : '';
    });
  const authorization =
    identity === 'own'
      ? fc.constant(`Bearer ${tokens()[auth]}`)
      : fc.constantFrom(undefined, 'Bearer dy_u_forged', 'Bearer ', 'Basic YWRtaW46YWRtaW4=', `Bearer ${'t'.repeat(4000)}`, 'Bearer \u202e', `Bearer ${f.cp.tokens.adminToken} extra`);
  const headers = fc.record(
    {
      'if-match': fc.oneof(fc.constantFrom('"v1"', '*', 'W/"v1"', '"v99999999999999999999"', '"v0x1"', '"v1", "v2"'), hostileText),
      'idempotency-key': fc.oneof(hostileText, fc.constant('k'.repeat(300)), fc.constant('fuzz-key')),
      'x-request-id': fc.oneof(hostileText, fc.constant('r'.repeat(4000)), fc.constant('fuzz-req-1')),
      'last-event-id': fc.constantFrom(...HOSTILE_NUMBERS, '1', '0'),
      'content-type': fc.constantFrom(...CONTENT_TYPES),
      accept: fc.constantFrom('application/json', '*/*', 'text/event-stream', 'text/html', 'application/problem+json', ''),
      'x-forwarded-host': hostileText,
      'x-forwarded-proto': fc.constantFrom('gopher', 'https', 'javascript'),
      cookie: fc.constantFrom('devyard_oidc=x', `a=${'c'.repeat(2000)}`, '=;;=', 'devyard_oidc=%ZZ'),
    },
    { requiredKeys: [] },
  );
  return fc.tuple(path, query, headers, authorization, bodyFor(w.op)).map(([p, q, h, a, body]) => {
    const sent: Record<string, string> = {};
    for (const [k, v] of Object.entries(h)) if (v !== undefined) sent[k] = headerValue(v);
    if (body !== undefined && !('content-type' in sent)) sent['content-type'] = 'application/json';
    if (a !== undefined) sent.authorization = headerValue(a);
    // fetch cannot send a body with GET (and Node's server would ignore one).
    return { method: w.method, url: `${p}${q}`, headers: sent, body: w.method === 'GET' ? undefined : body };
  });
}

/** Rows inserted, updated or deleted since the change log was installed (by temporary triggers). */
async function changeCount(db: Kysely<unknown>): Promise<number> {
  return Number((await sql<{ n: number }>`SELECT COALESCE(MAX(id), 0) AS n FROM fuzz_changes`.execute(db)).rows[0]!.n);
}

async function changesSince(db: Kysely<unknown>, after: number): Promise<string[]> {
  return (await sql<{ tbl: string; op: string }>`SELECT tbl, op FROM fuzz_changes WHERE id > ${after} ORDER BY id`.execute(db)).rows.map((r) => `${r.op} ${r.tbl}`);
}

/**
 * Temporary triggers on every table of the store that log each insert, update and delete. Not
 * logged, because a refusal writes them by design: the refused request's own audit entry and the
 * chain head it moves (an audit entry of an accepted request, or any other audit write, is
 * logged), and a token's last-use time.
 */
async function installChangeLog(db: Kysely<unknown>): Promise<string[]> {
  const ignoredColumns: Record<string, string[]> = { api_tokens: ['last_used_at'] };
  // The head of each organization's hash chain moves with every entry, refusals' included.
  const ignoredTables = new Set(['audit_heads']);
  await sql`CREATE TEMP TABLE fuzz_changes (id INTEGER PRIMARY KEY AUTOINCREMENT, tbl TEXT NOT NULL, op TEXT NOT NULL)`.execute(db);
  const tables = (await sql<{ name: string }>`SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' AND name NOT LIKE 'kysely_%'`.execute(db)).rows.map((r) => r.name);
  for (const t of tables.filter((x) => !ignoredTables.has(x))) {
    const cols = (await sql<{ name: string }>`SELECT name FROM pragma_table_info(${t})`.execute(db)).rows.map((r) => r.name);
    const changed = cols
      .filter((c) => !(ignoredColumns[t] ?? []).includes(c))
      .map((c) => `NEW."${c}" IS NOT OLD."${c}"`)
      .join(' OR ');
    const log = (op: string) => `BEGIN INSERT INTO fuzz_changes (tbl, op) VALUES ('${t}', '${op}'); END`;
    const insertWhen = t === 'audit_log' ? `WHEN NEW.result = 'ok'` : '';
    await sql.raw(`CREATE TEMP TRIGGER "fuzz_ins_${t}" AFTER INSERT ON main."${t}" ${insertWhen} ${log('insert')}`).execute(db);
    await sql.raw(`CREATE TEMP TRIGGER "fuzz_upd_${t}" AFTER UPDATE ON main."${t}" WHEN ${changed || '0'} ${log('update')}`).execute(db);
    await sql.raw(`CREATE TEMP TRIGGER "fuzz_del_${t}" AFTER DELETE ON main."${t}" ${log('delete')}`).execute(db);
  }
  return tables;
}

const settle = () => new Promise((r) => setImmediate(r));
const clip = (s: string, n = 300) => (s.length > n ? `${s.slice(0, n)}… (${s.length} chars)` : s);

/** Checks one answer; returns what is wrong with it, or nothing. */
function verdict(w: Walked, status: number, contentType: string, body: string, changes: string[]): string | undefined {
  if (status === 0) return 'the connection closed without an answer';
  if (status >= 500) return `answered ${status}`;
  if (status >= 400) {
    const declared = Object.keys(w.op.responses.default?.content ?? {});
    const media = contentType.split(';')[0]!.trim().toLowerCase();
    if (!declared.includes(media)) return `an error as "${contentType}", not one of ${declared.join(', ')}`;
    if (media === 'application/problem+json') {
      let p: { code?: unknown; status?: unknown };
      try {
        p = JSON.parse(body) as typeof p;
      } catch {
        return 'a problem that is not JSON';
      }
      if (typeof p.code !== 'string' || p.code === '') return 'a problem without a code';
      if (p.status !== status) return `a problem whose status ${String(p.status)} is not the HTTP status`;
    }
    if (Buffer.byteLength(body) > MAX_ERROR_BYTES) return `an error answer of ${Buffer.byteLength(body)} bytes`;
    if (changes.length > 0) return `refused, but changed the store: ${[...new Set(changes)].join(', ')}`;
  }
  return undefined;
}

async function send(r: FuzzRequest): Promise<{ status: number; contentType: string; body: string }> {
  const res = await fetch(f.cp.url + r.url, { method: r.method, headers: r.headers, body: r.body, redirect: 'manual', signal: AbortSignal.timeout(15_000) });
  const contentType = res.headers.get('content-type') ?? '';
  if (contentType.startsWith('text/event-stream')) {
    await res.body?.cancel();
    return { status: res.status, contentType, body: '' };
  }
  return { status: res.status, contentType, body: await res.text() };
}

/** Runs one request and checks its answer and the store; throws with everything needed to reproduce it. */
async function exercise(w: Walked, r: FuzzRequest): Promise<void> {
  const db = f.cp.store.db as unknown as Kysely<unknown>;
  const before = await changeCount(db);
  let answer: { status: number; contentType: string; body: string };
  try {
    answer = await send(r);
  } catch (e) {
    throw new Error(`${r.method} ${clip(r.url)} failed: ${(e as Error).message} ${String((e as { cause?: unknown }).cause ?? '')}`);
  }
  await settle();
  const changes = answer.status >= 400 ? await changesSince(db, before) : [];
  const wrong = verdict(w, answer.status, answer.contentType, answer.body, changes);
  if (wrong) {
    throw new Error(
      `${wrong}\n  request: ${r.method} ${clip(r.url)}\n  headers: ${clip(JSON.stringify(r.headers))}\n  body: ${clip(JSON.stringify(r.body) ?? '(none)')}\n  answer: ${answer.status} ${answer.contentType} ${clip(answer.body)}`,
    );
  }
  // What an accepted write goes on to do (a membership change refreshing secrets) must not be
  // taken for the next request's doing.
  if (answer.status < 400 && r.method !== 'GET') await new Promise((res) => setTimeout(res, 5));
}

/** Header abuse fetch cannot send: duplicates, oversized and malformed heads, conflicting framing. */
function rawAbuse(w: Walked): string[] {
  const auth = `Authorization: Bearer ${tokens()[routeById(w.op.operationId as OperationId).auth]}\r\n`;
  const fx = fixtures(w);
  const target = w.path.replace(/\{(\w+)\}/g, (_, n: string) => fx[n] ?? 'x');
  const line = (t = target) => `${w.method} ${t} HTTP/1.1\r\nHost: fuzz\r\nConnection: close\r\n`;
  const json = 'Content-Type: application/json\r\n';
  return [
    `${line()}${auth}${json}Content-Length: 2\r\nContent-Length: 3\r\n\r\n{}`,
    `${line()}${auth}${json}Content-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n`,
    `${line()}${auth}${json}Transfer-Encoding: chunked\r\n\r\nZZ\r\n{}\r\n0\r\n\r\n`,
    `${line()}Host: evil.example\r\n${auth}\r\n`,
    `${line()}${auth}Authorization: Bearer dy_u_forged\r\n\r\n`,
    `${line()}${auth}Content-Type: text/plain\r\n${json}Content-Length: 2\r\n\r\n{}`,
    `${line()}${auth}X-Request-ID: a\r\nX-Request-ID: b\r\nIf-Match: "v1"\r\nIf-Match: "v2"\r\n\r\n`,
    `${line()}${auth}X-Big: ${'a'.repeat(20_000)}\r\n\r\n`,
    `${line(`${target}?${'q'.repeat(20_000)}`)}${auth}\r\n`,
    `${line(`${target}?${'q'.repeat(9_000)}`)}${auth}\r\n`,
    `${line()}${auth}${Array.from({ length: 1000 }, (_, i) => `X-H${i}: ${'v'.repeat(20)}\r\n`).join('')}\r\n`,
    `${line()}${auth}X-Folded: a\r\n b\r\n\r\n`,
    `${line()}${auth}X-Nul: a\u0000b\r\n\r\n`,
    `${line()}${auth}X-Request-ID: a\u0001\u001b[31mb\r\nIf-Match: "v\u0007"\r\n\r\n`,
    `${line()}${auth}X-Bidi: ${Buffer.from('a\u202eb', 'utf8').toString('latin1')}\r\n\r\n`,
    `${line(`${target}/${Buffer.from('\u202e', 'utf8').toString('latin1')}`)}${auth}\r\n`,
    `${line()}${auth}Bad Header: x\r\n\r\n`,
    `${w.method.toLowerCase()} ${target} HTTP/1.1\r\nHost: fuzz\r\nConnection: close\r\n\r\n`,
    `${w.method} ${target} HTTP/1.0\r\n${auth}\r\n`,
  ];
}

beforeAll(async () => {
  f = await startTestControlPlane('fuzz', { cpuMillis: 64_000, memoryBytes: 64 * 1024 ** 3 });
  boxId = (await f.user.createBox({ name: 'fz', template: 'tiny', resources: { cpu: '10m', memory: '16MiB' } })).id;
  await f.user.createTeam('fzteam');
  await f.user.createServiceAccount('fzuser', 'member');
  // The fuzz tests the HTTP surface: background loops would change the store on their own.
  await f.cp.warmPools.stop();
  await f.cp.reconciler.stop();
  const tables = await installChangeLog(f.cp.store.db as unknown as Kysely<unknown>);
  console.info(`api fuzz: seed ${SEED} (operation i uses seed ${SEED} + i; set DEVYARD_FUZZ_SEED to try another), ${RUNS} + ${ANONYMOUS_RUNS} requests per operation, ${OPERATIONS.length} operations, change log on ${tables.length} tables`);
}, 120_000);

afterAll(async () => {
  await f?.close();
});

describe('the fuzz harness', () => {
  it('walks the document the server serves', async () => {
    const served = (await (await fetch(`${f.cp.url}/v1/openapi.json`)).json()) as typeof DOC;
    const ids = (d: typeof DOC) => Object.values(d.paths).flatMap((m) => Object.values(m).map((op) => op.operationId)).sort();
    expect(ids(served)).toEqual(OPERATIONS.map((w) => w.op.operationId).sort());
  });

  it('sees a change to the store, so a refusal that writes cannot pass unseen', async () => {
    const db = f.cp.store.db as unknown as Kysely<unknown>;
    const before = await changeCount(db);
    const t = await f.user.createToken({ name: 'fuzz-probe' });
    await f.user.revokeToken(t.info.id);
    const seen = await changesSince(db, before);
    expect(seen).toEqual(expect.arrayContaining(['insert api_tokens', 'update api_tokens']));
    // And the verdict calls it out for a refusal.
    expect(verdict(OPERATIONS[0]!, 400, 'application/problem+json', '{"code":"x","status":400}', seen)).toMatch(/^refused, but changed the store/);
  });
});

describe.each(OPERATIONS.map((w, i) => [`${w.op.operationId} (${w.method} ${w.path})`, w, i] as const))('%s', (_name, w, i) => {
  it(`answers ${RUNS} generated requests with its own token and ${ANONYMOUS_RUNS} anonymous ones within the rules`, async () => {
    for (const [identity, runs, seed] of [['own', RUNS, SEED + i], ['anonymous', ANONYMOUS_RUNS, SEED + i + 100_000]] as const) {
      await fc.assert(
        fc.asyncProperty(requestFor(w, identity), (r) => exercise(w, r)),
        { seed, numRuns: runs, endOnFailure: true },
      );
    }
  });

  it('answers abused HTTP heads and an oversized body within the rules', async () => {
    const db = f.cp.store.db as unknown as Kysely<unknown>;
    if (w.method !== 'GET') {
      const fx = fixtures(w);
      const url = w.path.replace(/\{(\w+)\}/g, (_, n: string) => fx[n] ?? 'x');
      const auth = `Bearer ${tokens()[routeById(w.op.operationId as OperationId).auth]}`;
      await exercise(w, { method: w.method, url, headers: { authorization: auth, 'content-type': 'application/json' }, body: OVERSIZED_BODY });
    }
    for (const request of rawAbuse(w)) {
      const before = await changeCount(db);
      const a = await rawHttp(f.cp.url, request);
      await settle();
      const changes = a.status >= 400 ? await changesSince(db, before) : [];
      const wrong = verdict(w, a.status, a.headers['content-type'] ?? '', a.body, changes);
      expect(wrong, `${clip(JSON.stringify(request), 400)} → ${a.status} ${a.headers['content-type'] ?? ''} ${clip(a.body)}`).toBeUndefined();
      if (a.status < 400 && w.method !== 'GET') await new Promise((res) => setTimeout(res, 5));
    }
  });
});
