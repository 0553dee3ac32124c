/**
 * Forks of microvm boxes through the API, against a real control plane and SQLite store: new boxes
 * bound to the source's node with its resources and `forkOf`, capacity reserved there, all or none
 * under quotas, name clashes and capacity, and `forkOf` in the node's desired set. The node agent
 * is a scripted test double speaking the agent protocol (the driver's clone is the agent's tests').
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { Box } from '@devyard/api/box-schemas';
import type { DesiredSet } from '@devyard/api/node-schemas';
import { DevyardClient } from '@devyard/sdk/devyard-client';
import { problemOf, startTestControlPlane, until, type TestControlPlane } from './test-control-plane.js';

const MiB = 1024 ** 2;
const small = { cpu: '250m', memory: '64MiB', disk: '1GiB' };

/** Each node's own client (a node speaks only for itself). */
const nodeClients = new Map<string, DevyardClient>();
const asNode = (id: string) => nodeClients.get(id) ?? fx.node;
let fx: TestControlPlane;
let user: DevyardClient;
let vmNode: string;



/** Plays the microvm node's agent: every desired box reaches its desired state. */
async function converge(): Promise<DesiredSet> {
  const set = await asNode(vmNode).getDesiredSet(vmNode);
  await asNode(vmNode).reportStatus(
    vmNode,
    set.boxes.map((b) => ({ boxId: b.boxId, phase: b.desiredState, observedGeneration: b.generation, operationId: b.operationId, ip: '10.0.9.2', error: null, message: '' })),
  );
  return set;
}

/** Creates a microvm box and drives it to running on the microvm node. */
async function runningVm(name: string, client = user): Promise<Box> {
  await client.createBox({ name, template: 'tiny', runtime: 'microvm', resources: small });
  return until(async () => (await converge(), client.getBox(name)), (b) => b.phase === 'running');
}

const vmAllocated = async () => (await user.listNodes()).find((n) => n.name === 'node-vm')!.allocated;
const boxNames = async () => (await user.listBoxes()).map((b) => b.name);

beforeAll(async () => {
  // node-a (the fixture's) offers only sandbox; node-vm offers both and takes every microvm box.
  fx = await startTestControlPlane('fork', { cpuMillis: 4000, memoryBytes: 4 * 1024 ** 3 });
  user = fx.user;
  const reg = await fx.join.registerNode({
    name: 'node-vm',
    arch: 'x86_64',
    region: null,
    labels: {},
    runtimes: ['sandbox', 'microvm'],
    capacity: { cpuMillis: 4000, memoryBytes: 4 * 1024 ** 3, diskBytes: 100 * 1024 ** 3 },
    images: ['tiny'],
    agentUrl: 'http://127.0.0.1:3',
  });
  vmNode = reg.nodeId;
  nodeClients.set(vmNode, new DevyardClient({ url: fx.cp.url, token: reg.credential! }));
});

afterAll(async () => {
  await fx?.close();
});

