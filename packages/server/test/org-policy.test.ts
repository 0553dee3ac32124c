/**
 * Organizations are an operator's decision: a member (or the owner of another organization) who
 * could create one would own it, publish templates in it and run boxes with no quota. Every new
 * organization starts with the installation's default quota, which only operators change.
 */
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { DevyardClient } from '@devyard/sdk/devyard-client';
import { startControlPlane } from '@devyard/server/control-plane';
import { problemOf } from './test-control-plane.js';

const DEFAULT_QUOTA = { boxes: 2, runningBoxes: 2, cpuMillis: 4000, memoryBytes: 4 * 1024 ** 3 };

async function plane(orgs: Parameters<typeof startControlPlane>[0]['orgs']) {
  const dir = mkdtempSync(join(tmpdir(), 'devyard-orgs-'));
  const cp = await startControlPlane({ dataDir: dir, orgs });
  const operator = new DevyardClient({ url: cp.url, token: cp.tokens.adminToken });
  const as = (token: string) => new DevyardClient({ url: cp.url, token });
  return { cp, operator, as, close: async () => (await cp.close(), rmSync(dir, { recursive: true, force: true })) };
}

describe('organization creation (operators only, the default)', () => {
  let p: Awaited<ReturnType<typeof plane>>;
  let member: DevyardClient;
  let acmeOwner: DevyardClient;

  beforeAll(async () => {
    p = await plane({ defaultQuota: DEFAULT_QUOTA });
    member = p.as((await p.operator.createServiceAccount('mallory', 'member')).token);
  });
  afterAll(async () => {
    await p?.close();
  });

  it('refuses a member who tries to create an organization, and creates nothing', async () => {
    const refused = await problemOf(member.createOrg('mallory-inc'));
    expect([refused.status, refused.code]).toEqual([403, 'forbidden']);
    expect(refused.message).toMatch(/operators/);
    expect((await p.operator.listOrgs()).map((o) => o.name)).not.toContain('mallory-inc');
  });

  it('an operator creates one; it starts with the default quota, which its own owner cannot lift', async () => {
    await p.operator.createOrg('acme');
    acmeOwner = p.as((await p.operator.createToken({ name: 'in-acme', org: 'acme' })).token);
    expect(await acmeOwner.listQuotas()).toEqual([{ scope: 'org', limits: DEFAULT_QUOTA, usage: expect.objectContaining({ boxes: 0 }) }]);
    // The owner of acme is no operator: neither the organization's quota nor other organizations are theirs.
    expect((await problemOf(acmeOwner.setQuota('org', { boxes: 1000 }))).status).toBe(403);
    expect((await problemOf(acmeOwner.deleteQuota('org'))).status).toBe(403);
    expect((await problemOf(acmeOwner.createOrg('acme-two'))).status).toBe(403);
    expect((await problemOf(acmeOwner.setQuota('org', { boxes: 1000 }, 'default'))).status).toBe(403);
    expect(await acmeOwner.listQuotas()).toEqual([expect.objectContaining({ scope: 'org', limits: DEFAULT_QUOTA })]);
    // Dividing the allotment among users stays theirs.
    await acmeOwner.setQuota('user:admin', { boxes: 1 });
  });

  it("the default quota holds: the organization's third box is refused", async () => {
    await p.operator.setQuota('user:admin', { boxes: 5 }, 'acme');
    await acmeOwner.createBox({ name: 'one', template: 'tiny' });
    await acmeOwner.createBox({ name: 'two', template: 'tiny' });
    const third = await problemOf(acmeOwner.createBox({ name: 'three', template: 'tiny' }));
    expect([third.status, third.code]).toEqual([403, 'quota-exceeded']);
    expect(third.problem).toMatchObject({ scope: 'org', resource: 'boxes', limit: 2 });
  });

  it('an operator changes it for that organization, and sees every quota in it', async () => {
    await p.operator.setQuota('org', { ...DEFAULT_QUOTA, boxes: 3, runningBoxes: 3 }, 'acme');
    await acmeOwner.createBox({ name: 'three', template: 'tiny' });
    const seen = await p.operator.listQuotas('acme');
    expect(seen.map((q) => q.scope).sort()).toEqual(['org', 'user:admin']);
    expect(seen.find((q) => q.scope === 'org')).toMatchObject({ limits: { boxes: 3 }, usage: { boxes: 3 } });
    expect((await problemOf(p.operator.listQuotas('nope'))).status).toBe(404);
    expect((await problemOf(member.listQuotas('acme'))).status).toBe(403);
  });
});

describe('organization creation open to anyone (--org-creation anyone)', () => {
  let p: Awaited<ReturnType<typeof plane>>;
  beforeAll(async () => {
    p = await plane({ creation: 'anyone', defaultQuota: DEFAULT_QUOTA });
  });
  afterAll(async () => {
    await p?.close();
  });

  it('lets a member create one, with the default quota', async () => {
    const member = p.as((await p.operator.createServiceAccount('dana', 'member')).token);
    await member.createOrg('dana-labs');
    const inOrg = p.as((await member.createToken({ name: 'labs', org: 'dana-labs' })).token);
    expect((await inOrg.getMe()).role).toBe('owner');
    expect(await inOrg.listQuotas()).toEqual([expect.objectContaining({ scope: 'org', limits: DEFAULT_QUOTA })]);
    expect((await problemOf(inOrg.deleteQuota('org'))).status).toBe(403);
  });
});
