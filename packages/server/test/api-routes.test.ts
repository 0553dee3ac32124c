/**
 * In-process HTTP tests of every route, against a real SQLite store. The node agent here is a
 * scripted test double speaking the real agent protocol through the SDK; the real agent and
 * runtime are covered by the end-to-end tests.
 */
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ROUTES } from '@devyard/api/routes';
import { verifySessionToken } from '@devyard/api/session-tokens';
import { ApiError } from '@devyard/sdk/api-error';
import { DevyardClient } from '@devyard/sdk/devyard-client';
import type { ControlPlane } from '@devyard/server/control-plane';
import { problemOf, startTestControlPlane, until, type TestControlPlane } from './test-control-plane.js';
import type { DesiredSet } from '@devyard/api/node-schemas';
import { verifyAccessToken } from '@devyard/api/access-tokens';
import ssh2 from 'ssh2';
import { newSshKeyPair } from '@devyard/server/services/ssh-key-pairs';
import { addKeyPair, proofForPair } from './ssh-key-proof-fixture.js';

const covered = new Set<string>();
const cover = (...ids: string[]) => ids.forEach((id) => covered.add(id));

let dir: string;
let cp: ControlPlane;
let user: DevyardClient;
let node: DevyardClient;
let nodeId: string;
/** Each registered node's own client (a node speaks only for itself). */
const nodeClients = new Map<string, DevyardClient>();
const asNode = (id: string) => nodeClients.get(id) ?? node;
let sessionKey: string;

async function raw(method: string, path: string, opts: { body?: string; headers?: Record<string, string>; token?: string | null } = {}) {
  const token = opts.token === undefined ? cp.tokens.adminToken : opts.token;
  const res = await fetch(cp.url + path, {
    method,
    headers: { ...(token ? { authorization: `Bearer ${token}` } : {}), ...(opts.body !== undefined ? { 'content-type': 'application/json' } : {}), ...opts.headers },
    body: opts.body,
  });
  const text = await res.text();
  return { status: res.status, headers: res.headers, body: text ? JSON.parse(text) : undefined };
}


/** Plays the agent: reports every desired box as having reached its desired state. */
async function agentConverges(): Promise<DesiredSet> {
  const set = await node.getDesiredSet(nodeId);
  await node.reportStatus(
    nodeId,
    set.boxes.map((b) => ({ boxId: b.boxId, phase: b.desiredState, observedGeneration: b.generation, operationId: b.operationId, ip: '10.0.0.2', error: null, message: '' })),
  );
  return set;
}


let fixture: TestControlPlane;

beforeAll(async () => {
  fixture = await startTestControlPlane('api', { cpuMillis: 2000, memoryBytes: 4 * 1024 ** 3 });
  ({ dir, cp, user, node, nodeId, sessionKey } = fixture);
  cover('registerNode');
});

afterAll(async () => {
  await fixture?.close();
});

describe('system routes', () => {
  it('healthz answers without a token', async () => {
    const r = await raw('GET', '/healthz', { token: null });
    expect(r.status).toBe(200);
    expect(r.body).toEqual({ status: 'ok' });
    cover('healthz');
  });

  it('serves an OpenAPI document generated from the route table', async () => {
    const r = await raw('GET', '/v1/openapi.json', { token: null });
    expect(r.status).toBe(200);
    expect(r.body.openapi).toBe('3.1.0');
    for (const route of ROUTES) {
      const op = r.body.paths[route.path]?.[route.method.toLowerCase()];
      expect(op?.operationId, `${route.method} ${route.path}`).toBe(route.operationId);
    }
    expect(r.body.components.schemas.Box.properties.phase).toBeDefined();
    cover('openapi');
  });

  it('answers unknown routes, missing and bad tokens with problem+json', async () => {
    const unknown = await raw('GET', '/v1/nope');
    expect(unknown.status).toBe(404);
    expect(unknown.headers.get('content-type')).toContain('application/problem+json');
    expect((await raw('GET', '/v1/boxes', { token: null })).status).toBe(401);
    expect((await raw('GET', '/v1/boxes', { token: 'dy_u_forged' })).status).toBe(401);
    // A node token cannot act as a user, nor a user token as a node.
    expect((await raw('GET', '/v1/boxes', { token: cp.tokens.nodeToken })).status).toBe(403);
    expect((await raw('GET', `/v1/agent/nodes/${nodeId}/desired`)).status).toBe(403);
  });
});

describe('templates', () => {
  it('lists the built-in templates and publishes immutable versions', async () => {
    const names = (await user.listTemplates()).map((t) => t.name);
    expect(names).toEqual(expect.arrayContaining(['base', 'tiny']));
    const v1 = await user.createTemplate({ name: 'web', image: 'tiny', runtime: 'sandbox', defaultResources: { cpu: 1, memory: '256MiB' }, maxResources: { cpu: 2, memory: '1GiB' } });
    const v2 = await user.createTemplate({ name: 'web', image: 'base', runtime: 'sandbox', description: 'second' });
    expect([v1.version, v2.version]).toEqual([1, 2]);
    expect((await user.getTemplate('web')).version).toBe(2);
    expect((await user.getTemplate('web', 1)).image).toBe('tiny');
    expect((await user.listTemplateVersions('web')).map((t) => t.version)).toEqual([1, 2]);
    expect((await user.listTemplates()).filter((t) => t.name === 'web')).toHaveLength(1);
    cover('createTemplate', 'listTemplates', 'getTemplate', 'listTemplateVersions');
  });

  it('refuses bad templates and unknown names', async () => {
    const bad = await raw('POST', '/v1/templates', { body: JSON.stringify({ name: 'x', image: 'ubuntu' }) });
    expect(bad.status).toBe(400);
    expect(bad.body.errors[0].field).toBe('image');
    const tooBig = await problemOf(user.createTemplate({ name: 'y', image: 'tiny', runtime: 'sandbox', defaultResources: { cpu: 4 }, maxResources: { cpu: 2 } }));
    expect(tooBig.status).toBe(400);
    expect((await problemOf(user.getTemplate('missing'))).status).toBe(404);
    expect((await problemOf(user.getTemplate('web', 9))).status).toBe(404);
    expect((await problemOf(user.listTemplateVersions('missing'))).status).toBe(404);
    expect((await user.listTemplates()).map((t) => t.name)).not.toContain('y');
  });
});

