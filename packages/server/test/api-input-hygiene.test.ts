/**
 * Input hygiene of the HTTP API against the real in-process server: every free-text field is
 * bounded and refuses characters that disguise text, numbers in paths and queries are decimal
 * digits only, validation errors are capped, framework errors (routing, URL and header size) answer
 * problem+json, request ids are bounded before they are stored, agent URLs are http(s), and the
 * OpenAPI document names the configured public URL. The broad sweep over every operation is
 * api-fuzz.test.ts; these are the cases it generalizes, each with the answer it must give.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { startControlPlane } from '@devyard/server/control-plane';
import { newSshKeyPair } from '@devyard/server/services/ssh-key-pairs';
import { rawHttp as sendRaw, type RawHttpAnswer } from './raw-http-client.js';
import { startTestControlPlane, until, type TestControlPlane } from './test-control-plane.js';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

let f: TestControlPlane;

interface RawAnswer {
  status: number;
  contentType: string | null;
  headers: Headers;
  text: string;
  body: Record<string, unknown> | undefined;
}

/** One request with fetch; the body is text (sent as JSON) so malformed and oversized bodies can be sent. */
async function call(method: string, path: string, opts: { body?: string; headers?: Record<string, string>; token?: string | null } = {}): Promise<RawAnswer> {
  const token = opts.token === undefined ? f.cp.tokens.adminToken : opts.token;
  const res = await fetch(f.cp.url + path, {
    method,
    headers: { ...(token ? { authorization: `Bearer ${token}` } : {}), ...(opts.body !== undefined ? { 'content-type': 'application/json' } : {}), ...opts.headers },
    body: opts.body,
  });
  const text = await res.text();
  let body: Record<string, unknown> | undefined;
  try {
    body = text ? (JSON.parse(text) as Record<string, unknown>) : undefined;
  } catch {}
  return { status: res.status, contentType: res.headers.get('content-type'), headers: res.headers, text, body };
}

/** A raw request to the server under test. */
const rawHttp = (request: string) => sendRaw(f.cp.url, request);

function expectProblem(r: { status: number; contentType: string | null; body: Record<string, unknown> | undefined }, status: number, code?: string): void {
  expect(r.status, JSON.stringify(r.body)?.slice(0, 500)).toBe(status);
  expect(r.contentType).toContain('application/problem+json');
  expect(typeof r.body?.code).toBe('string');
  if (code) expect(r.body?.code).toBe(code);
}

const fieldsOf = (r: RawAnswer) => ((r.body?.errors as Array<{ field: string }> | undefined) ?? []).map((e) => e.field);

beforeAll(async () => {
  f = await startTestControlPlane('hygiene', { cpuMillis: 64_000, memoryBytes: 64 * 1024 ** 3 });
  await f.user.createBox({ name: 'hy', template: 'tiny', resources: { cpu: '10m', memory: '16MiB' } });
});

afterAll(async () => {
  await f?.close();
});

describe('numbers in paths and queries', () => {
  it('parse as decimal digits only: hex, exponents, signs, spaces, fractions and leading zeros are errors, not other numbers', async () => {
    for (const port of ['0x1F', '1e1', '+22', '%2022', '22%20', '022', '-1', '1.0', '0b11', '0', '65536', '99999999999999999999', 'Infinity', '']) {
      const r = await call('PUT', `/v1/boxes/hy/ports/${port}`, { body: JSON.stringify({ visibility: 'org' }) });
      expectProblem(r, 400, 'invalid-input');
      expect(fieldsOf(r), port).toEqual(['path.port']);
      expectProblem(await call('DELETE', `/v1/boxes/hy/ports/${port}`), 400, 'invalid-input');
    }
    expect(await f.user.listBoxPorts('hy')).toEqual([]);
    for (const q of ['version=0x1', 'version=1e0', 'version=%201', 'version=01', 'version=-1', 'version=1.5']) {
      const r = await call('GET', `/v1/templates/tiny?${q}`);
      expectProblem(r, 400, 'invalid-input');
      expect(fieldsOf(r)).toEqual(['query.version']);
    }
    for (const q of ['limit=0x10', 'limit=1e2', 'afterSeq=0x0', 'afterSeq=-0', 'limit=10&limit=20']) expectProblem(await call('GET', `/v1/audit?${q}`), 400, 'invalid-input');
    // Decimal digits still work.
    expect((await f.user.setBoxPort('hy', 8080, 'org')).port).toBe(8080);
    expect((await f.user.getTemplate('tiny', 1)).version).toBe(1);
    expect((await call('GET', '/v1/audit?limit=5&afterSeq=0')).status).toBe(200);
    await f.user.resetBoxPort('hy', 8080);
  });
});

