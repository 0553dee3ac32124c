/**
 * The host side of box secrets without a box: the per-box tmpfs directory (layout, owners, modes,
 * whole-set swaps, removal), the agent state file that must never hold a value, and the masking of
 * values in what the agent reports.
 */
import { existsSync, lstatSync, mkdtempSync, readdirSync, readFileSync, readlinkSync, rmSync, statSync, statfsSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { BoxSecretsDir } from '@devyard/agent/runtime/box-secrets-dir';
import { loadAgentState, saveAgentState, type AgentState } from '@devyard/agent/agent-state-file';
import { redactSecrets } from '@devyard/agent/node-agent';
import { DesiredBoxSchema } from '@devyard/api/node-schemas';

const OWNER = { uid: 100_000, gid: 100_000 };
let base: string;
let secrets: BoxSecretsDir;

beforeAll(() => {
  base = mkdtempSync(join(tmpdir(), 'devyard-secrets-dir-'));
  secrets = new BoxSecretsDir({ root: join(base, 'root'), owner: OWNER });
});

afterAll(async () => {
  await secrets.remove('b_one').catch(() => undefined);
  await secrets.teardown();
  rmSync(base, { recursive: true, force: true });
});

describe('the per-box secrets directory', () => {
  it('lives on a tmpfs (mounted when the root is not on one) and belongs to box root', async () => {
    await secrets.write('b_one', [
      { name: 'A_TOKEN', value: 'a-value' },
      { name: 'MULTI', value: 'line1\nline2\n' },
    ]);
    expect(statfsSync(secrets.root).type).toBe(0x01021994);
    expect(statSync(secrets.root).mode & 0o777).toBe(0o711);
    const dir = secrets.path('b_one');
    expect([statSync(dir).mode & 0o777, statSync(dir).uid, statSync(dir).gid]).toEqual([0o700, OWNER.uid, OWNER.gid]);
    const f = statSync(join(dir, 'A_TOKEN'));
    expect([f.mode & 0o777, f.uid]).toEqual([0o400, OWNER.uid]);
    expect(readFileSync(join(dir, 'MULTI'), 'utf8')).toBe('line1\nline2\n');
    // NAME → ..data/NAME → ..<version>/NAME: relative links, so they resolve inside the box too.
    expect(readlinkSync(join(dir, 'A_TOKEN'))).toBe('..data/A_TOKEN');
    expect(readlinkSync(join(dir, '..data'))).toMatch(/^\.\.[a-z0-9]+_[0-9a-f]{8}$/);
    expect(lstatSync(join(dir, 'A_TOKEN')).uid).toBe(OWNER.uid);
    expect(await secrets.read('b_one')).toEqual({ A_TOKEN: 'a-value', MULTI: 'line1\nline2\n' });
  });

  it('replaces the whole set at once and leaves no earlier version behind', async () => {
    await secrets.write('b_one', [
      { name: 'A_TOKEN', value: 'a-2' },
      { name: 'B_TOKEN', value: 'b-1' },
    ]);
    const dir = secrets.path('b_one');
    expect(readdirSync(dir).sort()).toEqual(['..data', readlinkSync(join(dir, '..data')), 'A_TOKEN', 'B_TOKEN'].sort());
    expect(await secrets.read('b_one')).toEqual({ A_TOKEN: 'a-2', B_TOKEN: 'b-1' });
    await secrets.write('b_one', []);
    expect(await secrets.read('b_one')).toEqual({});
    expect(readdirSync(dir).filter((e) => !e.startsWith('..'))).toEqual([]);
  });

  it('keeps what is there on ensure, removes everything on remove, and refuses bad names', async () => {
    await secrets.write('b_one', [{ name: 'KEEP', value: 'k' }]);
    await secrets.ensure('b_one');
    expect(await secrets.read('b_one')).toEqual({ KEEP: 'k' });
    await expect(secrets.write('b_one', [{ name: '../evil', value: 'x' }])).rejects.toThrow(/invalid secret name/);
    expect(() => secrets.path('../b')).toThrow(/invalid box id/);
    await secrets.remove('b_one');
    expect(existsSync(secrets.path('b_one'))).toBe(false);
    expect(await secrets.read('b_one')).toEqual({});
  });
});

describe('the agent state file', () => {
  it('is written without any secret and loads with empty sets', () => {
    const file = join(base, 'agent-state.json');
    const box = DesiredBoxSchema.parse({
      boxId: 'b_x',
      name: 'x',
      desiredState: 'running',
      generation: 1,
      operationId: 'b_x:1.1',
      image: 'tiny',
      runtime: 'sandbox',
      resources: { cpuMillis: 100, memoryBytes: 1, diskBytes: 1 },
      env: {},
      secrets: [{ name: 'STATE_TOKEN', value: 'never-on-disk-9d2e' }],
    });
    const state: AgentState = { serverUrl: 'http://s', nodeId: 'n', sessionKey: 'k', desired: { nodeId: 'n', revision: 1, boxes: [box], prebuilds: [] }, failedOperations: {}, setup: {} };
    saveAgentState(file, state);
    expect(readFileSync(file, 'utf8')).not.toContain('never-on-disk-9d2e');
    expect(readFileSync(file, 'utf8')).not.toContain('STATE_TOKEN');
    // The caller's state in memory keeps them.
    expect(state.desired!.boxes[0]!.secrets).toHaveLength(1);
    expect(loadAgentState(file, 'http://s').desired!.boxes[0]!.secrets).toEqual([]);
  });
});

describe('masking', () => {
  it('replaces values (and long lines of multi-line values) in reported text', () => {
    const s = [{ value: 'tok-123456' }, { value: 'abc' }, { value: '-----BEGIN KEY-----\nMIIEpAIBAAKCAQEA\n-----END KEY-----' }];
    expect(redactSecrets('got tok-123456 and abc', s)).toBe('got *** and abc');
    expect(redactSecrets('line: MIIEpAIBAAKCAQEA', s)).toBe('line: ***');
    expect(redactSecrets('nothing here', undefined)).toBe('nothing here');
  });
});