describe('boxes', () => {
  it('creates a box asynchronously, schedules it and follows agent reports', async () => {
    const r = await raw('POST', '/v1/boxes', { body: JSON.stringify({ name: 'one', template: 'tiny', resources: { cpu: '250m', memory: '64MiB' } }) });
    expect(r.status).toBe(202);
    expect(r.headers.get('etag')).toBe(`"v${r.body.version}"`);
    expect(r.body).toMatchObject({ name: 'one', template: 'tiny', desiredState: 'running', runtime: 'sandbox', resources: { cpuMillis: 250, memoryBytes: 64 * 1024 ** 2 } });
    const scheduled = await until(() => user.getBox('one'), (b) => b.node === 'node-a');
    expect(scheduled.phase).toBe('provisioning');
    const set = await agentConverges();
    expect(set.boxes.find((b) => b.name === 'one')?.desiredState).toBe('running');
    const running = await user.getBox('one');
    expect(running).toMatchObject({ phase: 'running', observedGeneration: 1, ip: '10.0.0.2' });
    expect(running.pause.keepsMemory).toBe(true);
    expect((await user.listBoxes()).map((b) => b.name)).toContain('one');
    const nodes = await user.listNodes();
    expect(nodes[0]!.allocated.cpuMillis).toBe(250);
    cover('createBox', 'getBox', 'listBoxes', 'getDesiredSet', 'reportStatus', 'listNodes');
  });

  it('honours Idempotency-Key: same body → same box, different body → 409', async () => {
    const a = await user.createBox({ name: 'idem', template: 'tiny' }, 'key-1');
    const b = await raw('POST', '/v1/boxes', { body: JSON.stringify({ name: 'idem', template: 'tiny' }), headers: { 'idempotency-key': 'key-1' } });
    expect(b.status).toBe(202);
    expect(b.body.id).toBe(a.id);
    expect(b.headers.get('idempotent-replayed')).toBe('true');
    const c = await raw('POST', '/v1/boxes', { body: JSON.stringify({ name: 'idem2', template: 'tiny' }), headers: { 'idempotency-key': 'key-1' } });
    expect(c.status).toBe(409);
    expect((await user.listBoxes()).filter((x) => x.name.startsWith('idem')).map((x) => x.name)).toEqual(['idem']);
  });

  it('refuses bad input with a problem naming the field, and creates nothing', async () => {
    const before = (await user.listBoxes()).length;
    const cases: Array<[unknown, number, string]> = [
      [{ name: 'x1', template: 'nope' }, 400, 'template'],
      [{ name: 'Bad_Name', template: 'tiny' }, 400, 'name'],
      [{ name: 'x2', template: 'tiny', resources: { memory: 'lots' } }, 400, 'resources.memory'],
      [{ name: 'x3', template: 'tiny', resources: { cpu: 64 } }, 400, 'resources.cpu'],
      [{ name: 'x4', template: 'tiny', resources: { cpu: '0m' } }, 400, 'resources.cpu'],
      [{ name: 'x5', template: 'tiny', extra: true }, 400, '(body)'],
      [{ name: 'x6', template: 'tiny', runtime: 'sim' }, 400, 'runtime'],
      [{ name: 'one', template: 'tiny' }, 409, 'name'],
    ];
    for (const [body, status, field] of cases) {
      const r = await raw('POST', '/v1/boxes', { body: JSON.stringify(body) });
      expect(r.status, JSON.stringify(body)).toBe(status);
      expect(r.headers.get('content-type')).toContain('application/problem+json');
      expect(r.body.errors?.[0]?.field ?? r.body.field, JSON.stringify(r.body)).toBe(field);
    }
    const malformed = await raw('POST', '/v1/boxes', { body: '{"name":' });
    expect(malformed.status).toBe(400);
    const huge = await raw('POST', '/v1/boxes', { body: JSON.stringify({ name: 'big', template: 'tiny', env: { A: 'x'.repeat(2 * 1024 * 1024) } }) });
    expect(huge.status).toBe(413);
    expect((await user.listBoxes()).length).toBe(before);
  });

  it('drives the lifecycle through verbs: 202, transient phase, convergence', async () => {
    const allocatedBefore = (await user.listNodes())[0]!.allocated;
    const stop = await raw('POST', '/v1/boxes/one/stop');
    expect(stop.status).toBe(202);
    expect(stop.body).toMatchObject({ desiredState: 'stopped', phase: 'stopping', generation: 2 });
    await agentConverges();
    await until(() => user.getBox('one'), (b) => b.phase === 'stopped');
    // Stop releases CPU and memory, keeps the disk.
    const afterStop = await until(() => user.listNodes(), (n) => n[0]!.allocated.cpuMillis === allocatedBefore.cpuMillis - 250);
    expect(afterStop[0]!.allocated.memoryBytes).toBe(allocatedBefore.memoryBytes - 64 * 1024 ** 2);
    expect(afterStop[0]!.allocated.diskBytes).toBe(allocatedBefore.diskBytes);

    expect((await problemOf(user.boxVerb('one', 'resume'))).code).toBe('invalid-state');
    expect((await problemOf(user.boxVerb('one', 'pause'))).code).toBe('invalid-state');

    await user.boxVerb('one', 'start');
    // The agent is held stopped until the reconciler reserved compute again.
    const set = await until(() => node.getDesiredSet(nodeId), (s) => s.boxes.find((b) => b.name === 'one')?.desiredState === 'running');
    expect(set.boxes.find((b) => b.name === 'one')?.generation).toBe(3);
    await agentConverges();
    expect((await user.getBox('one')).phase).toBe('running');

    await user.boxVerb('one', 'pause');
    await agentConverges();
    expect((await user.getBox('one')).phase).toBe('paused');
    expect((await problemOf(user.boxVerb('one', 'start'))).code).toBe('invalid-state');
    const again = await user.boxVerb('one', 'pause');
    expect(again.generation).toBe(4); // repeating a verb is accepted and changes nothing
    await user.boxVerb('one', 'resume');
    await agentConverges();
    expect((await user.getBox('one')).phase).toBe('running');
    cover('stopBox', 'startBox', 'pauseBox', 'resumeBox');
  });

  it('refuses a stale If-Match with 412 and changes nothing', async () => {
    const box = await user.getBox('one');
    const r = await raw('POST', '/v1/boxes/one/stop', { headers: { 'if-match': `"v${box.version - 1}"` } });
    expect(r.status).toBe(412);
    expect((await user.getBox('one')).desiredState).toBe('running');
    const bad = await raw('POST', '/v1/boxes/one/stop', { headers: { 'if-match': 'garbage' } });
    expect(bad.status).toBe(400);
    const ok = await user.boxVerb('one', 'stop', box.version);
    expect(ok.desiredState).toBe('stopped');
    await agentConverges();
  });

  it('keeps a timeline of events and streams it', async () => {
    const events = await user.boxEvents('one');
    const types = events.map((e) => e.type);
    expect(types.slice(0, 2)).toEqual(['Created', 'Scheduled']);
    expect(types).toEqual(expect.arrayContaining(['StopRequested', 'StartRequested', 'PauseRequested', 'ResumeRequested', 'PhaseChanged']));
    const ac = new AbortController();
    const seen: string[] = [];
    const watching = (async () => {
      for await (const e of user.watchBoxEvents('one', ac.signal)) {
        seen.push(e.type);
        if (e.type === 'StartRequested' && seen.length > events.length) break;
      }
    })();
    await new Promise((r) => setTimeout(r, 50));
    await user.boxVerb('one', 'start');
    await watching;
    ac.abort();
    expect(seen.length).toBeGreaterThan(events.length);
    cover('listBoxEvents');
  });

  it('streams box changes over SSE on /v1/boxes?watch=1 and /v1/events', async () => {
    const ac = new AbortController();
    const res = await fetch(`${cp.url}/v1/events`, { headers: { authorization: `Bearer ${cp.tokens.adminToken}` }, signal: ac.signal });
    expect(res.headers.get('content-type')).toContain('text/event-stream');
    const phases: string[] = [];
    const watching = (async () => {
      for await (const b of user.watchBoxes(ac.signal)) {
        if (b.name !== 'one') continue;
        phases.push(b.phase);
        if (b.phase === 'running' && b.generation >= 6) return;
      }
    })();
    await agentConverges();
    await watching;
    const reader = res.body!.getReader();
    const chunk = new TextDecoder().decode((await reader.read()).value);
    ac.abort();
    expect(chunk).toContain('devyard watch');
    expect(phases.at(-1)).toBe('running');
    cover('watchEvents');
  });

  it('signs exec sessions for running boxes only', async () => {
    const s = await user.createExecSession('one');
    expect(s.url).toMatch(/^ws:\/\/127\.0\.0\.1:1\/v1\/boxes\/b_[a-z0-9]+\/exec$/);
    const claims = verifySessionToken(s.token, sessionKey, Date.now());
    expect(claims?.boxId).toBe((await user.getBox('one')).id);
    expect(verifySessionToken(s.token, 'another-key', Date.now())).toBeNull();
    expect(verifySessionToken(s.token, sessionKey, Date.now() + 120_000)).toBeNull();
    await user.createBox({ name: 'unplaced', template: 'tiny', runtime: 'microvm' });
    expect((await problemOf(user.createExecSession('unplaced'))).code).toBe('invalid-state');
    cover('createExecSession');
  });

  it('forks only microvm boxes: a sandbox box is refused with 409 and nothing is created (forks: box-fork.test.ts)', async () => {
    const r = await raw('POST', '/v1/boxes/one/fork', { body: JSON.stringify({ name: 'one-copy', count: 2 }) });
    expect(r.status).toBe(409);
    expect(r.body).toMatchObject({ code: 'invalid-state', detail: 'fork needs a microvm box; one runs on sandbox' });
    expect((await raw('POST', '/v1/boxes/one/fork', { body: JSON.stringify({ name: 'one-copy', count: 17 }) })).status).toBe(400);
    expect((await raw('POST', '/v1/boxes/nope/fork', { body: JSON.stringify({ name: 'one-copy' }) })).status).toBe(404);
    expect((await user.listBoxes()).map((b) => b.name).filter((n) => n.startsWith('one-copy'))).toEqual([]);
    cover('forkBox');
  });

  it('moves only microvm boxes: a sandbox box is refused with 409 and stays where it is (moves: box-move.test.ts)', async () => {
    const before = await user.getBox('one');
    const r = await raw('POST', '/v1/boxes/one/move', { body: JSON.stringify({}) });
    expect(r.status).toBe(409);
    expect(r.body).toMatchObject({ code: 'invalid-state', detail: 'move needs a microvm box; one runs on sandbox' });
    expect((await raw('POST', '/v1/boxes/one/move', { body: JSON.stringify({ node: 'node-a', extra: 1 }) })).status).toBe(400);
    expect((await raw('POST', '/v1/boxes/nope/move', { body: JSON.stringify({ node: 'node-a' }) })).status).toBe(404);
    const after = await user.getBox('one');
    expect([after.node, after.version, after.movingFrom]).toEqual([before.node, before.version, undefined]);
    cover('moveBox');
  });

  it('keeps a box without a fitting node pending, with the reasons per node', async () => {
    const box = await until(() => user.getBox('unplaced'), (b) => b.conditions.some((c) => c.reason === 'Unschedulable'));
    expect(box.phase).toBe('pending');
    expect(box.conditions.find((c) => c.type === 'Scheduled')?.message).toContain('node-a: runtime microvm not offered');
  });

  it('retries a failing operation with backoff, then fails with the reason', async () => {
    await user.createBox({ name: 'flaky', template: 'tiny' });
    const failOnce = async () => {
      const set = await until(() => node.getDesiredSet(nodeId), (s) => s.boxes.some((b) => b.name === 'flaky'));
      const b = set.boxes.find((x) => x.name === 'flaky')!;
      await node.reportStatus(nodeId, [{ boxId: b.boxId, phase: 'provisioning', observedGeneration: b.generation, operationId: b.operationId, ip: null, error: 'image build failed: disk full', message: '' }]);
      return b.operationId;
    };
    const op1 = await failOnce();
    const op2 = await until(failOnce, (op) => op !== op1);
    expect(op2.endsWith('.2')).toBe(true);
    const failed = await until(() => user.getBox('flaky'), (b) => b.phase === 'failed');
    expect(failed.lastError).toContain('image build failed: disk full');
    expect(failed.lastError).toContain('gave up after 2 attempts');
    expect((await user.boxEvents('flaky')).map((e) => e.type)).toEqual(expect.arrayContaining(['OperationFailed', 'Retrying', 'Failed']));
  });

  it('ignores stale and foreign reports', async () => {
    const box = await user.getBox('one');
    await node.reportStatus(nodeId, [{ boxId: box.id, phase: 'stopped', observedGeneration: box.generation - 1, operationId: 'old', ip: null, error: null, message: '' }]);
    await node.reportStatus(nodeId, [{ boxId: 'b_unknown', phase: 'running', observedGeneration: 1, operationId: 'x', ip: null, error: null, message: '' }]);
    expect((await user.getBox('one')).phase).toBe(box.phase);
    const bad = await raw('POST', `/v1/agent/nodes/${nodeId}/status`, { token: fixture.nodeCredential, body: JSON.stringify({ reports: [{ boxId: box.id, phase: 'failed', observedGeneration: box.generation, operationId: 'x' }] }) });
    expect(bad.status).toBe(400);
  });

  it('deletes: the name is freed and capacity released once the agent confirms', async () => {
    const d = await raw('DELETE', '/v1/boxes/one');
    expect(d.status).toBe(202);
    expect(d.body.desiredState).toBe('deleted');
    expect((await problemOf(user.boxVerb('one', 'start'))).code).toBe('invalid-state');
    await agentConverges();
    await until(() => user.listBoxes(), (l) => !l.some((b) => b.name === 'one'));
    expect((await problemOf(user.getBox('one'))).status).toBe(404);
    expect((await problemOf(user.boxVerb('one', 'stop'))).status).toBe(404);
    const again = await user.createBox({ name: 'one', template: 'tiny' });
    expect(again.id).not.toBe(d.body.id);
    cover('deleteBox');
  });

  it('deletes a box that never reached a node right away', async () => {
    await user.deleteBox('unplaced');
    await until(() => user.listBoxes(), (l) => !l.some((b) => b.name === 'unplaced'));
  });
});