describe('validation errors', () => {
  it('are capped: a 200 KB body of bad elements answers a few KB, not megabytes, and counts what it left out', async () => {
    const capped = (r: RawAnswer, total: number) => {
      expectProblem(r, 400, 'invalid-input');
      expect(r.text.length).toBeLessThan(16 * 1024);
      expect((r.body!.errors as unknown[]).length).toBe(20);
      expect(r.body!.errorsOmitted).toBe(total - 20);
    };
    const activity = JSON.stringify({ gatewayId: 'g', endpoint: { url: 'http://127.0.0.1:1', sshHost: 'h', sshPort: 22, previewDomain: null }, activity: Array.from({ length: 100_000 }, () => 1) });
    expect(activity.length).toBeGreaterThan(190_000);
    capped(await call('POST', '/v1/gateway/sync', { token: f.cp.tokens.gatewayToken, body: activity }), 100_000);

    const env = JSON.stringify({ name: 'envy', template: 'tiny', env: Object.fromEntries(Array.from({ length: 20_000 }, (_, i) => [`${i}`, 'x'])) });
    expect(env.length).toBeGreaterThan(190_000);
    capped(await call('POST', '/v1/boxes', { body: env }), 20_000);

    const images = JSON.stringify({ images: Array.from({ length: 5_000 }, () => 1) });
    capped(await call('POST', `/v1/agent/nodes/${f.nodeId}/heartbeat`, { token: f.cp.tokens.nodeToken, body: images }), 5_000);
  });

  it('do not echo hostile input at length: a 100 KB unknown key is clipped in the answer', async () => {
    const key = 'k'.repeat(100_000);
    const r = await call('POST', '/v1/tokens', { body: `{"name":"t","${key}":1}` });
    expectProblem(r, 400, 'invalid-input');
    expect(r.text.length).toBeLessThan(4 * 1024);
  });
});

