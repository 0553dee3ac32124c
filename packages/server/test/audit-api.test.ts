/**
 * The audit log through a real control plane: what API requests and the reconciler record, the
 * JSON Lines export, verification over HTTP after the database file was edited, and the CLI
 * (in process) on top. The node agent is a scripted double speaking the real protocol.
 */
import { createHash } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import SqliteDb from 'better-sqlite3';
import { afterAll, afterEach, beforeAll, describe, expect, it, vi } from 'vitest';
import type { AuditEntry } from '@devyard/api/audit-schemas';
import { ROUTES, routeById } from '@devyard/api/routes';
import { DevyardClient } from '@devyard/sdk/devyard-client';
import { canonicalJson, GENESIS_HASH } from '@devyard/server/audit/audit-log';
import type { ControlPlane } from '@devyard/server/control-plane';
import { startTestControlPlane, until, type TestControlPlane } from './test-control-plane.js';
import { auditResult, auditTarget, UNAUDITED_OPERATIONS } from '@devyard/server/http/audit-hook';
import { main } from '@devyard/cli/main';

let dir: string;
let cp: ControlPlane;
let user: DevyardClient;
let node: DevyardClient;
let nodeId: string;

async function raw(method: string, path: string, opts: { body?: unknown; headers?: Record<string, string>; token?: string | null } = {}) {
  const token = opts.token === undefined ? cp.tokens.adminToken : opts.token;
  const res = await fetch(cp.url + path, {
    method,
    headers: { ...(token ? { authorization: `Bearer ${token}` } : {}), ...(opts.body !== undefined ? { 'content-type': 'application/json' } : {}), ...opts.headers },
    body: opts.body === undefined ? undefined : typeof opts.body === 'string' ? opts.body : JSON.stringify(opts.body),
  });
  const text = await res.text();
  return { status: res.status, headers: res.headers, text };
}


/** The entry of one request (the hook writes after the response, so poll briefly). */
const byRequest = (requestId: string) => until(() => user.listAudit({ limit: 1000 }), (l) => l.some((e) => e.requestId === requestId)).then((l) => l.find((e) => e.requestId === requestId)!);

async function agentConverges(): Promise<void> {
  const set = await node.getDesiredSet(nodeId);
  await node.reportStatus(
    nodeId,
    set.boxes.map((b) => ({ boxId: b.boxId, phase: b.desiredState, observedGeneration: b.generation, operationId: b.operationId, ip: '10.0.0.2', error: null, message: '' })),
  );
}

/** Runs the CLI in process; answers its exit code and output. */
async function cli(...args: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  let stdout = '';
  let stderr = '';
  const out = vi.spyOn(process.stdout, 'write').mockImplementation((s) => ((stdout += String(s)), true));
  const err = vi.spyOn(process.stderr, 'write').mockImplementation((s) => ((stderr += String(s)), true));
  const env = { url: process.env.DEVYARD_URL, token: process.env.DEVYARD_TOKEN };
  process.env.DEVYARD_URL = cp.url;
  process.env.DEVYARD_TOKEN = cp.tokens.adminToken;
  process.exitCode = 0;
  try {
    await main(['node', 'devyard', ...args]);
  } finally {
    out.mockRestore();
    err.mockRestore();
    process.env.DEVYARD_URL = env.url;
    process.env.DEVYARD_TOKEN = env.token;
    if (env.url === undefined) delete process.env.DEVYARD_URL;
    if (env.token === undefined) delete process.env.DEVYARD_TOKEN;
  }
  const code = Number(process.exitCode ?? 0);
  process.exitCode = 0;
  return { code, stdout, stderr };
}

let fixture: TestControlPlane;

beforeAll(async () => {
  fixture = await startTestControlPlane('audit-api', { cpuMillis: 4000, memoryBytes: 8 * 1024 ** 3 });
  ({ dir, cp, user, node, nodeId } = fixture);
});

afterAll(async () => {
  await fixture?.close();
});

afterEach(() => {
  vi.restoreAllMocks();
});