describe('prebuilds', () => {
  it('records what nodes report and lists it per template, newest first', async () => {
    await node.reportStatus(nodeId, [], [
      { prebuildId: 'pb1', templateName: 'web', templateVersion: 2, commit: 'a'.repeat(40), status: 'ready', error: null, logTail: ['cloning', 'onCreate ok'] },
    ]);
    await new Promise((r) => setTimeout(r, 5));
    await node.reportStatus(nodeId, [], [
      { prebuildId: 'pb2', templateName: 'web', templateVersion: 2, commit: 'b'.repeat(40), status: 'failed', error: 'onCreate exited 1', logTail: ['boom'] },
    ]);
    const list = await user.listTemplatePrebuilds('web');
    expect(list.map((p) => [p.id, p.status, p.node])).toEqual([
      ['pb2', 'failed', 'node-a'],
      ['pb1', 'ready', 'node-a'],
    ]);
    expect(list[0]!.logTail).toEqual(['boom']);
    expect((await problemOf(user.listTemplatePrebuilds('missing'))).status).toBe(404);
    cover('listTemplatePrebuilds');
  });
});

describe('nodes', () => {
  it('cordons and uncordons; cordoned nodes get no new boxes', async () => {
    const n = await user.setCordoned('node-a', true);
    expect(n.cordoned).toBe(true);
    await user.createBox({ name: 'blocked', template: 'tiny' });
    const b = await until(() => user.getBox('blocked'), (x) => x.conditions.some((c) => c.reason === 'Unschedulable'));
    expect(b.conditions.find((c) => c.type === 'Scheduled')?.message).toContain('node-a: node is cordoned');
    await user.setCordoned('node-a', false);
    await until(() => user.getBox('blocked'), (x) => x.node === 'node-a');
    expect((await problemOf(user.setCordoned('nope', true))).status).toBe(404);
    cover('cordonNode', 'uncordonNode');
  });

  it('renews the lease by heartbeat and re-registration keeps the node id', async () => {
    await node.heartbeat(nodeId, ['tiny', 'sha256:abc']);
    expect((await user.listNodes())[0]!.images).toContain('sha256:abc');
    const nodeA = { name: 'node-a', arch: 'x86_64', region: null, labels: {}, runtimes: ['sandbox'], capacity: { cpuMillis: 2000, memoryBytes: 4 * 1024 ** 3, diskBytes: 100 * 1024 ** 3 }, images: [], agentUrl: 'http://127.0.0.1:1' };
    const again = await node.registerNode(nodeA);
    expect(again.nodeId).toBe(nodeId);
    expect(again.sessionKey).toBe(sessionKey);
    expect(again.credential).toBeNull();
    // A node speaks only for itself.
    expect((await problemOf(node.heartbeat('n_missing'))).status).toBe(403);
    cover('heartbeatNode');
  });

  it("the join token cannot take over a registered node: no re-registration, no desired set with its boxes' secrets", async () => {
    const join = fixture.join;
    const takeover = await problemOf(join.registerNode({ name: 'node-a', arch: 'x86_64', region: null, labels: {}, runtimes: ['sandbox'], capacity: { cpuMillis: 2000, memoryBytes: 4 * 1024 ** 3, diskBytes: 100 * 1024 ** 3 }, images: [], agentUrl: 'http://127.0.0.1:9' }));
    expect([takeover.status, JSON.stringify(takeover.problem)]).toEqual([403, expect.not.stringContaining(sessionKey)]);
    expect((await user.listNodes()).find((n) => n.name === 'node-a')!.agentUrl).toBe('http://127.0.0.1:1');
    expect((await problemOf(join.getDesiredSet(nodeId))).status).toBe(403);
    expect((await problemOf(join.heartbeat(nodeId))).status).toBe(403);
    expect((await problemOf(join.reportStatus(nodeId, []))).status).toBe(403);
    // Another node's own credential reaches only that node.
    const other = await join.registerNode({ name: 'node-other', arch: 'x86_64', region: null, labels: {}, runtimes: ['sandbox'], capacity: { cpuMillis: 1000, memoryBytes: 1024 ** 3, diskBytes: 1024 ** 3 }, images: [], agentUrl: 'http://127.0.0.1:8' });
    expect(other.credential).toMatch(/^dy_n_/);
    const asOther = new DevyardClient({ url: cp.url, token: other.credential! });
    expect((await problemOf(asOther.getDesiredSet(nodeId))).status).toBe(403);
    expect((await asOther.getDesiredSet(other.nodeId)).boxes).toEqual([]);
    // …and cannot register a node of its own.
    expect((await problemOf(asOther.registerNode({ name: 'node-third', arch: 'x86_64', region: null, labels: {}, runtimes: ['sandbox'], capacity: { cpuMillis: 1000, memoryBytes: 1024 ** 3, diskBytes: 1024 ** 3 }, images: [], agentUrl: 'http://127.0.0.1:7' }))).status).toBe(403);
    await user.setCordoned('node-other', true);
  });
});