describe('free text', () => {
  const hostile = ['ok\u202egnp.exe', 'a\r\nb', 'a\nb', 'tab\there', 'nul\u0000', 'del\u007f', 'c1\u0085', 'isolate\u2066x\u2069', 'ls\u2028ps', '\ud800lone'];

  it('names and labels refuse control characters, bidirectional overrides, line breaks and lone surrogates', async () => {
    const tokensBefore = (await f.user.listTokens()).length;
    const keysBefore = (await f.user.listSshKeys()).length;
    const pub = newSshKeyPair().publicKey;
    for (const s of hostile) {
      const name = JSON.stringify(s);
      expectProblem(await call('POST', '/v1/tokens', { body: `{"name":${name}}` }), 400, 'invalid-input');
      expectProblem(await call('POST', '/v1/users/me/keys', { body: `{"publicKey":${JSON.stringify(pub)},"name":${name}}` }), 400, 'invalid-input');
      // The key's comment becomes its name; a tab there is whitespace between words of the comment.
      if (!s.startsWith('tab')) expectProblem(await call('POST', '/v1/users/me/keys', { body: `{"publicKey":${JSON.stringify(`${pub.trim()} ${s}`)}}` }), 400, 'invalid-input');
      expectProblem(await call('POST', '/v1/templates', { body: `{"name":"lbl","image":"tiny","ports":[{"port":80,"label":${name}}]}` }), 400, 'invalid-input');
      expectProblem(await call('POST', '/v1/templates', { body: `{"name":"dsc","image":"tiny","description":${JSON.stringify(`x${s.replace(/[\n\t]/g, '\u202e')}`)}}` }), 400, 'invalid-input');
      // A URL cannot carry a lone surrogate (percent-encoding is of UTF-8); the rest can.
      if (!/\p{Cs}/u.test(s)) expectProblem(await call('GET', `/v1/audit?actor=${encodeURIComponent(s)}`), 400, 'invalid-input');
    }
    expect((await f.user.listTokens()).length).toBe(tokensBefore);
    expect((await f.user.listSshKeys()).length).toBe(keysBefore);
    expect((await f.user.listTemplates()).map((t) => t.name)).not.toEqual(expect.arrayContaining(['lbl']));
    // Ordinary text, non-Latin scripts and emoji stay welcome.
    const t = await f.user.createToken({ name: 'CI token — déploiement 🚀 日本' });
    expect(t.info.name).toBe('CI token — déploiement 🚀 日本');
    await f.user.revokeToken(t.info.id);
  });

  it('bounds the environment: key count, key length, value size, no NUL, no prototype keys', async () => {
    const cases: Array<[string, Record<string, string> | string]> = [
      ['too many keys', Object.fromEntries(Array.from({ length: 300 }, (_, i) => [`K${i}`, 'v']))],
      ['long key', { ['K'.repeat(300)]: 'v' }],
      ['large value', { BIG: 'x'.repeat(40 * 1024) }],
      ['large multibyte value', { BIG: '€'.repeat(12 * 1024) }],
      ['NUL in value', { A: 'a\u0000b' }],
      ['__proto__', '{"__proto__":"x"}'],
      ['constructor.prototype', '{"constructor":{"prototype":{"polluted":"x"}}}'],
    ];
    for (const [label, env] of cases) {
      const envJson = typeof env === 'string' ? env : JSON.stringify(env);
      expectProblem(await call('POST', '/v1/boxes', { body: `{"name":"envy","template":"tiny","env":${envJson}}` }), 400);
      expectProblem(await call('POST', '/v1/templates', { body: `{"name":"envy","image":"tiny","env":${envJson}}` }), 400);
      void label;
    }
    expect((await f.user.listBoxes()).map((b) => b.name)).not.toContain('envy');
    expect((await f.user.listTemplates()).map((b) => b.name)).not.toContain('envy');
    expect(({} as Record<string, unknown>).polluted).toBeUndefined();
  });

  it('bounds what agents report: node names, labels, arch, images and status messages', async () => {
    const nodesBefore = (await f.user.listNodes()).map((n) => n.name).sort();
    const base = { name: 'agent-x', arch: 'x86_64', region: null, labels: {}, runtimes: ['sandbox'], capacity: { cpuMillis: 1000, memoryBytes: 1024 ** 3, diskBytes: 1024 ** 3 }, images: [], agentUrl: 'http://127.0.0.1:9' };
    const bad: Array<Record<string, unknown>> = [
      { name: 'node\u202e' },
      { name: 'a\r\nb' },
      { arch: 'x'.repeat(10_000) },
      { region: 'eu\u2066west' },
      { labels: { 'a\nb': 'v' } },
      { labels: { ok: 'v\u202e' } },
      { labels: { ok: 'v'.repeat(10_000) } },
      { labels: Object.fromEntries(Array.from({ length: 200 }, (_, i) => [`l${i}`, 'v'])) },
      { runtimes: ['x'.repeat(10_000)] },
      { images: ['tiny\u0000'] },
    ];
    for (const patch of bad) {
      const r = await call('POST', '/v1/agent/nodes', { token: f.cp.tokens.nodeToken, body: JSON.stringify({ ...base, ...patch }) });
      expectProblem(r, 400, 'invalid-input');
    }
    expect((await f.user.listNodes()).map((n) => n.name).sort()).toEqual(nodesBefore);
    const report = (extra: Record<string, unknown>) => JSON.stringify({ reports: [{ boxId: 'b_x', phase: 'running', observedGeneration: 1, operationId: 'op', ...extra }] });
    for (const extra of [{ message: 'm'.repeat(100_000) }, { error: 'e'.repeat(100_000) }, { boxId: 'b'.repeat(10_000) }, { operationId: 'o'.repeat(10_000) }, { ip: 'i'.repeat(10_000) }]) {
      expectProblem(await call('POST', `/v1/agent/nodes/${f.nodeId}/status`, { token: f.cp.tokens.nodeToken, body: report(extra) }), 400, 'invalid-input');
    }
  });
});