describe('targets and results', () => {
  it('names the target from the path, or from the body of a create', () => {
    expect(auditTarget(routeById('stopBox'), { name: 'demo' }, undefined)).toBe('box/demo');
    expect(auditTarget(routeById('setBoxPort'), { name: 'demo', port: '3000' }, { visibility: 'org' })).toBe('box/demo/port/3000');
    expect(auditTarget(routeById('removeSshKey'), { id: 'k_1' }, undefined)).toBe('key/k_1');
    expect(auditTarget(routeById('createTemplate'), {}, { name: 'web', image: 'tiny' })).toBe('template/web');
    expect(auditTarget(routeById('createBox'), {}, 'not an object')).toBe('box');
    expect(auditTarget(routeById('addSshKey'), {}, { publicKey: 'ssh-ed25519 AAAA', name: 'laptop' })).toBe('key');
    expect(auditTarget(routeById('wakeBox'), { id: 'b_1' }, { subject: 'alice' })).toBe('box/b_1');
    expect(auditTarget(routeById('createAccessToken'), {}, {})).toBe('access-token');
    expect(auditTarget(routeById('cordonNode'), { name: 'x'.repeat(500) }, undefined)!.length).toBeLessThan(220);
    expect([200, 202, 204, 302].map(auditResult)).toEqual(['ok', 'ok', 'ok', 'ok']);
    expect([401, 403, 404].map(auditResult)).toEqual(['denied', 'denied', 'denied']);
    expect([400, 409, 412, 413, 500, 503].map(auditResult).every((r) => r === 'error')).toBe(true);
    expect([...UNAUDITED_OPERATIONS].sort()).toEqual(['heartbeatNode', 'redeemOidcLogin', 'reportStatus', 'syncGateway']);
  });
});