describe('access routes', () => {
  const gatewayEndpoint = { url: 'http://127.0.0.1:7100', sshHost: '127.0.0.1', sshPort: 2222, previewDomain: 'localhost' };
  let gateway: DevyardClient;
  let other: DevyardClient;
  let accNode: string;
  let accKey: string;
  let accClient: DevyardClient;
  const converge = async () => {
    const set = await accClient.getDesiredSet(accNode);
    await accClient.reportStatus(accNode, set.boxes.map((b) => ({ boxId: b.boxId, phase: b.desiredState, observedGeneration: b.generation, operationId: b.operationId, ip: '10.0.0.3', error: null, message: '' })));
  };

  beforeAll(async () => {
    gateway = new DevyardClient({ url: cp.url, token: cp.tokens.gatewayToken });
    // Another member of the organization (a service account is a real user with a token).
    other = new DevyardClient({ url: cp.url, token: (await user.createServiceAccount('mallory', 'member')).token });
    // Its own node: earlier tests filled node-a on purpose.
    const reg = await fixture.join.registerNode({ name: 'node-acc', arch: 'x86_64', region: null, labels: {}, runtimes: ['sandbox'], capacity: { cpuMillis: 8000, memoryBytes: 8 * 1024 ** 3, diskBytes: 100 * 1024 ** 3 }, images: ['tiny'], agentUrl: 'http://127.0.0.1:2' });
    accClient = new DevyardClient({ url: cp.url, token: reg.credential! });
    nodeClients.set(reg.nodeId, accClient);
    accNode = reg.nodeId;
    accKey = reg.sessionKey;
    await user.setCordoned('node-a', true);
    await user.createBox({ name: 'acc', template: 'tiny' });
    await user.setCordoned('node-a', false);
    await until(async () => (await converge(), user.getBox('acc')), (b) => b.phase === 'running');
  });

  it('registers, lists and removes SSH keys; one key belongs to one user; bad keys change nothing', async () => {
    const pair = newSshKeyPair('dev@laptop');
    const pub = pair.publicKey;
    const k = await addKeyPair(user, pair);
    expect(k.name).toBe('dev@laptop');
    expect(k.fingerprint).toMatch(/^SHA256:[A-Za-z0-9+/]{43}$/);
    expect((await user.listSshKeys()).map((x) => x.id)).toContain(k.id);
    expect(await other.listSshKeys()).toEqual([]);
    // Even someone who holds the same key cannot register it a second time.
    const dup = await problemOf(addKeyPair(other, pair));
    expect([dup.status, dup.code]).toEqual([409, 'conflict']);
    const proof = await proofForPair(user, newSshKeyPair());
    expect((await problemOf(user.addSshKey(newSshKeyPair().privateKey, proof))).status).toBe(400);
    expect((await problemOf(user.addSshKey('ssh-ed25519 notbase64!!', proof))).status).toBe(400);
    expect((await raw('POST', '/v1/users/me/keys', { body: JSON.stringify({ publicKey: pub, ...proof, extra: 1 }) })).status).toBe(400);
    expect((await user.listSshKeys()).length).toBe(1);
    expect((await problemOf(other.removeSshKey(k.id))).status).toBe(404);
    await user.removeSshKey(k.fingerprint);
    expect(await user.listSshKeys()).toEqual([]);
    await addKeyPair(user, pair, 'laptop');
    cover('createSshKeyChallenge', 'addSshKey', 'listSshKeys', 'removeSshKey');
  });

  it('syncs gateways: route table with host keys, agent tokens and user keys; records activity; gateway-only', async () => {
    const forbidden = await problemOf(user.syncGateway({ gatewayId: 'g1', endpoint: gatewayEndpoint, activity: [] }));
    expect(forbidden.status).toBe(403);
    const box = await user.getBox('acc');
    const table = await gateway.syncGateway({ gatewayId: 'g1', endpoint: gatewayEndpoint, activity: [{ boxId: box.id, lastActiveAt: Date.now() - 5000, sessions: 1 }, { boxId: 'b_gone', lastActiveAt: 1, sessions: 0 }] });
    const rb = table.boxes.find((b) => b.id === box.id)!;
    expect(rb.owner).toBe('admin');
    expect(rb.agentUrl).toBe('http://127.0.0.1:2');
    expect(verifySessionToken(rb.agentToken!, accKey, Date.now())?.boxId).toBe(box.id);
    expect(rb.hostKey).toContain('OPENSSH PRIVATE KEY');
    expect(table.users.find((u) => u.subject === 'admin')?.keys).toHaveLength(1);
    expect(table.expiresAt).toBeGreaterThan(Date.now());
    const again = await gateway.syncGateway({ gatewayId: 'g2', endpoint: gatewayEndpoint, activity: [] });
    expect(again.boxes.find((b) => b.id === box.id)!.hostKey).toBe(rb.hostKey);
    expect(again.gatewayHostKey).toBe(table.gatewayHostKey);
    cover('syncGateway');

    const conn = await user.getBoxConnection('acc');
    const hostPub = ssh2.utils.parseKey(rb.hostKey) as ssh2.ParsedKey;
    expect(conn.hostKey).toBe(`ssh-ed25519 ${hostPub.getPublicSSH().toString('base64')}`);
    expect(conn.hostKeyAlias).toBe('devyard.acc');
    expect(conn.gateway).toEqual(gatewayEndpoint);
    expect(Date.parse(conn.lastActivityAt!)).toBeLessThan(Date.now() - 4000);
    expect((await problemOf(other.getBoxConnection('acc'))).status).toBe(404);
    cover('getBoxConnection');
  });

  it('issues access tokens the route table key verifies', async () => {
    const t = await user.createAccessToken(60);
    const table = await gateway.syncGateway({ gatewayId: 'g1', endpoint: gatewayEndpoint, activity: [] });
    expect(verifyAccessToken(t.token, table.accessTokenKey, Date.now())?.sub).toBe('admin');
    expect(verifyAccessToken(t.token, table.accessTokenKey, Date.now() + 61_000)).toBeNull();
    expect(verifyAccessToken(t.token.slice(0, -3) + 'AAA', table.accessTokenKey, Date.now())).toBeNull();
    expect(t.gateway?.sshPort).toBe(2222);
    expect((await raw('POST', '/v1/access-tokens', { body: JSON.stringify({ ttlSeconds: 999_999 }) })).status).toBe(400);
    cover('createAccessToken');
  });

  it('issues sign-in links for one terminal or preview, each redeemed once for a browser session of the same scope', async () => {
    const key = (await gateway.syncGateway({ gatewayId: 'g1', endpoint: gatewayEndpoint, activity: [] })).accessTokenKey;
    const link = await user.createSignInToken('acc');
    const claims = verifyAccessToken(link.token, key, Date.now(), 'sign-in');
    expect(claims).toMatchObject({ sub: 'admin', use: 'sign-in', scope: { kind: 'terminal', box: 'acc' } });
    expect(claims!.exp - claims!.iat).toBe(60_000);
    expect(Date.parse(link.expiresAt)).toBe(claims!.exp);
    // A link is no bearer token, and a bearer token is no link.
    expect(verifyAccessToken(link.token, key, Date.now())).toBeNull();
    expect(verifyAccessToken((await user.createAccessToken(60)).token, key, Date.now(), 'sign-in')).toBeNull();
    // A terminal link needs a box the caller may connect to; a preview's box is resolved by the gateway, for the viewer.
    expect((await problemOf(other.createSignInToken('acc'))).status).toBe(404);
    const preview = await other.createSignInToken('acc', 8080);
    expect(verifyAccessToken(preview.token, key, Date.now(), 'sign-in')?.scope).toEqual({ kind: 'preview', box: 'acc', port: 8080 });
    expect((await raw('POST', '/v1/access-tokens', { body: JSON.stringify({ signIn: { box: 'acc', port: 0 } }) })).status).toBe(400);
    expect((await raw('POST', '/v1/access-tokens', { body: JSON.stringify({ signIn: { box: '../x' } }) })).status).toBe(400);

    const session = await gateway.redeemSignIn(link.token);
    const s = verifyAccessToken(session.token, key, Date.now(), 'session');
    expect(s).toMatchObject({ sub: 'admin', use: 'session', scope: { kind: 'terminal', box: 'acc' } });
    expect(session.expiresAt - Date.now()).toBeGreaterThan(7.9 * 3600_000);
    expect(s!.jti).not.toBe(claims!.jti);
    // Once, whichever gateway asks; and only links are redeemed.
    const again = await problemOf(gateway.redeemSignIn(link.token));
    expect([again.status, again.message]).toEqual([401, expect.stringContaining('used already')]);
    expect((await problemOf(gateway.redeemSignIn(session.token))).status).toBe(401);
    expect((await problemOf(gateway.redeemSignIn((await user.createAccessToken(60)).token))).status).toBe(401);
    expect((await problemOf(gateway.redeemSignIn(`${preview.token.slice(0, -4)}AAAA`))).status).toBe(401);
    expect((await problemOf(user.redeemSignIn(preview.token))).status).toBe(403);
    expect((await gateway.redeemSignIn(preview.token)).token).toMatch(/^dya_/);
    cover('redeemSignIn');
  });

  it('sets port visibility for the owner only and shows preview URLs', async () => {
    const p = await user.setBoxPort('acc', 8080, 'org');
    expect(p).toEqual({ port: 8080, visibility: 'org', previewUrl: 'http://8080--acc.localhost:7100/' });
    expect(await user.listBoxPorts('acc')).toEqual([p]);
    const table = await gateway.syncGateway({ gatewayId: 'g1', endpoint: gatewayEndpoint, activity: [] });
    expect(table.boxes.find((b) => b.name === 'acc')!.ports).toEqual([{ port: 8080, visibility: 'org' }]);
    expect((await problemOf(other.setBoxPort('acc', 8080, 'private'))).status).toBe(404);
    expect((await raw('PUT', '/v1/boxes/acc/ports/70000', { body: JSON.stringify({ visibility: 'org' }) })).status).toBe(400);
    expect((await raw('PUT', '/v1/boxes/acc/ports/80', { body: JSON.stringify({ visibility: 'public' }) })).status).toBe(400);
    await user.resetBoxPort('acc', 8080);
    expect(await user.listBoxPorts('acc')).toEqual([]);
    expect((await problemOf(other.listBoxPorts('acc'))).status).toBe(404);
    cover('setBoxPort', 'listBoxPorts', 'resetBoxPort');
  });

  it('wakes a stopped box for its owner only', async () => {
    await user.boxVerb('acc', 'stop');
    const box = await until(async () => (await converge(), user.getBox('acc')), (b) => b.phase === 'stopped');
    expect((await problemOf(gateway.wakeBox(box.id, 'mallory'))).status).toBe(404);
    expect((await problemOf(user.wakeBox(box.id, 'admin'))).status).toBe(403);
    const woken = await gateway.wakeBox(box.id, 'admin');
    expect(woken.desiredState).toBe('running');
    expect((await problemOf(gateway.wakeBox('b_nope', 'admin'))).status).toBe(404);
    cover('wakeBox');
  });
});

