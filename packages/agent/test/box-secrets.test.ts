/**
 * Secrets end to end, in process: a real control plane (SQLite) and a real sandbox node (crun) on
 * their own bridge and subnet. A box gets its secrets as files under /run/devyard/secrets and in
 * the environment of exec sessions; updates and deletes reach the running box; pause/resume
 * refreshes them; stop removes them; and afterwards no file of the installation (database and WAL,
 * the box's whole disk state, images, agent state) nor any captured log holds a value.
 */
import { existsSync, lstatSync, readdirSync, readFileSync, realpathSync, statSync, statfsSync } from 'node:fs';
import { chmod, mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Writable } from 'node:stream';
import pino from 'pino';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createSandboxNode, type SandboxNode } from '@devyard/agent/sandbox-node';
import { DevyardClient } from '@devyard/sdk/devyard-client';
import { execInBox } from '@devyard/sdk/exec-client';
import { startControlPlane, type ControlPlane } from '@devyard/server/control-plane';
import { run, startBox, testBoxSpec } from './sandbox-test-host.js';

const TAG = 'sec';
const OCTET = 246;
const BOX = 'sec-e2e';
// Distinct, greppable values: each must never show up anywhere on disk or in a log.
const V1 = 'dyv1-7c1e5a0f-first-user-value';
const V2 = 'dyv2-b3d94e21-second-user-value';
const ORG = 'dyvo-55e0a9c3-org-value';
const PAUSED = 'dyvp-0f6e2b88-set-while-paused';
const ALL = [V1, V2, ORG, PAUSED];

let dir: string;
let cp: ControlPlane;
let node: SandboxNode;
let client: DevyardClient;
let boxId: string;
const agentLog: string[] = [];
let serverLog: string;

async function waitFor<T>(fn: () => Promise<T>, ok: (v: T) => boolean, ms = 60_000): Promise<T> {
  const end = Date.now() + ms;
  for (;;) {
    const v = await fn().catch((e: Error) => e as unknown as T);
    if (!(v instanceof Error) && ok(v)) return v;
    if (Date.now() > end) throw new Error(`condition not met in ${ms} ms; last: ${v instanceof Error ? v.message : JSON.stringify(v)}`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

/** Runs a shell script in the box through an exec session (the path SSH and terminal sessions take). */
async function sh(script: string, env?: Record<string, string>): Promise<{ code: number; out: string; err: string }> {
  let out = '';
  let err = '';
  const sink = (add: (s: string) => void) =>
    new Writable({
      write(c: Buffer, _e, cb) {
        add(c.toString());
        cb();
      },
    });
  const code = await execInBox(await client.createExecSession(BOX), {
    argv: ['/bin/sh', '-c', script],
    ...(env ? { env } : {}),
    stdout: sink((s) => (out += s)),
    stderr: sink((s) => (err += s)),
  }).exited;
  return { code, out, err };
}

/** Every regular file under `root` (not following symlinks). */
function filesUnder(root: string): string[] {
  const out: string[] = [];
  const walk = (d: string) => {
    let entries: string[];
    try {
      entries = readdirSync(d);
    } catch {
      return;
    }
    for (const e of entries) {
      const p = join(d, e);
      const st = lstatSync(p);
      if (st.isDirectory()) walk(p);
      // A box's own disk: its files are read through its mount (the box directory's disk symlink),
      // not as one image file of the disk's full size.
      else if (st.isSymbolicLink() && e === 'disk') walk(realpathSync(p));
      else if (st.isFile() && !p.endsWith('.ext4')) out.push(p);
    }
  };
  walk(root);
  return out;
}

beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), `devyard-${TAG}-`));
  await chmod(dir, 0o711);
  serverLog = join(dir, 'server.log');
  cp = await startControlPlane({ dataDir: join(dir, 'server'), logger: pino({ level: 'debug' }, pino.destination({ dest: serverLog, sync: true })) });
  node = createSandboxNode({
    serverUrl: cp.url,
    token: cp.tokens.nodeToken,
    dataDir: join(dir, 'node'),
    bridge: `dyt${TAG}0`,
    subnet: `10.${OCTET}.0.0/16`,
    noPrebuilds: true,
    name: `${TAG}-node`,
    resyncMs: 1000,
    runtimes: ['sandbox'],
    log: (msg, fields) => agentLog.push(JSON.stringify({ msg, ...fields })),
  });
  await node.agent.start();
  client = new DevyardClient({ url: cp.url, token: cp.tokens.adminToken });
  // A hook that prints a secret: the agent must mask it before the line becomes an event.
  await client.createTemplate({ name: 'sec-tpl', image: 'tiny', hooks: { postStart: 'echo "hook sees $E2E_TOKEN"' } });
  await client.putSecret('user', 'E2E_TOKEN', V1);
  await client.putSecret('org', 'ORG_TOKEN', ORG);
  await client.createBox({ name: BOX, template: 'sec-tpl', resources: { cpu: 0.5, memory: '256MiB' } });
  boxId = (await waitFor(() => client.getBox(BOX), (b) => b.phase === 'running', 120_000)).id;
}, 180_000);

