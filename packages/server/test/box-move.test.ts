/**
 * Moves of paused microvm boxes between nodes through the API, against a real control plane and
 * SQLite store: the box bound to the new node with its reservation moved in the same transaction,
 * `restoreFrom` (the old node's agent and a token signed with its key) in the new node's desired
 * set, the box kept paused in the old node's set until the new node has it and deleted there
 * afterwards, a failed import going back, and the refusals. The node agents are scripted test
 * doubles speaking the agent protocol (the snapshot transfer itself is the agent's tests').
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { Box } from '@devyard/api/box-schemas';
import type { DesiredBox, DesiredSet } from '@devyard/api/node-schemas';
import type { Phase } from '@devyard/core/box-lifecycle';
import { verifySessionToken } from '@devyard/api/session-tokens';
import { DomainError } from '@devyard/core/domain-error';
import { DevyardClient } from '@devyard/sdk/devyard-client';
import { problemOf, startTestControlPlane, until, type TestControlPlane } from './test-control-plane.js';

const small = { cpu: '250m', memory: '64MiB', disk: '1GiB' };
const GiB = 1024 ** 3;

interface VmNode {
  id: string;
  name: string;
  key: string;
  agentUrl: string;
}

/** Each node's own client (a node speaks only for itself). */
const nodeClients = new Map<string, DevyardClient>();
const asNode = (id: string) => nodeClients.get(id) ?? fx.node;
let fx: TestControlPlane;
let user: DevyardClient;
/** Two nodes that offer microvm (node-a, the fixture's, offers only sandbox). */
const vm: VmNode[] = [];



async function registerVmNode(name: string, agentUrl: string, capacity = { cpuMillis: 4000, memoryBytes: 4 * GiB, diskBytes: 100 * GiB }): Promise<VmNode> {
  const reg = await fx.join.registerNode({ name, arch: 'x86_64', region: null, labels: {}, runtimes: ['sandbox', 'microvm'], capacity, images: ['tiny'], agentUrl });
  nodeClients.set(reg.nodeId, new DevyardClient({ url: fx.cp.url, token: reg.credential! }));
  return { id: reg.nodeId, name, key: reg.sessionKey, agentUrl };
}

const desired = (n: { id: string }): Promise<DesiredSet> => asNode(n.id).getDesiredSet(n.id);
const entryOn = async (n: { id: string }, boxId: string): Promise<DesiredBox | undefined> => (await desired(n)).boxes.find((b) => b.boxId === boxId);

/** Reports a phase for the box as the node's agent would: for the operation of its desired entry. */
async function report(n: { id: string }, boxId: string, phase: Phase, opts: { error?: string; message?: string } = {}): Promise<void> {
  const e = await entryOn(n, boxId);
  if (!e) throw new Error(`box ${boxId} is not in the desired set of ${n.id}`);
  await asNode(n.id).reportStatus(n.id, [{ boxId, phase, observedGeneration: e.generation, operationId: e.operationId, ip: null, error: opts.error ?? null, message: opts.message ?? '' }]);
}

/** Plays every node's agent once: each desired box reaches its desired state (imports succeed). */
async function converge(): Promise<void> {
  for (const n of [{ id: fx.nodeId }, ...vm]) {
    const set = await desired(n);
    await asNode(n.id).reportStatus(
      n.id,
      set.boxes.map((b) => ({ boxId: b.boxId, phase: b.desiredState, observedGeneration: b.generation, operationId: b.operationId, ip: '10.0.9.2', error: null, message: '' })),
    );
  }
}

/** Creates a microvm box and drives it to paused. */
async function pausedVm(name: string): Promise<Box> {
  await user.createBox({ name, template: 'tiny', runtime: 'microvm', resources: small });
  await until(async () => (await converge(), user.getBox(name)), (b) => b.phase === 'running');
  await user.boxVerb(name, 'pause');
  return until(async () => (await converge(), user.getBox(name)), (b) => b.phase === 'paused' && b.observedGeneration === b.generation);
}