// ---- audit log (issue 5); the full tests are in audit-api.test.ts and audit-log.test.ts ----
describe('audit routes', () => {
  it('lists what the requests above did, exports it and verifies the chain', async () => {
    const created = await user.createBox({ name: 'audited', template: 'tiny' });
    const entries = await until(() => user.listAudit({ limit: 1000 }), (l) => l.some((e) => e.action === 'createBox' && e.target === 'box/audited'));
    expect(entries.find((e) => e.target === 'box/audited')).toMatchObject({ actor: 'admin', result: 'ok', source: '127.0.0.1' });
    expect((await raw('DELETE', '/v1/boxes/audited', { token: 'dy_u_forged', headers: { 'x-request-id': 'audit-forged' } })).status).toBe(401);
    const refused = await until(() => user.listAudit({ actor: 'anonymous', limit: 1000 }), (l) => l.some((e) => e.requestId === 'audit-forged'));
    expect(refused.find((e) => e.requestId === 'audit-forged')).toMatchObject({ action: 'deleteBox', target: 'box/audited', result: 'denied', detail: { status: 401 } });
    // One line of JSON Lines is one JSON document (raw parses the body).
    const line = await raw('GET', '/v1/audit?format=jsonl&limit=1');
    expect(line.headers.get('content-type')).toContain('application/x-ndjson');
    expect(line.body).toMatchObject({ seq: 1 });
    expect(await user.verifyAudit()).toMatchObject({ ok: true });
    expect((await raw('GET', '/v1/audit/verify', { token: cp.tokens.nodeToken })).status).toBe(403);
    await user.deleteBox(created.name);
    cover('listAudit', 'verifyAudit');
  });
});
// ---- end audit log ----

