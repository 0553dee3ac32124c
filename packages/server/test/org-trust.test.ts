/**
 * Untrusted by default: an organization's boxes run in microVMs (their own guest kernel) unless an
 * operator marks the organization trusted; only then may they use the sandbox, which shares the
 * node's kernel. The default organization, the operator's own, is trusted.
 */
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { DevyardClient } from '@devyard/sdk/devyard-client';
import { startControlPlane, type ControlPlane } from '@devyard/server/control-plane';
import { problemOf } from './test-control-plane.js';

let dir: string;
let cp: ControlPlane;
let operator: DevyardClient;
let acme: DevyardClient;

beforeAll(async () => {
  dir = mkdtempSync(join(tmpdir(), 'devyard-trust-'));
  cp = await startControlPlane({ dataDir: dir });
  operator = new DevyardClient({ url: cp.url, token: cp.tokens.adminToken });
  await operator.createOrg('acme');
  acme = new DevyardClient({ url: cp.url, token: (await operator.createToken({ name: 'acme', org: 'acme' })).token });
});

afterAll(async () => {
  await cp?.close();
  if (dir) rmSync(dir, { recursive: true, force: true });
});

describe('organization trust decides the runtime', () => {
  it("the default organization is trusted: a sandbox template's boxes use the sandbox", async () => {
    expect((await operator.listOrgs()).find((o) => o.name === 'default')).toMatchObject({ trusted: true });
    expect((await operator.createBox({ name: 'local', template: 'tiny' })).runtime).toBe('sandbox');
  });

  it("a new organization is not: the same template's boxes run in microVMs, and asking for the sandbox is refused", async () => {
    expect((await operator.listOrgs()).find((o) => o.name === 'acme')).toMatchObject({ trusted: false });
    expect((await acme.createBox({ name: 'web', template: 'tiny' })).runtime).toBe('microvm');
    const refused = await problemOf(acme.createBox({ name: 'shared-kernel', template: 'tiny', runtime: 'sandbox' }));
    expect([refused.status, refused.code]).toEqual([403, 'forbidden']);
    expect(refused.message).toMatch(/microVMs/);
    expect((await acme.listBoxes()).map((b) => b.name)).toEqual(['web']);
  });

  it('only operators change it; then the sandbox is allowed', async () => {
    expect((await problemOf(acme.setOrgTrust('acme', true))).status).toBe(403);
    expect(await operator.setOrgTrust('acme', true)).toEqual({ name: 'acme', trusted: true });
    expect((await acme.createBox({ name: 'ci', template: 'tiny' })).runtime).toBe('sandbox');
    expect((await problemOf(operator.setOrgTrust('nope', true))).status).toBe(404);
  });

  it('taken back: its sandbox boxes do not start again; its microVM boxes do', async () => {
    await acme.boxVerb('ci', 'stop');
    await acme.boxVerb('web', 'stop');
    await operator.setOrgTrust('acme', false);
    const refused = await problemOf(acme.boxVerb('ci', 'start'));
    expect([refused.status, refused.message]).toEqual([403, expect.stringMatching(/recreate it/)]);
    expect((await acme.getBox('ci')).desiredState).toBe('stopped');
    expect((await acme.boxVerb('web', 'start')).desiredState).toBe('running');
  });
});