const nodeByName = (name: string | null) => vm.find((n) => n.name === name)!;
const otherThan = (name: string | null) => vm.find((n) => n.name !== name)!;
const allocated = async () => Object.fromEntries((await user.listNodes()).map((n) => [n.name, n.allocated]));

/** Keeps the nodes ready: a test that runs long must not see the 20 s node lease run out. */
async function heartbeatAll(): Promise<void> {
  for (const n of [{ id: fx.nodeId }, ...vm]) await asNode(n.id).heartbeat(n.id);
}

/** Lets the node's lease run out (as if its agent stopped sending heartbeats); a heartbeat makes it ready again. */
async function expireLease(name: string): Promise<void> {
  for (;;) {
    const n = (await fx.cp.store.getNodeByName(name))!;
    try {
      await fx.cp.store.updateNode({ ...n, leaseExpiresAt: Date.now() - 1000 }, n.version);
      return;
    } catch (e) {
      if (!(e instanceof DomainError && e.code === 'conflict')) throw e;
    }
  }
}

beforeAll(async () => {
  fx = await startTestControlPlane('move', { cpuMillis: 4000, memoryBytes: 4 * GiB });
  user = fx.user;
  vm.push(await registerVmNode('node-vm1', 'http://127.0.0.1:11'), await registerVmNode('node-vm2', 'http://127.0.0.1:12'));
});

afterAll(async () => {
  await fx?.close();
});