// ---- secrets (issue 5); envelope: secret-envelope.test.ts; delivery into real boxes: packages/agent/test/box-secrets.test.ts ----
describe('secrets routes', () => {
  const VALUE = 'sv-4f1c9e-only-in-the-desired-set';
  /** Every response body of this block, to check that none carries a value. */
  const seen: string[] = [];
  const call = async (method: string, path: string, body?: unknown, token?: string) => {
    const res = await fetch(cp.url + path, {
      method,
      headers: { authorization: `Bearer ${token ?? cp.tokens.adminToken}`, ...(body !== undefined ? { 'content-type': 'application/json' } : {}) },
      body: body === undefined ? undefined : typeof body === 'string' ? body : JSON.stringify(body),
    });
    const text = await res.text();
    seen.push(text, JSON.stringify([...res.headers]));
    return { status: res.status, text, body: text ? JSON.parse(text) : undefined };
  };
  let eveToken: string;
  let boxId: string;
  let boxNode: string;
  const delivered = async () => (await asNode(boxNode).getDesiredSet(boxNode)).boxes.find((b) => b.boxId === boxId)!.secrets;

  beforeAll(async () => {
    eveToken = (await user.createServiceAccount('eve', 'member')).token;
    boxId = (await user.createBox({ name: 'sec', template: 'tiny' })).id;
    const placed = await until(async () => cp.store.getBox(boxId), (b) => Boolean(b?.nodeId && b.computeReserved));
    boxNode = placed!.nodeId!;
  });

  it('sets (201, then 200), lists and deletes; values go to the node only, never into a response', async () => {
    const created = await call('PUT', '/v1/secrets/user/API_TOKEN', { value: 'first' });
    expect(created.status).toBe(201);
    expect(created.body).toMatchObject({ name: 'API_TOKEN', scope: 'user', version: 1, createdBy: 'admin' });
    expect(Object.keys(created.body).sort()).toEqual(['createdAt', 'createdBy', 'name', 'scope', 'updatedAt', 'version']);
    const updated = await call('PUT', '/v1/secrets/user/API_TOKEN', { value: VALUE });
    expect([updated.status, updated.body.version]).toEqual([200, 2]);
    // The same value again changes nothing (no new version, no redelivery).
    expect((await call('PUT', '/v1/secrets/user/API_TOKEN', { value: VALUE })).body.version).toBe(2);
    expect((await call('PUT', '/v1/secrets/org/SHARED', { value: 'org-value' })).status).toBe(201);
    expect((await call('PUT', '/v1/secrets/template%3Atiny/SHARED', { value: 'template-value' })).body.scope).toBe('template:tiny');
    expect((await call('PUT', '/v1/secrets/team:platform/TEAM_ONLY', { value: 'team-value' })).status).toBe(404);
    await user.createTeam('platform');
    expect((await call('PUT', '/v1/secrets/team:platform/TEAM_ONLY', { value: 'team-value' })).body.scope).toBe('team:platform');
    const list = await call('GET', '/v1/secrets');
    expect(list.body.items.map((s: { scope: string; name: string }) => `${s.scope}/${s.name}`).sort()).toEqual(['org/SHARED', 'team:platform/TEAM_ONLY', 'template:tiny/SHARED', 'user/API_TOKEN']);
    expect(await user.listSecrets()).toEqual(list.body.items);

    // The box gets org + template + (no teams yet) + user; the template's SHARED wins over the org's.
    expect(await delivered()).toEqual([
      { name: 'API_TOKEN', value: VALUE },
      { name: 'SHARED', value: 'template-value' },
    ]);
    await call('PUT', '/v1/secrets/user/SHARED', { value: 'user-value' });
    expect((await delivered()).find((s) => s.name === 'SHARED')!.value).toBe('user-value');
    expect((await call('DELETE', '/v1/secrets/user/SHARED')).status).toBe(204);
    expect((await call('DELETE', '/v1/secrets/template:tiny/SHARED')).status).toBe(204);
    expect((await delivered()).find((s) => s.name === 'SHARED')!.value).toBe('org-value');
    expect((await call('DELETE', '/v1/secrets/template:tiny/SHARED')).status).toBe(404);
    await user.deleteSecret('org', 'SHARED');
    await user.deleteSecret('team:platform', 'TEAM_ONLY');
    expect(await delivered()).toEqual([{ name: 'API_TOKEN', value: VALUE }]);

    // Nowhere else: not in any response above, the OpenAPI document, the box's events or the audit log.
    seen.push((await call('GET', '/v1/openapi.json', undefined)).text);
    seen.push(JSON.stringify(await user.boxEvents('sec')), JSON.stringify(await user.getBox('sec')));
    seen.push(JSON.stringify(await user.listAudit({ limit: 1000 })));
    for (const text of seen) {
      expect(text).not.toContain(VALUE);
      expect(text).not.toContain('org-value');
    }
    cover('putSecret', 'listSecrets', 'deleteSecret');
  });

  it('pushes a change to the node watching its desired set', async () => {
    const ac = new AbortController();
    const sets: DesiredSet[] = [];
    const watching = (async () => {
      for await (const set of asNode(boxNode).watchDesiredSet(boxNode, ac.signal)) sets.push(set);
    })().catch((e: unknown) => {
      // Ending the watch aborts it; any other end is the test's failure.
      if (!ac.signal.aborted) throw e;
    });
    await until(async () => sets.length, (n) => n > 0);
    await user.putSecret('user', 'PUSHED', 'pushed-value');
    const got = await until(async () => sets.at(-1)!, (s) => s.boxes.some((b) => b.boxId === boxId && b.secrets.some((x) => x.name === 'PUSHED')));
    expect(got.boxes.find((b) => b.boxId === boxId)!.secrets.find((x) => x.name === 'PUSHED')!.value).toBe('pushed-value');
    await user.deleteSecret('user', 'PUSHED');
    await until(async () => sets.at(-1)!, (s) => !s.boxes.some((b) => b.boxId === boxId && b.secrets.some((x) => x.name === 'PUSHED')));
    ac.abort();
    await watching;
  });

  it('refuses bad names, scopes and values with 400 and stores nothing', async () => {
    const before = await call('GET', '/v1/secrets');
    const cases: Array<[string, unknown]> = [
      ['/v1/secrets/user/lower_case', { value: 'v' }],
      ['/v1/secrets/user/1STARTS_WITH_DIGIT', { value: 'v' }],
      ['/v1/secrets/user/HAS-DASH', { value: 'v' }],
      ['/v1/secrets/user/PATH', { value: 'v' }],
      ['/v1/secrets/user/BIG', { value: 'x'.repeat(64 * 1024 + 1) }],
      ['/v1/secrets/user/BIG_UTF8', { value: 'é'.repeat(32 * 1024 + 1) }],
      ['/v1/secrets/user/NUL', { value: 'a\u0000b' }],
      ['/v1/secrets/user/EXTRA', { value: 'v', extra: 1 }],
      ['/v1/secrets/user/NO_VALUE', {}],
      ['/v1/secrets/user/NUMBER', { value: 42 }],
      ['/v1/secrets/group/GOOD', { value: 'v' }],
      ['/v1/secrets/team:/GOOD', { value: 'v' }],
      ['/v1/secrets/template:Bad_Name/GOOD', { value: 'v' }],
      ['/v1/secrets/user%3Aadmin/GOOD', { value: 'v' }],
    ];
    for (const [path, body] of cases) {
      const r = await call('PUT', path, body);
      expect([path, r.status, r.body?.code]).toEqual([path, 400, 'invalid-input']);
    }
    expect((await call('PUT', '/v1/secrets/user/BAD_JSON', '{"value":')).status).toBe(400);
    // Too long: the router refuses path parameters over its limit (414) before the schema would (400).
    expect([400, 414]).toContain((await call('PUT', `/v1/secrets/user/${'A'.repeat(129)}`, { value: 'v' })).status);
    // Exactly at the limit is fine.
    expect((await call('PUT', '/v1/secrets/user/AT_LIMIT', { value: 'x'.repeat(64 * 1024) })).status).toBe(201);
    expect((await call('PUT', '/v1/secrets/template:no-such-template/GOOD', { value: 'v' })).status).toBe(404);
    expect((await call('DELETE', '/v1/secrets/user/lower')).status).toBe(400);
    await user.deleteSecret('user', 'AT_LIMIT');
    expect((await call('GET', '/v1/secrets')).body).toEqual(before.body);
    expect((await call('PUT', '/v1/secrets/user/NOPE', { value: 'v' }, cp.tokens.nodeToken)).status).toBe(403);
    expect((await call('PUT', '/v1/secrets/user/NOPE', { value: 'v' }, 'dy_u_not-a-token')).status).toBe(401);
  });

  it("keeps user secrets to their user: another user neither lists nor deletes them, and their boxes do not get them", async () => {
    const eve = new DevyardClient({ url: cp.url, token: eveToken });
    expect((await eve.putSecret('user', 'EVE_ONLY', 'eve-value')).created).toBe(true);
    expect((await user.listSecrets()).map((s) => s.name)).not.toContain('EVE_ONLY');
    expect((await eve.listSecrets()).filter((s) => s.scope === 'user').map((s) => s.name)).toEqual(['EVE_ONLY']);
    // "user" is always the caller's own: eve deleting user/API_TOKEN finds no such secret of hers.
    expect((await problemOf(eve.deleteSecret('user', 'API_TOKEN'))).status).toBe(404);
    expect((await user.listSecrets()).map((s) => s.name)).toContain('API_TOKEN');
    expect((await delivered()).map((s) => s.name)).not.toContain('EVE_ONLY');
    await eve.deleteSecret('user', 'EVE_ONLY');
  });

  it('keeps values out of the database file in plaintext', async () => {
    const { readFileSync, existsSync } = await import('node:fs');
    for (const f of ['devyard.db', 'devyard.db-wal']) {
      const file = join(dir, f);
      if (existsSync(file)) expect(readFileSync(file).includes(Buffer.from(VALUE))).toBe(false);
    }
  });

  afterAll(async () => {
    await user.deleteSecret('user', 'API_TOKEN').catch(() => undefined);
    await user.deleteBox('sec').catch(() => undefined);
  });
});
// ---- end secrets ----

