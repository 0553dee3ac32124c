/**
 * Warm pools against a real control plane and store: the filler keeps N boxes ready, `create`
 * claims one atomically, the pool refills, and a new template version retires the old pool.
 * The node agent is a scripted test double that reports every desired box as converged.
 */
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { DevyardClient } from '@devyard/sdk/devyard-client';
import { startControlPlane, type ControlPlane } from '@devyard/server/control-plane';
import { DEFAULT_ORG_ID, WARM_POOL_OWNER } from '@devyard/server/services/box-service';
import { problemOf } from './test-control-plane.js';

let dir: string;
let cp: ControlPlane;
let user: DevyardClient;
let node: DevyardClient;
let nodeId: string;
let agentLoop: NodeJS.Timeout;
/** Why the scripted agent's last pass failed, if it did: a wait that times out says so. */
let agentError: unknown;

const pool = () => cp.store.listBoxes({ owner: WARM_POOL_OWNER });
async function until<T>(fn: () => Promise<T>, ok: (v: T) => boolean, ms = 10_000): Promise<T> {
  const end = Date.now() + ms;
  for (;;) {
    const v = await fn();
    if (ok(v)) return v;
    if (Date.now() > end) throw new Error(`condition not met: ${JSON.stringify(v).slice(0, 500)}${agentError ? `; the scripted agent's last pass failed: ${String(agentError)}` : ''}`);
    await new Promise((r) => setTimeout(r, 25));
  }
}

beforeAll(async () => {
  dir = mkdtempSync(join(tmpdir(), 'devyard-pool-'));
  cp = await startControlPlane({ dataDir: dir, poolSize: (t) => (t.name === 'tiny' || t.name === 'btpl' ? 2 : 0) });
  user = new DevyardClient({ url: cp.url, token: cp.tokens.adminToken });
  const joinClient = new DevyardClient({ url: cp.url, token: cp.tokens.nodeToken });
  const reg = await joinClient.registerNode({
    name: 'n1',
    arch: 'x86_64',
    region: null,
    labels: {},
    runtimes: ['sandbox'],
    capacity: { cpuMillis: 64_000, memoryBytes: 64 * 1024 ** 3, diskBytes: 1024 ** 4 },
    images: [],
    agentUrl: 'http://127.0.0.1:1',
  });
  nodeId = reg.nodeId;
  node = new DevyardClient({ url: cp.url, token: reg.credential! });
  const converge = async () => {
    const set = await node.getDesiredSet(nodeId);
    await node.reportStatus(
      nodeId,
      set.boxes.map((b) => ({ boxId: b.boxId, phase: b.desiredState, observedGeneration: b.generation, operationId: b.operationId, ip: null, error: null, message: '' })),
    );
  };
  agentLoop = setInterval(() => void converge().then(() => (agentError = undefined), (e: unknown) => (agentError = e)), 20);
});

afterAll(async () => {
  clearInterval(agentLoop);
  await cp.close();
  rmSync(dir, { recursive: true, force: true });
});

describe('warm pools', () => {
  it('keeps the pool filled with ready boxes, invisible to users', async () => {
    const ready = await until(pool, (p) => p.filter((b) => b.phase === 'running').length === 2);
    expect(ready.every((b) => b.templateName === 'tiny')).toBe(true);
    expect(await user.listBoxes()).toEqual([]);
  });

  it('create claims a pool box: running at once, renamed, owned by the caller', async () => {
    const poolIds = new Set((await pool()).map((b) => b.id));
    const box = await user.createBox({ name: 'mine', template: 'tiny' });
    expect(poolIds.has(box.id)).toBe(true);
    expect(box).toMatchObject({ name: 'mine', owner: 'admin', phase: 'running' });
    expect((await user.boxEvents('mine')).map((e) => e.type)).toContain('Claimed');
    // The pool refills behind the claim.
    await until(pool, (p) => p.filter((b) => b.phase === 'running').length === 2);
  });

  it('never hands one pool box to two concurrent creates', async () => {
    await until(pool, (p) => p.filter((b) => b.phase === 'running').length === 2);
    const poolIds = new Set((await pool()).map((b) => b.id));
    const boxes = await Promise.all(Array.from({ length: 6 }, (_, i) => user.createBox({ name: `race${i}`, template: 'tiny' })));
    const ids = boxes.map((b) => b.id);
    expect(new Set(ids).size).toBe(6);
    expect(ids.filter((id) => poolIds.has(id)).length).toBe(2);
  });

  it('does not claim when the request differs from the pool (resources, env)', async () => {
    await until(pool, (p) => p.filter((b) => b.phase === 'running').length === 2);
    const poolIds = new Set((await pool()).map((b) => b.id));
    const big = await user.createBox({ name: 'big', template: 'tiny', resources: { memory: '512MiB' } });
    const env = await user.createBox({ name: 'withenv', template: 'tiny', env: { A: '1' } });
    expect(poolIds.has(big.id) || poolIds.has(env.id)).toBe(false);
    expect(big.phase).toBe('pending');
  });

  it('refuses a claim under a name already taken, and changes nothing', async () => {
    const before = (await pool()).map((b) => b.id).sort();
    await expect(user.createBox({ name: 'mine', template: 'tiny' })).rejects.toMatchObject({ status: 409 });
    expect((await pool()).map((b) => b.id).sort()).toEqual(before);
  });

  it('a new template version retires the old pool and fills a new one', async () => {
    const t = await user.getTemplate('tiny');
    await user.createTemplate({ name: 'tiny', image: 'tiny', runtime: 'sandbox', description: 'v2' });
    const fresh = await until(pool, (p) => p.length === 2 && p.every((b) => b.templateVersion === t.version + 1 && b.phase === 'running'));
    expect(fresh).toHaveLength(2);
  });

  it("a pool is its template's organization's: counted against its quota, claimed only by its members, holding no secrets until claimed", async () => {
    // The default organization has a secret; another organization publishes a template with a pool.
    await user.putSecret('org', 'A_SECRET', 'default-org-value');
    await user.createOrg('tenant-b');
    await user.setQuota('org', { boxes: 1 }, 'tenant-b');
    // Trusted, so its pool runs on this test's sandbox-only node.
    await user.setOrgTrust('tenant-b', true);
    const b = new DevyardClient({ url: cp.url, token: (await user.createToken({ name: 'in-b', org: 'tenant-b' })).token });
    await b.putSecret('org', 'B_SECRET', 'tenant-b-value');
    await b.createTemplate({ name: 'btpl', image: 'tiny', runtime: 'sandbox' });
    const bPool = async () => (await pool()).filter((x) => x.templateName === 'btpl');
    const [pooled] = await until(bPool, (p) => p.length === 1 && p[0]!.phase === 'running');
    // The quota of 1 box holds the pool of 2 at one.
    await new Promise((r) => setTimeout(r, 300));
    expect(await bPool()).toHaveLength(1);
    expect(pooled!.orgId).not.toBe(DEFAULT_ORG_ID);
    expect(pooled!.orgId).toBe((await cp.store.getTemplate('btpl'))!.orgId);
    const desired = async () => (await node.getDesiredSet(nodeId)).boxes.find((x) => x.boxId === pooled!.id)!;
    expect(await desired()).toMatchObject({ pooled: true, secrets: [] });
    // Not the default organization's to claim: the template does not even exist for it.
    expect((await problemOf(user.createBox({ name: 'steal', template: 'btpl' }))).status).toBe(400);
    // Claimed by tenant-b: the box and its secrets are tenant-b's, never the default organization's.
    const claimed = await b.createBox({ name: 'mine-b', template: 'btpl' });
    expect(claimed.id).toBe(pooled!.id);
    const after = await until(desired, (x) => !x.pooled && x.secrets.length > 0);
    expect(after.secrets).toEqual([{ name: 'B_SECRET', value: 'tenant-b-value' }]);
  });
});