describe('agent URLs', () => {
  it('are http or https without credentials; file:, gopher:, javascript: and the like are refused', async () => {
    const nodesBefore = (await f.user.listNodes()).map((n) => n.name).sort();
    const base = { arch: 'x86_64', region: null, labels: {}, runtimes: ['sandbox'], capacity: { cpuMillis: 1000, memoryBytes: 1024 ** 3, diskBytes: 1024 ** 3 }, images: [] };
    const urls = ['file:///etc/passwd', 'gopher://127.0.0.1:70/_x', 'javascript:alert(1)', 'ftp://host/x', 'data:text/plain,x', 'ws://host:1', 'http://user:pw@host:1', 'http://host:1/?q=1', 'http://host:1/#f', `http://${'h'.repeat(3000)}:1`];
    for (const [i, agentUrl] of urls.entries()) {
      const r = await call('POST', '/v1/agent/nodes', { token: f.cp.tokens.nodeToken, body: JSON.stringify({ ...base, name: `evil-${i}`, agentUrl }) });
      expectProblem(r, 400, 'invalid-input');
      expect(fieldsOf(r), agentUrl).toEqual(['agentUrl']);
    }
    expect((await f.user.listNodes()).map((n) => n.name).sort()).toEqual(nodesBefore);
  });

  it('the gateway endpoint URL is http or https too', async () => {
    const r = await call('POST', '/v1/gateway/sync', { token: f.cp.tokens.gatewayToken, body: JSON.stringify({ gatewayId: 'g', endpoint: { url: 'file:///etc/passwd', sshHost: 'h', sshPort: 22, previewDomain: null } }) });
    expectProblem(r, 400, 'invalid-input');
  });
});

describe('request ids', () => {
  it('are kept only when short and of a safe charset; anything else is replaced before it is stored or echoed', async () => {
    const ids = ['r'.repeat(10_000), 'has spaces', 'quote"d', 'semi;colon', 'a'.repeat(129)];
    for (const id of ids) {
      const target = `hy-${Math.random().toString(36).slice(2)}`;
      const r = await call('DELETE', `/v1/tokens/${target}`, { headers: { 'x-request-id': id } });
      expectProblem(r, 404);
      const echoed = r.headers.get('x-request-id');
      expect(echoed).toMatch(/^[A-Za-z0-9._:+/=-]{1,128}$/);
      expect(echoed).not.toBe(id);
      const entry = await until(() => f.user.listAudit({ order: 'desc', limit: 20 }), (l) => l.some((e) => e.target === `token/${target}`));
      const stored = entry.find((e) => e.target === `token/${target}`)!.requestId;
      expect(stored).toBe(echoed);
    }
    const ok = await call('DELETE', '/v1/tokens/hy-kept', { headers: { 'x-request-id': 'req-7f3a_9.b:c' } });
    expect(ok.headers.get('x-request-id')).toBe('req-7f3a_9.b:c');
  });
});