describe('identity and tenancy routes', () => {
  // Its own node with room: earlier tests filled node-a on purpose.
  let tnode: string;
  let tclient: DevyardClient;
  const converge = async () => {
    const set = await tclient.getDesiredSet(tnode);
    await tclient.reportStatus(tnode, set.boxes.map((b) => ({ boxId: b.boxId, phase: b.desiredState, observedGeneration: b.generation, operationId: b.operationId, ip: '10.0.0.4', error: null, message: '' })));
  };
  const small = { cpu: '10m', memory: '16MiB' };

  beforeAll(async () => {
    const treg = await fixture.join.registerNode({ name: 'node-tenancy', arch: 'x86_64', region: null, labels: {}, runtimes: ['sandbox'], capacity: { cpuMillis: 64000, memoryBytes: 64 * 1024 ** 3, diskBytes: 1024 ** 4 }, images: ['tiny'], agentUrl: 'http://127.0.0.1:3' });
    tnode = treg.nodeId;
    tclient = new DevyardClient({ url: cp.url, token: treg.credential! });
    nodeClients.set(treg.nodeId, tclient);
    for (const n of (await user.listNodes()).filter((x) => x.name !== 'node-tenancy')) await user.setCordoned(n.name, true);
  });

  afterAll(async () => {
    for (const n of (await user.listNodes()).filter((x) => x.name !== 'node-tenancy')) await user.setCordoned(n.name, false);
  });

  it('tells the caller who it is; personal tokens are shown once, expire, can be revoked and narrowed', async () => {
    const me = await user.getMe();
    expect([me.user, me.org, me.role, me.kind]).toEqual(['admin', 'default', 'owner', 'user']);
    const created = await user.createToken({ name: 'ci', ttlSeconds: 3600, scopes: ['read'] });
    expect(created.token).toMatch(/^dy_u_/);
    expect(created.info.scopes).toEqual(['read']);
    const listed = (await user.listTokens()).find((t) => t.id === created.info.id)!;
    expect(JSON.stringify(listed)).not.toContain(created.token);
    const ci = new DevyardClient({ url: cp.url, token: created.token });
    expect((await ci.getMe()).token?.scopes).toEqual(['read']);
    expect((await problemOf(ci.createToken({ name: 'wider' }))).status).toBe(403);
    await user.revokeToken(created.info.id);
    const revoked = await problemOf(ci.getMe());
    expect([revoked.status, revoked.message]).toEqual([401, 'this token was revoked']);
    expect((await user.listTokens()).find((t) => t.id === created.info.id)?.revoked).toBe(true);
    const shortLived = await user.createToken({ name: 'short', ttlSeconds: 60 });
    await cp.store.db.updateTable('api_tokens').set({ expires_at: Date.now() - 1 }).where('id', '=', shortLived.info.id).execute();
    expect((await problemOf(new DevyardClient({ url: cp.url, token: shortLived.token }).getMe())).message).toBe('this token has expired');
    expect((await problemOf(user.revokeToken('t_someone_elses'))).status).toBe(404);
    cover('getMe', 'createToken', 'listTokens', 'revokeToken');
  });

  it('creates organizations; tokens act in one organization at a time; other organizations stay invisible', async () => {
    await user.createOrg('acme');
    expect((await user.listOrgs()).map((o) => [o.name, o.role])).toEqual([['acme', 'owner'], ['default', 'owner']]);
    expect((await problemOf(user.createOrg('acme'))).status).toBe(409);
    await user.setOrgTrust('acme', false);
    cover('setOrgTrust');
    const inAcme = new DevyardClient({ url: cp.url, token: (await user.createToken({ name: 'acme', org: 'acme' })).token });
    expect((await inAcme.getMe()).org).toBe('acme');
    await user.createBox({ name: 'home-box', template: 'tiny', resources: small });
    expect((await inAcme.listBoxes()).map((b) => b.name)).not.toContain('home-box');
    expect((await problemOf(inAcme.getBox('home-box'))).status).toBe(404);
    const member = new DevyardClient({ url: cp.url, token: (await user.createServiceAccount('tina', 'member')).token });
    expect((await problemOf(member.createToken({ name: 'x', org: 'acme' }))).status).toBe(404);
    // Templates belong to the organization that published them; built-ins are shared.
    await user.createTemplate({ name: 'home-tpl', image: 'tiny' });
    expect((await inAcme.listTemplates()).map((t) => t.name)).toEqual(expect.arrayContaining(['tiny', 'base']));
    expect((await inAcme.listTemplates()).map((t) => t.name)).not.toContain('home-tpl');
    expect((await problemOf(inAcme.getTemplate('home-tpl'))).status).toBe(404);
    expect((await problemOf(inAcme.createTemplate({ name: 'home-tpl', image: 'tiny' }))).status).toBe(409);
    expect((await problemOf(inAcme.createBox({ name: 'x', template: 'home-tpl' }))).status).toBe(400);
    expect((await user.getTemplate('home-tpl')).version).toBe(1);
    await user.boxVerb('home-box', 'stop');
    cover('createOrg', 'listOrgs');
  });

  it('changes roles within what the granter may grant, keeps an owner, and service accounts act with their role', async () => {
    const adminSa = await user.createServiceAccount('ada', 'admin');
    const ada = new DevyardClient({ url: cp.url, token: adminSa.token });
    expect(adminSa.info.user).toBe('ada');
    expect((await problemOf(ada.createServiceAccount('sneaky', 'owner'))).status).toBe(403);
    expect((await problemOf(ada.setMember('tina', 'owner'))).status).toBe(403);
    await ada.setMember('tina', 'auditor');
    expect((await user.listMembers()).find((m) => m.user === 'tina')?.role).toBe('auditor');
    expect((await problemOf(ada.setMember('admin', 'member'))).status).toBe(403);
    expect((await problemOf(ada.removeMember('admin'))).status).toBe(403);
    expect((await problemOf(user.setMember('admin', 'member'))).code).toBe('invalid-state');
    expect((await problemOf(ada.setMember('nobody', 'member'))).status).toBe(404);
    const tina = new DevyardClient({ url: cp.url, token: (await user.createToken({ name: 'unused' })).token });
    void tina;
    await ada.removeMember('tina');
    expect((await user.listMembers()).map((m) => m.user)).not.toContain('tina');
    cover('listMembers', 'setMember', 'removeMember', 'createServiceAccount');
  });

  it('invites into an organization: single use, expiring, revocable, only roles the inviter may grant', async () => {
    const inAcme = new DevyardClient({ url: cp.url, token: (await user.createToken({ name: 'acme-admin', org: 'acme' })).token });
    const outsider = new DevyardClient({ url: cp.url, token: (await inAcme.createServiceAccount('outsider', 'member')).token });
    const inv = await user.createInvitation('template-admin');
    expect(inv.token).toMatch(/^dy_i_/);
    expect((await user.listInvitations()).find((i) => i.id === inv.invitation.id)?.state).toBe('open');
    expect(await outsider.acceptInvitation(inv.token)).toEqual({ org: 'default', role: 'template-admin' });
    expect((await problemOf(outsider.acceptInvitation(inv.token))).status).toBe(404);
    expect((await user.listMembers()).find((m) => m.user === 'outsider')?.role).toBe('template-admin');
    const again = await user.createInvitation('member');
    expect((await problemOf(outsider.acceptInvitation(again.token))).status).toBe(409);
    await user.revokeInvitation(again.invitation.id);
    const expired = await user.createInvitation('member', 60);
    await cp.store.db.updateTable('invitations').set({ expires_at: Date.now() - 1 }).where('id', '=', expired.invitation.id).execute();
    const late = new DevyardClient({ url: cp.url, token: (await inAcme.createServiceAccount('late', 'member')).token });
    expect((await problemOf(late.acceptInvitation(expired.token))).status).toBe(404);
    const ada = new DevyardClient({ url: cp.url, token: (await user.createServiceAccount('ida', 'admin')).token });
    expect((await problemOf(ada.createInvitation('owner'))).status).toBe(403);
    cover('createInvitation', 'listInvitations', 'revokeInvitation', 'acceptInvitation');
  });

  it('shares a box with a team: connect lets members in, manage also lets them operate it', async () => {
    const alice = new DevyardClient({ url: cp.url, token: (await user.createServiceAccount('alice', 'member')).token });
    const bob = new DevyardClient({ url: cp.url, token: (await user.createServiceAccount('bob', 'member')).token });
    await user.createTeam('web');
    expect((await problemOf(user.createTeam('web'))).status).toBe(409);
    await user.setTeamMember('web', 'alice', 'admin');
    await alice.setTeamMember('web', 'bob', 'member');
    expect((await problemOf(bob.setTeamMember('web', 'alice', 'member'))).status).toBe(403);
    expect((await user.listTeams()).find((t) => t.name === 'web')?.members).toEqual([
      { user: 'alice', role: 'admin' },
      { user: 'bob', role: 'member' },
    ]);
    await alice.createBox({ name: 'shared', template: 'tiny', resources: small });
    expect((await problemOf(bob.getBox('shared', 'alice'))).status).toBe(404);
    await alice.setBoxShare('shared', 'web', 'connect');
    expect(await alice.listBoxShares('shared')).toEqual([{ team: 'web', access: 'connect' }]);
    expect((await bob.getBox('shared', 'alice')).owner).toBe('alice');
    expect((await bob.listBoxes()).map((b) => b.name)).toContain('shared');
    expect((await problemOf(bob.boxVerb('shared', 'stop', undefined, 'alice'))).status).toBe(403);
    // Connecting is not publishing: a connect-only share lists the ports but cannot open them to the organization.
    expect(await bob.listBoxPorts('shared', 'alice')).toEqual([]);
    expect((await problemOf(bob.setBoxPort('shared', 8080, 'org', 'alice'))).status).toBe(403);
    expect((await problemOf(bob.resetBoxPort('shared', 8080, 'alice'))).status).toBe(403);
    expect(await alice.listBoxPorts('shared')).toEqual([]);
    await alice.setBoxShare('shared', 'web', 'manage');
    expect((await bob.setBoxPort('shared', 8080, 'org', 'alice')).visibility).toBe('org');
    expect((await bob.boxVerb('shared', 'stop', undefined, 'alice')).desiredState).toBe('stopped');
    await alice.removeBoxShare('shared', 'web');
    expect((await problemOf(bob.getBox('shared', 'alice'))).status).toBe(404);
    await alice.removeTeamMember('web', 'bob');
    await user.deleteTeam('web');
    expect((await user.listTeams()).map((t) => t.name)).not.toContain('web');
    cover('createTeam', 'listTeams', 'setTeamMember', 'removeTeamMember', 'deleteTeam', 'setBoxShare', 'listBoxShares', 'removeBoxShare');
  });

  it('enforces quotas atomically: many concurrent creates against a quota of N yield exactly N boxes', async () => {
    const q = new DevyardClient({ url: cp.url, token: (await user.createServiceAccount('quinn', 'member')).token });
    const set = await user.setQuota('user:quinn', { boxes: 3, memoryBytes: 1024 ** 3 });
    expect(set.usage.boxes).toBe(0);
    const results = await Promise.allSettled(Array.from({ length: 12 }, (_, i) => q.createBox({ name: `q${i}`, template: 'tiny', resources: small })));
    expect(results.filter((r) => r.status === 'fulfilled')).toHaveLength(3);
    const refused = results.find((r) => r.status === 'rejected') as PromiseRejectedResult;
    expect(refused.reason).toMatchObject({ status: 403, code: 'quota-exceeded' });
    expect((refused.reason as ApiError).problem).toMatchObject({ scope: 'user:quinn', resource: 'boxes', limit: 3, used: 3, requested: 1 });
    expect((await q.listBoxes()).filter((b) => b.owner === 'quinn')).toHaveLength(3);
    expect((await q.listQuotas()).find((x) => x.scope === 'user:quinn')?.usage.boxes).toBe(3);
    // Stopped boxes hold no memory; starting one counts again.
    await user.deleteQuota('user:quinn');
    await user.setQuota('user:quinn', { runningBoxes: 3 });
    const created = results.flatMap((r) => (r.status === 'fulfilled' ? [r.value.name] : []));
    await q.boxVerb(created[0]!, 'stop');
    await until(async () => (await converge(), q.listBoxes()), (bs) => bs.some((b) => b.phase === 'stopped' && b.owner === 'quinn'));
    await q.createBox({ name: 'q-extra', template: 'tiny', resources: small });
    const stopped = (await q.listBoxes()).find((b) => b.owner === 'quinn' && b.desiredState === 'stopped')!;
    expect((await problemOf(q.boxVerb(stopped.name, 'start'))).code).toBe('quota-exceeded');
    expect((await problemOf(q.setQuota('org', { boxes: 1 }))).status).toBe(403);
    expect((await problemOf(user.setQuota('team:ghosts', { boxes: 1 }))).status).toBe(404);
    expect((await raw('PUT', '/v1/quotas/org', { body: JSON.stringify({ boxes: -1 }) })).status).toBe(400);
    expect((await raw('PUT', '/v1/quotas/everyone', { body: JSON.stringify({ boxes: 1 }) })).status).toBe(400);
    cover('setQuota', 'listQuotas', 'deleteQuota');
  });
});