describe('fork', () => {
  it('forks a running microvm box into N boxes on its node, with forkOf, its resources and capacity reserved', async () => {
    const src = await runningVm('src');
    expect(src.node).toBe('node-vm');
    const before = await vmAllocated();

    const res = await fetch(`${fx.cp.url}/v1/boxes/src/fork`, {
      method: 'POST',
      headers: { authorization: `Bearer ${fx.cp.tokens.adminToken}`, 'content-type': 'application/json' },
      body: JSON.stringify({ name: 'copy', count: 3 }),
    });
    expect(res.status).toBe(201);
    const { boxes } = (await res.json()) as { boxes: Box[] };
    expect(boxes.map((b) => b.name)).toEqual(['copy-1', 'copy-2', 'copy-3']);
    for (const b of boxes) {
      expect(b).toMatchObject({
        owner: 'admin',
        template: src.template,
        templateVersion: src.templateVersion,
        image: src.image,
        runtime: 'microvm',
        resources: src.resources,
        desiredState: 'running',
        node: 'node-vm',
        forkOf: 'src',
        generation: 1,
      });
      expect(b.id).not.toBe(src.id);
    }
    expect(new Set(boxes.map((b) => b.id)).size).toBe(3);
    expect((await user.getBox('copy-2')).forkOf).toBe('src');
    expect((await user.listBoxes()).find((b) => b.name === 'copy-3')?.forkOf).toBe('src');
    expect((await user.getBox('src')).forkOf).toBeUndefined();

    // Reserved on the source's node as scheduling would: three times the source's compute and disk.
    const after = await vmAllocated();
    expect(after.cpuMillis - before.cpuMillis).toBe(3 * 250);
    expect(after.memoryBytes - before.memoryBytes).toBe(3 * 64 * MiB);
    expect(after.diskBytes - before.diskBytes).toBe(3 * src.resources.diskBytes);

    // The node's desired set carries the source box's id; boxes that are not forks carry null.
    const set = await asNode(vmNode).getDesiredSet(vmNode);
    for (const name of ['copy-1', 'copy-2', 'copy-3']) {
      expect(set.boxes.find((b) => b.name === name)).toMatchObject({ forkOf: src.id, desiredState: 'running', runtime: 'microvm', resources: src.resources });
    }
    expect(set.boxes.find((b) => b.name === 'src')?.forkOf).toBeNull();
    // Nothing of a fork reaches the other node.
    expect((await asNode(fx.nodeId).getDesiredSet(fx.nodeId)).boxes.some((b) => b.name.startsWith('copy'))).toBe(false);

    await converge();
    const running = await until(() => user.listBoxes(), (l) => l.filter((b) => b.name.startsWith('copy-')).every((b) => b.phase === 'running'));
    expect(running.filter((b) => b.name.startsWith('copy-'))).toHaveLength(3);
    expect((await user.boxEvents('copy-1')).map((e) => e.type).slice(0, 2)).toEqual(['Created', 'Scheduled']);
    expect((await user.boxEvents('src')).find((e) => e.type === 'Forked')?.message).toContain('copy-1, copy-2, copy-3');
    // The fork is audited like every other mutating request.
    const audit = await user.listAudit({ order: 'desc', limit: 1000 });
    expect(audit.find((e) => e.action === 'forkBox' && e.result === 'ok')).toMatchObject({ actor: 'admin', target: 'box/src' });
  });

  it('forks a paused box too; count defaults to 1 and the box takes the name as given', async () => {
    await user.boxVerb('src', 'pause');
    await until(async () => (await converge(), user.getBox('src')), (b) => b.phase === 'paused');
    const [one, ...rest] = await user.forkBox('src', { name: 'single' });
    expect(rest).toEqual([]);
    expect(one).toMatchObject({ name: 'single', forkOf: 'src', node: 'node-vm', desiredState: 'running' });
    await user.boxVerb('src', 'resume');
    await until(async () => (await converge(), user.getBox('src')), (b) => b.phase === 'running');
  });

  it('refuses a sandbox box with 409, naming the runtime', async () => {
    await user.createBox({ name: 'sb', template: 'tiny', resources: small });
    const e = await problemOf(user.forkBox('sb', { name: 'sb-copy' }));
    expect(e.status).toBe(409);
    expect(e.code).toBe('invalid-state');
    expect(e.message).toBe('fork needs a microvm box; sb runs on sandbox');
    expect(await boxNames()).not.toContain('sb-copy');
  });

  it('refuses a stopped (or still starting) box with 409', async () => {
    await user.createBox({ name: 'fresh', template: 'tiny', runtime: 'microvm', resources: small });
    const early = await problemOf(user.forkBox('fresh', { name: 'fresh-copy' }));
    expect([early.status, early.code]).toEqual([409, 'invalid-state']);
    await until(async () => (await converge(), user.getBox('fresh')), (b) => b.phase === 'running');
    await user.boxVerb('fresh', 'stop');
    await until(async () => (await converge(), user.getBox('fresh')), (b) => b.phase === 'stopped');
    const e = await problemOf(user.forkBox('fresh', { name: 'fresh-copy' }));
    expect(e.status).toBe(409);
    expect(e.code).toBe('invalid-state');
    expect(e.message).toContain('running or paused');
    expect(await boxNames()).not.toContain('fresh-copy');
  });

  it('creates none when the quota allows fewer than count', async () => {
    const mine = (await user.listBoxes()).filter((b) => b.owner === 'admin').length;
    const allocated = await vmAllocated();
    await user.setQuota('user:admin', { boxes: mine + 2 });
    try {
      const e = await problemOf(user.forkBox('src', { name: 'quota', count: 3 }));
      expect(e.status).toBe(403);
      expect(e.code).toBe('quota-exceeded');
      expect(e.problem).toMatchObject({ scope: 'user:admin', resource: 'boxes', limit: mine + 2 });
      expect((await boxNames()).filter((n) => n.startsWith('quota'))).toEqual([]);
      expect(await vmAllocated()).toEqual(allocated);
      // Within the quota it goes through.
      expect((await user.forkBox('src', { name: 'quota', count: 2 })).map((b) => b.name)).toEqual(['quota-1', 'quota-2']);
    } finally {
      await user.deleteQuota('user:admin');
    }
  });

  it('creates none when one of the names is taken', async () => {
    await user.forkBox('src', { name: 'clash-2' });
    const allocated = await vmAllocated();
    const e = await problemOf(user.forkBox('src', { name: 'clash', count: 3 }));
    expect(e.status).toBe(409);
    expect(e.code).toBe('conflict');
    expect(e.message).toContain('clash-2');
    expect((await boxNames()).filter((n) => n.startsWith('clash'))).toEqual(['clash-2']);
    expect(await vmAllocated()).toEqual(allocated);
    const self = await problemOf(user.forkBox('src', { name: 'src' }));
    expect([self.status, self.code]).toEqual([409, 'conflict']);
  });

  it("creates none when the source's node lacks room for all of them", async () => {
    const allocated = await vmAllocated();
    const e = await problemOf(user.forkBox('src', { name: 'big', count: 16 }));
    expect(e.status).toBe(409);
    expect(e.code).toBe('no-capacity');
    expect(e.message).toContain('node-vm');
    expect(e.message).toContain('not enough free CPU');
    expect((await boxNames()).filter((n) => n.startsWith('big'))).toEqual([]);
    expect(await vmAllocated()).toEqual(allocated);
  });

  it('validates the request: count 1–16, names with their suffix', async () => {
    for (const body of [{ name: 'x', count: 0 }, { name: 'x', count: 17 }, { name: 'x', count: 1.5 }, { name: 'Bad' }, { name: 'x', extra: 1 }]) {
      const e = await problemOf(user.request('POST', '/v1/boxes/src/fork', { body }));
      expect(e.status, JSON.stringify(body)).toBe(400);
    }
    const long = await problemOf(user.forkBox('src', { name: 'a'.repeat(39), count: 2 }));
    expect([long.status, long.problem.field]).toEqual([400, 'name']);
    expect((await problemOf(user.forkBox('missing', { name: 'x' }))).status).toBe(404);
  });

  it("forks another user's box with ?owner= for whoever may manage it; the forks are the caller's", async () => {
    const mia = new DevyardClient({ url: fx.cp.url, token: (await user.createServiceAccount('mia', 'member')).token });
    const miaBox = await runningVm('mine', mia);
    // Another member may not even see it.
    const max = new DevyardClient({ url: fx.cp.url, token: (await user.createServiceAccount('max', 'member')).token });
    expect((await problemOf(max.forkBox('mine', { name: 'stolen' }, 'mia'))).status).toBe(404);
    // The organization's owner may manage it: the fork is the owner's, in the owner's organization.
    const [copy] = await user.forkBox('mine', { name: 'from-mia' }, 'mia');
    expect(copy).toMatchObject({ owner: 'admin', forkOf: 'mine', node: 'node-vm' });
    expect((await mia.listBoxes()).map((b) => b.name)).not.toContain('from-mia');
    const set = await asNode(vmNode).getDesiredSet(vmNode);
    expect(set.boxes.find((b) => b.name === 'from-mia')?.forkOf).toBe(miaBox.id);
  });
});
