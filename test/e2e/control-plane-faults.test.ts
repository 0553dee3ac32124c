/**
 * Faults with the roles in separate processes, as in production: `devyard server` and
 * `devyard agent`. kill -9 of the server right after it accepted a create, kill -9 and restart of
 * the agent, and the agent keeping a box running on its persisted desired set while the server is
 * gone.
 */
import { readFileSync } from 'node:fs';
import { createServer } from 'node:net';
import { join } from 'node:path';
import type { ChildProcess } from 'node:child_process';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { DevyardClient } from '@devyard/sdk/devyard-client';
import { SandboxDriver } from '@devyard/agent/runtime/sandbox/sandbox-driver';
import { cleanup, cliOk, kill9, newHarness, startDaemon, waitUntil, type Harness } from './devyard-harness.js';

let h: Harness;
let port: number;
let server: ChildProcess | null = null;
let agent: ChildProcess | null = null;
let client: DevyardClient;

const freePort = () =>
  new Promise<number>((resolve) => {
    const s = createServer().listen(0, '127.0.0.1', () => {
      const p = (s.address() as { port: number }).port;
      s.close(() => resolve(p));
    });
  });

async function startServer(): Promise<void> {
  server = (await startDaemon(h, ['server', '--data-dir', join(h.dataDir, 'server'), '--port', String(port)], /devyard server listening/)).proc;
}

async function startAgent(): Promise<void> {
  const token = readFileSync(join(h.dataDir, 'server', 'node.token'), 'utf8').trim();
  agent = (
    await startDaemon(
      h,
      ['agent', '--server', `http://127.0.0.1:${port}`, '--token', token, '--data-dir', join(h.dataDir, 'node'), '--bridge', h.bridge, '--subnet', h.subnet, '--resync-ms', '300', '--runtimes', 'sandbox'],
      /"msg":"(registered|sandbox: host ready)"/,
    )
  ).proc;
}

const driver = () => new SandboxDriver({ dataDir: join(h.dataDir, 'node', 'sandbox'), network: { bridge: h.bridge, subnet: h.subnet, nftTable: `devyard_${h.bridge}` } });

const until = <T>(fn: () => Promise<T>, ok: (v: T) => boolean, ms = 30_000) => waitUntil(h, fn, ok, ms, 100);

beforeAll(async () => {
  h = newHarness('flt', 216);
  port = await freePort();
  await startServer();
  const admin = readFileSync(join(h.dataDir, 'server', 'admin.token'), 'utf8').trim();
  h.env = { ...h.env, DEVYARD_URL: `http://127.0.0.1:${port}`, DEVYARD_TOKEN: admin };
  client = new DevyardClient({ url: `http://127.0.0.1:${port}`, token: admin });
  await startAgent();
  await until(() => client.listNodes(), (n) => n.length === 1 && n[0]!.status === 'ready');
});

afterAll(async () => {
  await kill9(agent);
  await kill9(server);
  if (h) await cleanup(h);
});

describe('control plane and agent faults', () => {
  it('kill -9 of the server mid-create: the box converges and exactly one copy exists', async () => {
    const req = { name: 'k9', template: 'tiny' };
    const accepted = await client.createBox(req, 'create-k9');
    // The server dies right after committing the create: scheduling and start are still ahead.
    await kill9(server);
    await startServer();
    // The client retries with the same key, as after any lost response.
    const retried = await client.createBox(req, 'create-k9');
    expect(retried.id).toBe(accepted.id);
    const running = await until(() => client.getBox('k9'), (b) => b.phase === 'running');
    expect(running.id).toBe(accepted.id);
    expect((await client.listBoxes()).filter((b) => b.name === 'k9')).toHaveLength(1);
    const onHost = (await driver().list()).filter((b) => b.state !== 'absent');
    expect(onHost.map((b) => b.boxId)).toEqual([accepted.id]);
    expect(cliOk(h, ['exec', 'k9', '--', 'echo', 'ok'])).toBe('ok\n');
  });

  it('kill -9 of the agent: the box keeps running and is re-adopted, not restarted', async () => {
    const box = await client.getBox('k9');
    const before = await driver().inspect(box.id);
    expect(before.state).toBe('running');
    await kill9(agent);
    await startAgent();
    await until(() => client.listNodes(), (n) => n[0]!.status === 'ready');
    await new Promise((r) => setTimeout(r, 1000));
    const after = await driver().inspect(box.id);
    expect(after).toMatchObject({ state: 'running', pid: before.pid });
    expect((await client.getBox('k9')).phase).toBe('running');
    expect(cliOk(h, ['exec', 'k9', '--', 'echo', 'still here'])).toBe('still here\n');
  });

  it('keeps reconciling on the persisted desired set while the server is down', async () => {
    const box = await client.getBox('k9');
    await kill9(server);
    // Restart the agent too: it must act on the desired set it persisted, with no server to ask.
    await kill9(agent);
    await startAgent();
    const { pid } = await driver().inspect(box.id);
    process.kill(pid!, 'SIGKILL'); // the box crashes while nobody can reach the control plane
    const revived = await until(() => driver().inspect(box.id), (s) => s.state === 'running' && s.pid !== pid);
    expect(revived.pid).not.toBe(pid);
    await startServer();
    await until(() => client.getBox('k9'), (b) => b.phase === 'running');
    cliOk(h, ['delete', 'k9', '--wait']);
    expect((await driver().list()).filter((b) => b.state !== 'absent')).toEqual([]);
  });
});