describe('what the API records', () => {
  it('create, verb and delete: actor, action, target, result, request id, source', async () => {
    expect((await raw('POST', '/v1/boxes', { body: { name: 'aud1', template: 'tiny' }, headers: { 'x-request-id': 'req-create' } })).status).toBe(202);
    await until(() => user.getBox('aud1'), (b) => b.node === 'node-a');
    await agentConverges();
    expect((await raw('POST', '/v1/boxes/aud1/stop', { headers: { 'x-request-id': 'req-stop' } })).status).toBe(202);
    expect((await raw('DELETE', '/v1/boxes/aud1', { headers: { 'x-request-id': 'req-delete' } })).status).toBe(202);

    const create = await byRequest('req-create');
    expect(create).toMatchObject({ actor: 'admin', action: 'createBox', target: 'box/aud1', result: 'ok', source: '127.0.0.1', detail: null, org: 'org_default' });
    expect(await byRequest('req-stop')).toMatchObject({ actor: 'admin', action: 'stopBox', target: 'box/aud1', result: 'ok' });
    expect(await byRequest('req-delete')).toMatchObject({ actor: 'admin', action: 'deleteBox', target: 'box/aud1', result: 'ok' });
    const reg = (await user.listAudit({ limit: 1000 })).find((e) => e.action === 'registerNode');
    expect(reg).toMatchObject({ actor: 'node', target: 'node/node-a', result: 'ok' });
  });

  it("records in the organization affected: an organization's creation, an invitation accepted, a box woken by a gateway", async () => {
    const inOrg = async (name: string) => (await cp.store.db.selectFrom('orgs').select('id').where('name', '=', name).executeTakeFirstOrThrow()).id;
    expect((await raw('POST', '/v1/orgs', { body: { name: 'audited' }, headers: { 'x-request-id': 'req-org' } })).status).toBe(201);
    const audited = await inOrg('audited');
    expect((await cp.audit.list({ orgId: audited, limit: 10 })).find((e) => e.requestId === 'req-org')).toMatchObject({ actor: 'admin', action: 'createOrg', result: 'ok' });
    // An invitation into it, accepted by a member of the default organization.
    const inAudited = new DevyardClient({ url: cp.url, token: (await user.createToken({ name: 'audited', org: 'audited' })).token });
    const invite = await inAudited.createInvitation('member');
    const joiner = (await user.createServiceAccount('joiner', 'member')).token;
    expect((await raw('POST', '/v1/invitations/accept', { token: joiner, body: { token: invite.token }, headers: { 'x-request-id': 'req-join' } })).status).toBe(200);
    expect((await cp.audit.list({ orgId: audited, limit: 10 })).find((e) => e.requestId === 'req-join')).toMatchObject({ actor: 'joiner', action: 'acceptInvitation' });
    // A gateway wakes a box of that organization for a user who connected.
    await inAudited.createBox({ name: 'sleepy', template: 'tiny' });
    const box = await inAudited.boxVerb('sleepy', 'stop');
    expect((await raw('POST', `/v1/gateway/boxes/${box.id}/wake`, { token: cp.tokens.gatewayToken, body: { subject: 'admin' }, headers: { 'x-request-id': 'req-wake' } })).status).toBe(202);
    expect((await cp.audit.list({ orgId: audited, limit: 10 })).find((e) => e.requestId === 'req-wake')).toMatchObject({ actor: 'gateway', action: 'wakeBox', detail: { onBehalfOf: 'admin' } });
    expect((await cp.audit.list({ orgId: 'org_default', limit: 1000 })).filter((e) => ['req-org', 'req-join', 'req-wake'].includes(e.requestId ?? ''))).toEqual([]);
  });

  it('records refused requests: bad token, wrong token kind, invalid input, unknown box', async () => {
    expect((await raw('POST', '/v1/boxes', { body: { name: 'x', template: 'tiny' }, token: 'dy_u_forged', headers: { 'x-request-id': 'req-forged' } })).status).toBe(401);
    expect(await byRequest('req-forged')).toMatchObject({ actor: 'anonymous', action: 'createBox', target: 'box/x', result: 'denied', detail: { status: 401, code: 'unauthenticated' } });
    expect((await raw('POST', '/v1/templates', { body: { name: 'x', image: 'tiny' }, token: null, headers: { 'x-request-id': 'req-none' } })).status).toBe(401);
    expect(await byRequest('req-none')).toMatchObject({ actor: 'anonymous', action: 'createTemplate', result: 'denied' });
    expect((await raw('POST', '/v1/boxes/whatever/start', { token: cp.tokens.nodeToken, headers: { 'x-request-id': 'req-kind' } })).status).toBe(403);
    // The token exists but is of the wrong kind: its subject is the actor.
    expect(await byRequest('req-kind')).toMatchObject({ actor: 'node', action: 'startBox', target: 'box/whatever', result: 'denied', detail: { status: 403, code: 'forbidden', tokenId: expect.any(String) } });
    expect((await raw('POST', '/v1/boxes', { body: { name: 'Bad_Name', template: 'tiny' }, headers: { 'x-request-id': 'req-invalid' } })).status).toBe(400);
    expect(await byRequest('req-invalid')).toMatchObject({ actor: 'admin', action: 'createBox', result: 'error', detail: { status: 400, code: 'invalid-input' } });
    expect((await raw('POST', '/v1/boxes', { body: '{"name":', headers: { 'x-request-id': 'req-malformed' } })).status).toBe(400);
    expect(await byRequest('req-malformed')).toMatchObject({ action: 'createBox', result: 'error', detail: { status: 400 } });
    expect((await raw('DELETE', '/v1/boxes/nope', { headers: { 'x-request-id': 'req-missing' } })).status).toBe(404);
    expect(await byRequest('req-missing')).toMatchObject({ actor: 'admin', action: 'deleteBox', target: 'box/nope', result: 'denied', detail: { status: 404, code: 'not-found' } });
  });

  it('does not record reads nor the agents’ and gateways’ periodic calls', async () => {
    const before = (await cp.audit.list({ orgId: 'org_default', order: 'desc', limit: 1 }))[0]!.seq;
    await node.heartbeat(nodeId);
    await agentConverges();
    await user.listBoxes();
    await raw('GET', '/v1/boxes', { headers: { 'x-request-id': 'req-read' } });
    const gateway = new DevyardClient({ url: cp.url, token: cp.tokens.gatewayToken });
    await gateway.syncGateway({ gatewayId: 'gw-audit', endpoint: { url: 'http://127.0.0.1:1', sshHost: '127.0.0.1', sshPort: 2222, previewDomain: null }, activity: [] });
    await new Promise((r) => setTimeout(r, 100));
    const after = await cp.audit.list({ orgId: 'org_default', afterSeq: before, limit: 1000 });
    expect(after.map((e) => e.action).filter((a) => ['heartbeatNode', 'reportStatus', 'syncGateway', 'listBoxes'].includes(a))).toEqual([]);
  });

  it('records what the reconciler does as system:box-reconciler', async () => {
    await user.createBox({ name: 'aud2', template: 'tiny' });
    await until(() => user.getBox('aud2'), (b) => b.node === 'node-a');
    await agentConverges();
    await user.deleteBox('aud2');
    await agentConverges();
    const entries = await until(
      () => user.listAudit({ actor: 'system:box-reconciler', limit: 1000 }),
      (l) => l.some((e) => e.action === 'finalizeBoxDelete' && e.target === 'box/aud2'),
    );
    const placed = entries.find((e) => e.action === 'scheduleBox' && e.target === 'box/aud2');
    expect(placed).toMatchObject({ result: 'ok', source: null, requestId: null, detail: { node: 'node-a', owner: 'admin' } });
    expect(entries.every((e) => e.actor === 'system:box-reconciler')).toBe(true);
  });
});

