/**
 * An in-process Devyard with a gateway for the access tests: control plane on SQLite, a sandbox
 * node on its own bridge and subnet, a gateway on free ports, and a throwaway SSH key registered
 * for the admin user. `close()` removes every box, host object and temp file it made.
 */
import { execFileSync } from 'node:child_process';
import { chmod, mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createSandboxNode, type SandboxNode } from '@devyard/agent/sandbox-node';
import type { Box } from '@devyard/api/box-schemas';
import { DevyardClient } from '@devyard/sdk/devyard-client';
import { startControlPlane, type ControlPlane } from '@devyard/server/control-plane';
import { chromium, type Browser } from 'playwright-core';
import { startGateway, type Gateway } from '@devyard/gateway/gateway-process';
import { addKeyFile } from '../../server/test/ssh-key-proof-fixture.js';

export interface AccessStack {
  dir: string;
  cp: ControlPlane;
  node: SandboxNode;
  gateway: Gateway;
  client: DevyardClient;
  /** Private key file of the registered user key. */
  keyFile: string;
  /** Creates a box (half a CPU, 256 MiB unless given) and waits until it runs. */
  runningBox(name: string, resources?: { cpu: number; memory: string }): Promise<Box>;
  /** Starts another gateway process on the same server (as after a gateway crash). */
  startGateway(): Promise<Gateway>;
  close(): Promise<void>;
}

export async function waitFor<T>(fn: () => Promise<T>, ok: (v: T) => boolean, ms = 60_000): Promise<T> {
  const end = Date.now() + ms;
  for (;;) {
    const v = await fn().catch((e: Error) => e as unknown as T);
    if (!(v instanceof Error) && ok(v)) return v;
    if (Date.now() > end) throw new Error(`condition not met in ${ms} ms; last: ${v instanceof Error ? v.message : JSON.stringify(v)}`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

export async function startAccessStack(tag: string, octet: number): Promise<AccessStack> {
  const dir = await mkdtemp(join(tmpdir(), `devyard-${tag}-`));
  await chmod(dir, 0o711);
  const bridge = `dyt${tag}0`.slice(0, 15);
  const cp = await startControlPlane({ dataDir: join(dir, 'server') });
  const node = createSandboxNode({ serverUrl: cp.url, token: cp.tokens.nodeToken, dataDir: join(dir, 'node'), bridge, subnet: `10.${octet}.0.0/16`, noPrebuilds: true, name: `${tag}-node`, runtimes: ['sandbox'] });
  await node.agent.start();
  const gateways: Gateway[] = [];
  const newGateway = async () => {
    const g = await startGateway({ serverUrl: cp.url, token: cp.tokens.gatewayToken, syncIntervalMs: 1000, log: () => undefined });
    gateways.push(g);
    return g;
  };
  const gateway = await newGateway();
  const client = new DevyardClient({ url: cp.url, token: cp.tokens.adminToken });
  const keyFile = join(dir, 'id_ed25519');
  execFileSync('ssh-keygen', ['-q', '-t', 'ed25519', '-N', '', '-C', 'test@devyard', '-f', keyFile]);
  await addKeyFile(client, keyFile);
  return {
    dir,
    cp,
    node,
    gateway,
    client,
    keyFile,
    startGateway: newGateway,
    async runningBox(name, resources = { cpu: 0.5, memory: '256MiB' }) {
      await client.createBox({ name, template: 'tiny', resources });
      return waitFor(() => client.getBox(name), (b) => b.phase === 'running');
    },
    async close() {
      for (const g of gateways) await g.close().catch(() => undefined);
      await node.agent.stop();
      await cp.close().catch(() => undefined);
      for (const b of await node.driver.list().catch(() => [])) await node.driver.destroy(b.boxId).catch(() => undefined);
      await node.driver.teardownHost().catch(() => undefined);
      await rm(dir, { recursive: true, force: true });
    },
  };
}

/**
 * Debian's headless Chromium as the browser tests drive it: no sandbox (root), no GPU, nothing of
 * its own on the network; playwright-core gives it a fresh temporary --user-data-dir.
 */
export function launchChromium(): Promise<Browser> {
  return chromium.launch({
    executablePath: '/usr/bin/chromium',
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking', '--disable-component-update', '--disable-sync', '--no-first-run'],
  });
}