describe('move', () => {
  it('binds a paused box to the named node, moves its reservation and tells both nodes; the box is paused there once the new node has it', async () => {
    const box = await pausedVm('trip');
    const src = nodeByName(box.node);
    const dst = otherThan(box.node);
    const before = await allocated();

    const res = await fetch(`${fx.cp.url}/v1/boxes/trip/move`, {
      method: 'POST',
      headers: { authorization: `Bearer ${fx.cp.tokens.adminToken}`, 'content-type': 'application/json' },
      body: JSON.stringify({ node: dst.name }),
    });
    expect(res.status).toBe(202);
    const moving = (await res.json()) as Box;
    expect(moving).toMatchObject({ name: 'trip', node: dst.name, movingFrom: src.name, desiredState: 'paused', phase: 'provisioning', generation: box.generation + 1 });
    expect(res.headers.get('etag')).toBe(`"v${moving.version}"`);
    expect((await user.getBox('trip')).movingFrom).toBe(src.name);
    expect((await user.listBoxes()).find((b) => b.name === 'trip')?.movingFrom).toBe(src.name);

    // The whole reservation moved, in the same transaction.
    const after = await allocated();
    for (const k of ['cpuMillis', 'memoryBytes', 'diskBytes'] as const) {
      expect(after[dst.name]![k] - before[dst.name]![k]).toBe(box.resources[k]);
      expect(before[src.name]![k] - after[src.name]![k]).toBe(box.resources[k]);
    }

    // The new node restores from the old node's agent, with a token signed with the OLD node's key.
    const onDst = (await entryOn(dst, box.id))!;
    expect(onDst).toMatchObject({ desiredState: 'paused', generation: moving.generation, runtime: 'microvm', resources: box.resources });
    expect(onDst.restoreFrom?.agentUrl).toBe(src.agentUrl);
    const claims = verifySessionToken(onDst.restoreFrom!.token, src.key, Date.now());
    expect(claims).toMatchObject({ boxId: box.id, sub: `node:${dst.id}` });
    expect(claims!.exp - Date.now()).toBeGreaterThan(14 * 60_000);
    expect(claims!.exp - Date.now()).toBeLessThanOrEqual(15 * 60_000);
    expect(verifySessionToken(onDst.restoreFrom!.token, dst.key, Date.now())).toBeNull();
    // The old node keeps it paused (its agent keeps the snapshot to hand over); no secrets, nothing to restore.
    expect(await entryOn(src, box.id)).toMatchObject({ desiredState: 'paused', restoreFrom: null, secrets: [], name: 'trip', runtime: 'microvm' });
    expect(await entryOn({ id: fx.nodeId }, box.id)).toBeUndefined();

    // What the old node says of the box now changes nothing.
    await report(src, box.id, 'paused');
    await report(src, box.id, 'deleted');
    await report(src, box.id, 'running', { error: 'stray' });
    expect(await user.getBox('trip')).toMatchObject({ phase: 'provisioning', node: dst.name, movingFrom: src.name, lastError: null });

    // Nothing else happens to the box during the move; asking to pause it again is a no-op.
    const busy = await problemOf(user.boxVerb('trip', 'resume'));
    expect([busy.status, busy.code]).toEqual([409, 'invalid-state']);
    expect(busy.message).toBe(`box trip is moving from node ${src.name} to node ${dst.name}; resume it once the move is done`);
    expect((await user.boxVerb('trip', 'pause')).generation).toBe(moving.generation);
    const again = await problemOf(user.moveBox('trip', { node: src.name }));
    expect([again.status, again.message]).toEqual([409, `box trip is already moving from node ${src.name} to node ${dst.name}`]);

    // The new node imports it and reports it paused: the move is done, the old node deletes its copy.
    await report(dst, box.id, 'provisioning', { message: `fetching the paused box from ${src.agentUrl}` });
    expect((await user.getBox('trip')).phase).toBe('provisioning');
    await report(dst, box.id, 'paused');
    const moved = await user.getBox('trip');
    expect(moved).toMatchObject({ phase: 'paused', node: dst.name, observedGeneration: moving.generation });
    expect(moved.movingFrom).toBeUndefined();
    expect(moved.conditions.find((c) => c.type === 'Scheduled')).toMatchObject({ reason: 'Moved', message: `moved from ${src.name} to ${dst.name}` });
    expect((await entryOn(dst, box.id))?.restoreFrom).toBeNull();
    expect(await entryOn(src, box.id)).toMatchObject({ desiredState: 'deleted', restoreFrom: null, secrets: [] });
    // Not again until the old copy is gone.
    const early = await problemOf(user.moveBox('trip', { node: src.name }));
    expect([early.status, early.message]).toEqual([409, `the copy of box trip left on node ${src.name} by its last move is not deleted yet; move it once it is`]);

    await report(src, box.id, 'deleted');
    expect(await entryOn(src, box.id)).toBeUndefined();
    const types = (await user.boxEvents('trip')).map((e) => e.type);
    expect(types.slice(types.indexOf('MoveRequested'))).toEqual(['MoveRequested', 'Progress', 'PhaseChanged', 'Moved', 'MoveCleanedUp']);
    const events = await user.boxEvents('trip');
    expect(events.find((e) => e.type === 'MoveRequested')?.message).toBe(`move from node ${src.name} to node ${dst.name} requested by admin`);
    const audit = await user.listAudit({ order: 'desc', limit: 1000 });
    expect(audit.find((e) => e.action === 'moveBox' && e.result === 'ok')).toMatchObject({ actor: 'admin', target: 'box/trip' });

    // Resume on the new node is an ordinary resume: running there, nothing to restore from.
    await user.boxVerb('trip', 'resume');
    expect(await entryOn(dst, box.id)).toMatchObject({ desiredState: 'running', restoreFrom: null });
    expect(await entryOn(src, box.id)).toBeUndefined();
    const running = await until(async () => (await converge(), user.getBox('trip')), (b) => b.phase === 'running');
    expect(running.node).toBe(dst.name);
    expect((await allocated())[dst.name]).toEqual(after[dst.name]);
  });

  it('lets the scheduler pick the node when none is named, never the current one', async () => {
    await heartbeatAll();
    const box = await pausedVm('anywhere');
    const moving = await user.moveBox('anywhere');
    expect(moving.node).toBe(otherThan(box.node).name);
    expect(moving.movingFrom).toBe(box.node);
    const settled = await until(async () => (await converge(), user.getBox('anywhere')), (b) => b.phase === 'paused' && b.movingFrom === undefined);
    expect(settled.node).toBe(otherThan(box.node).name);
    await until(async () => (await converge(), entryOn(nodeByName(box.node), box.id)), (e) => e === undefined);
  });

  it('refuses what cannot move, changing nothing', async () => {
    await heartbeatAll();
    const box = await pausedVm('stay');
    const src = nodeByName(box.node);
    const dst = otherThan(box.node);
    const refuse = async (call: () => Promise<unknown>, status: number, code: string, message?: string) => {
      const before = await allocated();
      const e = await problemOf(call());
      expect([e.status, e.code], e.message).toEqual([status, code]);
      if (message !== undefined) expect(e.message).toBe(message);
      expect(await allocated()).toEqual(before);
      return e;
    };

    await refuse(() => user.moveBox('stay', { node: 'node-nope' }), 404, 'not-found', 'node "node-nope" not found');
    await refuse(() => user.moveBox('stay', { node: src.name }), 409, 'invalid-state', `box stay is on node ${src.name} already; name another node`);
    expect((await refuse(() => user.moveBox('stay', { node: 'node-a' }), 409, 'invalid-state')).message).toContain('runtime microvm not offered');
    expect((await problemOf(user.request('POST', '/v1/boxes/stay/move', { body: { node: '' } }))).status).toBe(400);
    expect((await problemOf(user.request('POST', '/v1/boxes/stay/move', { body: { to: dst.name } }))).status).toBe(400);
    await refuse(() => user.moveBox('nope', { node: dst.name }), 404, 'not-found');

    // A target without room: no capacity.
    const tiny = await registerVmNode('node-tiny', 'http://127.0.0.1:13', { cpuMillis: 100, memoryBytes: 4 * GiB, diskBytes: 100 * GiB });
    vm.push(tiny);
    expect((await refuse(() => user.moveBox('stay', { node: 'node-tiny' }), 409, 'no-capacity')).message).toBe('cannot move stay to node node-tiny: not enough free CPU');

    // A target that is not ready.
    await expireLease(dst.name);
    expect((await refuse(() => user.moveBox('stay', { node: dst.name }), 409, 'invalid-state')).message).toContain('node is not ready');
    await asNode(dst.id).heartbeat(dst.id);

    // The node the box is on must be ready: its agent is the only place the snapshot can come from.
    await expireLease(src.name);
    await refuse(
      () => user.moveBox('stay', { node: dst.name }),
      409,
      'invalid-state',
      `node ${src.name} is not ready: the snapshot of stay is on it and there is no snapshot store to fetch it from`,
    );
    await asNode(src.id).heartbeat(src.id);

    // Only paused microvm boxes move.
    await user.boxVerb('stay', 'resume');
    await refuse(() => user.moveBox('stay', { node: dst.name }), 409, 'invalid-state', 'move needs a paused box; stay is resuming (desired: running)');
    await until(async () => (await converge(), user.getBox('stay')), (b) => b.phase === 'running');
    await refuse(() => user.moveBox('stay', { node: dst.name }), 409, 'invalid-state', 'move needs a paused box; stay is running');
    await user.createBox({ name: 'sb', template: 'tiny', resources: small });
    await until(() => user.getBox('sb'), (b) => b.node !== null);
    await refuse(() => user.moveBox('sb', { node: dst.name }), 409, 'invalid-state', 'move needs a microvm box; sb runs on sandbox');

    const after = await user.getBox('stay');
    expect(after.node).toBe(src.name);
    expect(after.movingFrom).toBeUndefined();
    expect((await user.boxEvents('stay')).some((e) => e.type === 'MoveRequested')).toBe(false);
    vm.pop();
  });

  it('puts the box back on its old node, paused, when the new node cannot import it', async () => {
    await heartbeatAll();
    const box = await pausedVm('homesick');
    const src = nodeByName(box.node);
    const dst = otherThan(box.node);
    const before = await allocated();
    const moving = await user.moveBox('homesick', { node: dst.name });

    await report(dst, box.id, 'provisioning', { error: 'move failed: the previous node did not hand over the snapshot (503)' });
    const back = await until(() => user.getBox('homesick'), (b) => b.node === src.name);
    expect(back).toMatchObject({ phase: 'paused', desiredState: 'paused', generation: moving.generation + 1, lastError: null });
    expect(back.movingFrom).toBeUndefined();
    const failed = (await user.boxEvents('homesick')).find((e) => e.type === 'MoveFailed');
    expect(failed?.message).toBe(`move to node ${dst.name} failed: move failed: the previous node did not hand over the snapshot (503); the box stays paused on node ${src.name}`);
    expect(back.conditions.find((c) => c.type === 'Scheduled')).toMatchObject({ reason: 'MoveFailed' });
    // Not retried on the new node and never failed: the reservation is where the box is again.
    expect((await user.boxEvents('homesick')).some((e) => e.type === 'Retrying' || e.type === 'Failed')).toBe(false);
    expect(await allocated()).toEqual(before);
    const audit = await user.listAudit({ order: 'desc', limit: 1000 });
    expect(audit.find((e) => e.action === 'abortBoxMove')).toMatchObject({ actor: 'system:box-reconciler', target: 'box/homesick' });

    // The old node keeps it paused under a new operation and confirms it; the new node deletes what it got.
    expect(await entryOn(src, box.id)).toMatchObject({ desiredState: 'paused', generation: back.generation, restoreFrom: null });
    expect(await entryOn(dst, box.id)).toMatchObject({ desiredState: 'deleted', restoreFrom: null });
    await report(src, box.id, 'paused');
    await report(dst, box.id, 'deleted');
    expect(await entryOn(dst, box.id)).toBeUndefined();
    const settled = await user.getBox('homesick');
    expect(settled).toMatchObject({ phase: 'paused', node: src.name, observedGeneration: settled.generation });

    // It can move again, and resumes where it is.
    await user.moveBox('homesick', { node: dst.name });
    await until(async () => (await converge(), user.getBox('homesick')), (b) => b.node === dst.name && b.phase === 'paused' && b.movingFrom === undefined);
    await user.boxVerb('homesick', 'resume');
    expect((await until(async () => (await converge(), user.getBox('homesick')), (b) => b.phase === 'running')).node).toBe(dst.name);
  });

  it('deletes the box on both nodes when it is deleted during the move', async () => {
    await heartbeatAll();
    const box = await pausedVm('gone');
    const src = nodeByName(box.node);
    const dst = otherThan(box.node);
    const before = await allocated();
    await user.moveBox('gone', { node: dst.name });
    await user.deleteBox('gone');
    expect(await entryOn(dst, box.id)).toMatchObject({ desiredState: 'deleted', restoreFrom: null });
    expect(await entryOn(src, box.id)).toMatchObject({ desiredState: 'deleted' });
    await report(dst, box.id, 'deleted');
    await until(() => user.listBoxes(), (l) => !l.some((b) => b.name === 'gone'));
    // Finalized, but the old node is still told to delete its copy until it says it has.
    expect(await entryOn(src, box.id)).toMatchObject({ desiredState: 'deleted' });
    await report(src, box.id, 'deleted');
    expect(await entryOn(src, box.id)).toBeUndefined();
    const after = await allocated();
    for (const k of ['cpuMillis', 'memoryBytes', 'diskBytes'] as const) {
      expect(after[src.name]![k]).toBe(before[src.name]![k] - box.resources[k]);
      expect(after[dst.name]![k]).toBe(before[dst.name]![k]);
    }
  });

  it("moves another user's box with ?owner= for whoever may manage it; others do not see it", async () => {
    await heartbeatAll();
    const mia = new DevyardClient({ url: fx.cp.url, token: (await user.createServiceAccount('mia', 'member')).token });
    const max = new DevyardClient({ url: fx.cp.url, token: (await user.createServiceAccount('max', 'member')).token });
    await mia.createBox({ name: 'hers', template: 'tiny', runtime: 'microvm', resources: small });
    await until(async () => (await converge(), mia.getBox('hers')), (b) => b.phase === 'running');
    await mia.boxVerb('hers', 'pause');
    const box = await until(async () => (await converge(), mia.getBox('hers')), (b) => b.phase === 'paused');
    expect((await problemOf(max.moveBox('hers', { node: otherThan(box.node).name }, 'mia'))).status).toBe(404);
    const moved = await user.moveBox('hers', { node: otherThan(box.node).name }, 'mia');
    expect(moved).toMatchObject({ owner: 'mia', node: otherThan(box.node).name, movingFrom: box.node });
  });
});