describe('what the warm pool records', () => {
  it('creates and retires pool boxes as system:warm-pool', async () => {
    await user.createTemplate({ name: 'pooled', image: 'tiny', runtime: 'sandbox', warmPoolSize: 1 });
    cp.warmPools.kick(); // rather than waiting for its period
    const created = await until(
      () => user.listAudit({ actor: 'system:warm-pool', limit: 1000 }),
      (l) => l.some((e) => e.action === 'createBox' && e.detail?.template === 'pooled'),
    );
    const entry = created.find((e) => e.action === 'createBox')!;
    expect(entry).toMatchObject({ result: 'ok', detail: { templateVersion: 1 } });
    expect(entry.target).toMatch(/^box\/pool-pooled-/);
    await user.createTemplate({ name: 'pooled', image: 'tiny', runtime: 'sandbox', warmPoolSize: 1, description: 'v2' });
    cp.warmPools.kick();
    const retired = await until(
      () => user.listAudit({ actor: 'system:warm-pool', limit: 1000 }),
      (l) => l.some((e) => e.action === 'deleteBox' && e.target === entry.target),
    );
    expect(retired.find((e) => e.action === 'deleteBox')!.detail).toMatchObject({ reason: 'superseded by pooled v2' });
  });
});

describe('reading the log', () => {
  it('filters by actor, time and limit; newest first on request', async () => {
    const all = await user.listAudit({ limit: 1000 });
    expect(all.map((e) => e.seq)).toEqual(all.map((_, i) => i + 1));
    expect((await user.listAudit({ actor: 'anonymous' })).every((e) => e.actor === 'anonymous')).toBe(true);
    const newest = await user.listAudit({ order: 'desc', limit: 2 });
    expect(newest.map((e) => e.seq)).toEqual([all.length, all.length - 1]);
    expect((await user.listAudit({ since: new Date(Date.now() + 60_000).toISOString() })).length).toBe(0);
    expect((await raw('GET', '/v1/audit?since=yesterday')).status).toBe(400);
    expect((await raw('GET', '/v1/audit?limit=0')).status).toBe(400);
  });

  it('exports JSON Lines that verify offline, line by line', async () => {
    const res = await raw('GET', '/v1/audit?format=jsonl');
    expect(res.status).toBe(200);
    expect(res.headers.get('content-type')).toContain('application/x-ndjson');
    const lines = res.text.split('\n');
    expect(lines.pop()).toBe('');
    const entries = lines.map((l) => JSON.parse(l) as AuditEntry);
    expect(entries.length).toBeGreaterThan(5);
    let prev = GENESIS_HASH;
    entries.forEach((e, i) => {
      expect(e.seq).toBe(i + 1);
      expect(e.prevHash).toBe(prev);
      const fields = { org: e.org, seq: e.seq, time: Date.parse(e.time), actor: e.actor, action: e.action, target: e.target, requestId: e.requestId, source: e.source, result: e.result, detail: e.detail };
      expect(createHash('sha256').update(e.prevHash + canonicalJson(fields)).digest('hex')).toBe(e.hash);
      prev = e.hash;
    });
    const viaSdk: string[] = [];
    for await (const line of user.exportAudit()) viaSdk.push(line);
    expect(viaSdk.slice(0, lines.length)).toEqual(lines);
  });

  it('has no route that changes or deletes entries, and only users read it', async () => {
    expect(ROUTES.filter((r) => r.path.startsWith('/v1/audit')).every((r) => r.method === 'GET')).toBe(true);
    expect((await raw('DELETE', '/v1/audit')).status).toBe(404);
    expect((await raw('PUT', '/v1/audit/verify')).status).toBe(404);
    expect((await raw('GET', '/v1/audit', { token: cp.tokens.nodeToken })).status).toBe(403);
    expect((await raw('GET', '/v1/audit/verify', { token: null })).status).toBe(401);
  });

  it('the CLI lists, exports and verifies', async () => {
    const list = await cli('audit', '--since', '1h', '--actor', 'admin');
    expect(list.code).toBe(0);
    expect(list.stdout.split('\n')[0]).toMatch(/^TIME\s+ACTOR\s+ACTION\s+TARGET\s+RESULT\s+SOURCE/);
    expect(list.stdout).toMatch(/admin\s+createBox\s+box\/aud1\s+ok\s+127\.0\.0\.1/);
    const json = await cli('audit', '--limit', '3', '--json');
    expect((JSON.parse(json.stdout) as AuditEntry[]).length).toBe(3);
    const file = join(dir, 'audit.jsonl');
    const exp = await cli('audit', 'export', '--output', file);
    expect(exp.code).toBe(0);
    const exported = readFileSync(file, 'utf8').trim().split('\n');
    expect(exported.map((l) => (JSON.parse(l) as AuditEntry).seq)).toEqual(exported.map((_, i) => i + 1));
    expect(await cli('audit', 'verify')).toMatchObject({ code: 0, stdout: expect.stringMatching(/^audit log intact: \d+ entries verified\n$/) });
    expect((await cli('audit', '--since', 'soon')).code).toBe(1);
  });
});