describe('sign-in routes', () => {
  it('answer 404 when no identity provider is configured (the flow itself: oidc-login.test.ts)', async () => {
    expect((await raw('GET', '/v1/auth/oidc/login?cli=http://127.0.0.1:9/cb', { token: null })).status).toBe(404);
    expect((await raw('GET', '/v1/auth/oidc/callback?code=x&state=y', { token: null })).status).toBe(404);
    expect((await raw('POST', '/v1/auth/oidc/token', { token: null, body: JSON.stringify({ code: 'x', verifier: 'v'.repeat(43) }) })).status).toBe(404);
    cover('oidcLogin', 'oidcCallback', 'redeemOidcLogin');
  });
});

describe('route accounting', () => {
  it('every route in the route table has a test', () => {
    const missing = ROUTES.map((r) => r.operationId).filter((id) => !covered.has(id));
    expect(missing).toEqual([]);
  });
});

describe('metrics', () => {
  it('serves Prometheus metrics: API latency, boxes by phase, queue depth, nodes', async () => {
    const res = await fetch(`${cp.url}/metrics`);
    expect(res.status).toBe(200);
    const text = await res.text();
    expect(text).toMatch(/devyard_http_request_duration_seconds_count\{method="POST",route="\/v1\/boxes",status="202"\} \d+/);
    expect(text).toMatch(/devyard_boxes\{phase="running"\} \d+/);
    expect(text).toContain('devyard_reconcile_queue_depth');
    expect(text).toMatch(/devyard_node_capacity\{node="node-a",resource="cpu_millis"\} 2000/);
    expect(text).toMatch(/devyard_box_create_to_running_seconds_count \d+/);
  });
});