afterAll(async () => {
  await client?.deleteBox(BOX).catch(() => undefined);
  if (boxId) await waitFor(() => node.driver.inspect(boxId), (s) => s.state === 'absent', 30_000).catch(() => undefined);
  await node?.agent.stop();
  await cp?.close().catch(() => undefined);
  for (const b of (await node?.driver.list().catch(() => [])) ?? []) await node.driver.destroy(b.boxId).catch(() => undefined);
  if (boxId) await node?.driver.secrets.remove(boxId).catch(() => undefined);
  await node?.driver.teardownHost().catch(() => undefined);
  if (dir) await rm(dir, { recursive: true, force: true });
}, 120_000);

describe('secrets in a real box', () => {
  it("delivers them only to the node itself: the desired set, with the boxes' secrets, answers the node's own credential, not the join token", async () => {
    const stateFile = join(dir, 'node', 'agent', 'agent-state.json');
    const state = JSON.parse(readFileSync(stateFile, 'utf8')) as { nodeId: string; credential: string };
    expect(state.credential).toMatch(/^dy_n_/);
    expect(statSync(stateFile).mode & 0o777).toBe(0o600);
    const own = await new DevyardClient({ url: cp.url, token: state.credential }).getDesiredSet(state.nodeId);
    expect(own.boxes.find((b) => b.boxId === boxId)!.secrets.map((x) => x.name)).toContain('E2E_TOKEN');
    const joinToken = new DevyardClient({ url: cp.url, token: cp.tokens.nodeToken });
    await expect(joinToken.getDesiredSet(state.nodeId)).rejects.toMatchObject({ status: 403 });
    await expect(joinToken.registerNode({ name: `${TAG}-node`, arch: 'x86_64', region: null, labels: {}, runtimes: ['sandbox'], capacity: { cpuMillis: 1000, memoryBytes: 1024 ** 3, diskBytes: 1024 ** 3 }, images: [], agentUrl: 'http://127.0.0.1:9' })).rejects.toMatchObject({ status: 403 });
  });

  it('puts them on a read-only tmpfs at /run/devyard/secrets and into exec sessions', async () => {
    const files = await sh('cat /run/devyard/secrets/E2E_TOKEN; echo; cat /run/devyard/secrets/ORG_TOKEN; echo; ls /run/devyard/secrets');
    expect(files.out.split('\n')).toEqual([V1, ORG, 'E2E_TOKEN', 'ORG_TOKEN', '']);
    const env = await sh('echo "$E2E_TOKEN|$ORG_TOKEN"');
    expect(env.out.trim()).toBe(`${V1}|${ORG}`);
    // The session's own environment wins over a secret of the same name.
    expect((await sh('echo "$E2E_TOKEN"', { E2E_TOKEN: 'mine' })).out.trim()).toBe('mine');
    // Box root owns the files, nobody else may read them, and the box cannot change them.
    expect((await sh('stat -L -c "%a %u" /run/devyard/secrets/E2E_TOKEN; stat -c "%a %u" /run/devyard/secrets/')).out.trim().split('\n')).toEqual(['400 0', '700 0']);
    expect((await sh('echo x > /run/devyard/secrets/E2E_TOKEN')).code).not.toBe(0);
    expect((await sh('touch /run/devyard/secrets/NEW')).code).not.toBe(0);

    // On the host: a tmpfs, a 0700 directory and 0400 files of the box's root uid (its own range's first id).
    const hostDir = node.driver.secrets.path(boxId);
    expect(statfsSync(hostDir).type).toBe(0x01021994);
    expect(statSync(hostDir).mode & 0o777).toBe(0o700);
    const rootUid = node.driver.boxHostPaths(boxId).owner.uid;
    expect(statSync(hostDir).uid).toBe(rootUid);
    const file = statSync(join(hostDir, 'E2E_TOKEN'));
    expect([file.mode & 0o777, file.uid]).toEqual([0o400, rootUid]);

    // The postStart hook saw the secret; its output line became an event with the value masked.
    const events = await client.boxEvents(BOX);
    expect(JSON.stringify(events)).not.toContain(V1);
    expect(events.some((e) => e.message.includes('hook sees ***'))).toBe(true);
  });

  it('updates a running box when a value changes, and removes a deleted secret from it', async () => {
    await client.putSecret('user', 'E2E_TOKEN', V2);
    await waitFor(() => sh('cat /run/devyard/secrets/E2E_TOKEN'), (r) => r.out === V2, 15_000);
    expect((await sh('echo "$E2E_TOKEN"')).out.trim()).toBe(V2);

    await client.deleteSecret('org', 'ORG_TOKEN');
    await waitFor(() => sh('test -e /run/devyard/secrets/ORG_TOKEN && echo present || echo gone'), (r) => r.out.trim() === 'gone', 15_000);
    expect((await sh('echo "[${ORG_TOKEN-unset}]"; ls /run/devyard/secrets')).out.split('\n')).toEqual(['[unset]', 'E2E_TOKEN', '']);
  });

  it('gives a box started without the secrets flag (prebuild and image build boxes) no secrets at all', async () => {
    const image = await node.images.ensure('tiny');
    const id = 'b_secnoflag';
    await startBox(node.driver, testBoxSpec(id, image));
    try {
      // The user box next to it runs with its secrets meanwhile.
      expect((await sh('echo "$E2E_TOKEN"')).out.trim()).toBe(V2);
      const r = await run(node.driver, id, ['/bin/sh', '-c', 'ls -a /run/devyard/secrets 2>&1; env']);
      expect(r.out).toContain('No such file');
      for (const v of ALL) expect(r.out).not.toContain(v);
      expect(existsSync(node.driver.secrets.path(id))).toBe(false);
    } finally {
      await node.driver.destroy(id);
    }
  });

  it('refreshes them at resume: a secret set while the box was paused is there after it', async () => {
    await client.boxVerb(BOX, 'pause');
    await waitFor(() => client.getBox(BOX), (b) => b.phase === 'paused', 30_000);
    await client.putSecret('user', 'WHILE_PAUSED', PAUSED);
    await client.boxVerb(BOX, 'resume');
    await waitFor(() => client.getBox(BOX), (b) => b.phase === 'running', 30_000);
    expect((await sh('cat /run/devyard/secrets/WHILE_PAUSED; echo " $WHILE_PAUSED"')).out.trim()).toBe(`${PAUSED} ${PAUSED}`);
  });

  it('removes them at stop, and leaves no value on disk or in a log', async () => {
    await client.boxVerb(BOX, 'stop');
    await waitFor(() => client.getBox(BOX), (b) => b.phase === 'stopped', 60_000);
    expect(existsSync(node.driver.secrets.path(boxId))).toBe(false);

    // The mount point is all the box's upper layer keeps of them: empty directories.
    const upper = join(node.driver.boxHostPaths(boxId).rootUpper, 'run/devyard/secrets');
    if (existsSync(upper)) expect(readdirSync(upper)).toEqual([]);

    // Every file of the installation: database and WAL, keyring, the box's upper and volumes, its
    // config.json and box.json, images, agent-state.json; then the captured logs.
    const files = filesUnder(dir);
    expect(files.some((f) => f.endsWith('devyard.db'))).toBe(true);
    expect(files.some((f) => f.endsWith('agent-state.json'))).toBe(true);
    expect(files.some((f) => f.includes(join('boxes', boxId, 'upper')) || f.includes(join('boxes', boxId)))).toBe(true);
    for (const f of files) {
      const bytes = readFileSync(f);
      for (const v of ALL) expect(bytes.includes(Buffer.from(v)), `${v} in ${f}`).toBe(false);
    }
    const logs = [agentLog.join('\n'), readFileSync(serverLog, 'utf8')];
    expect(logs[0]).toContain('setup'); // the capture works
    for (const text of logs) for (const v of ALL) expect(text).not.toContain(v);
    // Nor in anything the API answers about the box.
    const api = JSON.stringify([await client.getBox(BOX), await client.boxEvents(BOX), await client.listSecrets()]);
    for (const v of ALL) expect(api).not.toContain(v);
  });

  it('delivers them again at the next start', async () => {
    await client.boxVerb(BOX, 'start');
    await waitFor(() => client.getBox(BOX), (b) => b.phase === 'running', 60_000);
    expect((await sh('cat /run/devyard/secrets/E2E_TOKEN')).out).toBe(V2);
  });
});