describe('verification over the API', () => {
  let original: string;

  it('reports ok, then the seq of an entry edited in the database file', async () => {
    const ok = await user.verifyAudit();
    expect(ok.ok).toBe(true);
    expect(ok.entries).toBeGreaterThan(5);
    const db = new SqliteDb(join(dir, 'devyard.db'));
    try {
      original = (db.prepare("SELECT actor FROM audit_log WHERE org_id = 'org_default' AND seq = 3").get() as { actor: string }).actor;
      expect(db.prepare("UPDATE audit_log SET actor = 'someone-else' WHERE org_id = 'org_default' AND seq = 3").run().changes).toBe(1);
    } finally {
      db.close();
    }
    const bad = await user.verifyAudit();
    expect(bad).toMatchObject({ ok: false, seq: 3 });
    expect(bad.reason).toContain('edited');
    const v = await cli('audit', 'verify');
    expect(v.code).toBe(1);
    expect(v.stderr).toMatch(/^devyard: error: audit log tampered with at entry 3: .+\n$/);
  });

  it('reports deleted newest entries through the head', async () => {
    const db = new SqliteDb(join(dir, 'devyard.db'));
    try {
      db.prepare("UPDATE audit_log SET actor = ? WHERE org_id = 'org_default' AND seq = 3").run(original);
      expect((await user.verifyAudit()).ok).toBe(true);
      const last = (db.prepare("SELECT max(seq) AS seq FROM audit_log WHERE org_id = 'org_default'").get() as { seq: number }).seq;
      db.prepare("DELETE FROM audit_log WHERE org_id = 'org_default' AND seq = ?").run(last);
      const v = await user.verifyAudit();
      expect(v).toMatchObject({ ok: false, seq: last });
      expect(v.reason).toContain('head');
    } finally {
      db.close();
    }
  });
});