describe('the OpenAPI document', () => {
  it('names the configured public URL in servers, never the Host header of the request', async () => {
    const r = await rawHttp('GET /v1/openapi.json HTTP/1.1\r\nHost: evil.example\r\nX-Forwarded-Host: evil2.example\r\nX-Forwarded-Proto: gopher\r\nConnection: close\r\n\r\n');
    expect(r.status).toBe(200);
    const doc = JSON.parse(r.body) as { servers?: Array<{ url: string }> };
    expect(doc.servers).toEqual([{ url: f.cp.url }]);
    expect(r.body).not.toContain('evil');
  });

  it('uses publicUrl when the server is configured with one', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'devyard-hygiene-pub-'));
    const cp = await startControlPlane({ dataDir: dir, publicUrl: 'https://devyard.example.com' });
    try {
      const doc = (await (await fetch(`${cp.url}/v1/openapi.json`)).json()) as { servers?: Array<{ url: string }> };
      expect(doc.servers).toEqual([{ url: 'https://devyard.example.com' }]);
    } finally {
      await cp.close();
      rmSync(dir, { recursive: true, force: true });
    }
  });
});

describe('framework errors answer problem+json', () => {
  const asAnswer = (r: RawHttpAnswer): RawAnswer => {
    let body: Record<string, unknown> | undefined;
    try {
      body = JSON.parse(r.body) as Record<string, unknown>;
    } catch {}
    return { status: r.status, contentType: r.headers['content-type'] ?? null, headers: new Headers(), text: r.body, body };
  };

  it('unknown routes and methods: 404', async () => {
    expectProblem(await call('GET', '/v1/nope'), 404, 'not-found');
    expectProblem(await call('PATCH', '/v1/boxes'), 404, 'not-found');
  });

  it('malformed percent-encoding in the path: 400', async () => {
    expectProblem(await call('GET', '/v1/boxes/%E0%A4%A'), 400, 'invalid-input');
  });

  it('a path parameter longer than any name: 414', async () => {
    expectProblem(await call('GET', `/v1/boxes/${'a'.repeat(300)}`), 414, 'uri-too-long');
  });

  it('a 20 KB URL: 414', async () => {
    expectProblem(await call('GET', `/v1/boxes?${'a'.repeat(20_000)}`), 414, 'uri-too-long');
    expectProblem(asAnswer(await rawHttp(`GET /v1/boxes?${'a'.repeat(20_000)} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n`)), 414, 'uri-too-long');
    expectProblem(await call('GET', `/v1/boxes?${'a'.repeat(9_000)}`), 414, 'uri-too-long');
  });

  it('a huge header: 431', async () => {
    expectProblem(await call('GET', '/v1/boxes', { headers: { 'x-big': 'a'.repeat(20_000) } }), 431, 'header-too-large');
    const many = Array.from({ length: 1000 }, (_, i) => `X-H${i}: ${'v'.repeat(20)}\r\n`).join('');
    expectProblem(asAnswer(await rawHttp(`GET /v1/boxes HTTP/1.1\r\nHost: x\r\n${many}Connection: close\r\n\r\n`)), 431, 'header-too-large');
  });

  it('requests HTTP cannot parse (duplicate Content-Length, a bare LF in a header, garbage): 400', async () => {
    expectProblem(asAnswer(await rawHttp('POST /v1/tokens HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}')), 400, 'bad-request');
    expectProblem(asAnswer(await rawHttp('GET /v1/boxes HTTP/1.1\r\nHost: x\r\nX-A: a\nb\r\n\r\n')), 400, 'bad-request');
    expectProblem(asAnswer(await rawHttp('GARBAGE\r\n\r\n')), 400, 'bad-request');
  });

  it('bodies: too large 413, malformed 400, wrong media type 415', async () => {
    expectProblem(await call('POST', '/v1/tokens', { body: JSON.stringify({ name: 'x'.repeat(2 * 1024 * 1024) }) }), 413, 'body-too-large');
    expectProblem(await call('POST', '/v1/tokens', { body: '{"name":' }), 400, 'invalid-input');
    expectProblem(await call('POST', '/v1/tokens', { body: '<xml/>', headers: { 'content-type': 'application/xml' } }), 415, 'unsupported-media-type');
  });
});
