/**
 * A control plane on a temp SQLite store for in-process API tests, with one registered node whose
 * agent is played by the test through the SDK (the real agent runs in the end-to-end tests).
 */
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { ApiError } from '@devyard/sdk/api-error';
import { DevyardClient } from '@devyard/sdk/devyard-client';
import { startControlPlane, type ControlPlane } from '@devyard/server/control-plane';

export interface TestControlPlane {
  dir: string;
  cp: ControlPlane;
  /** The bootstrap admin (owner of the default organization). */
  user: DevyardClient;
  /** The node agent's client, with the node's own credential. */
  node: DevyardClient;
  /** A client with the join token, which registers new nodes (and nothing else). */
  join: DevyardClient;
  /** The fixture node's own credential (its bearer token). */
  nodeCredential: string;
  nodeId: string;
  sessionKey: string;
  close(): Promise<void>;
}

export async function startTestControlPlane(tag: string, capacity: { cpuMillis: number; memoryBytes: number }): Promise<TestControlPlane> {
  const dir = mkdtempSync(join(tmpdir(), `devyard-${tag}-`));
  const cp = await startControlPlane({ dataDir: dir, retry: { maxAttempts: 2, baseBackoffMs: 10, maxBackoffMs: 10 } });
  const user = new DevyardClient({ url: cp.url, token: cp.tokens.adminToken });
  const joinClient = new DevyardClient({ url: cp.url, token: cp.tokens.nodeToken });
  const reg = await joinClient.registerNode({
    name: 'node-a',
    arch: 'x86_64',
    region: null,
    labels: {},
    runtimes: ['sandbox'],
    capacity: { ...capacity, diskBytes: 100 * 1024 ** 3 },
    images: ['tiny'],
    agentUrl: 'http://127.0.0.1:1',
  });
  const node = new DevyardClient({ url: cp.url, token: reg.credential! });
  return {
    dir,
    cp,
    user,
    node,
    join: joinClient,
    nodeCredential: reg.credential!,
    nodeId: reg.nodeId,
    sessionKey: reg.sessionKey,
    async close() {
      await cp.close();
      rmSync(dir, { recursive: true, force: true });
    },
  };
}

/** Polls `fn` until `ok` holds (the reconciler acts asynchronously), failing with the last value. */
export async function until<T>(fn: () => Promise<T>, ok: (v: T) => boolean, ms = 5000): Promise<T> {
  const end = Date.now() + ms;
  for (;;) {
    const v = await fn();
    if (ok(v)) return v;
    if (Date.now() > end) throw new Error(`condition not met; last value: ${JSON.stringify(v).slice(0, 1200)}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

/** The API error a call fails with (the test fails when it succeeds or fails otherwise). */
export async function problemOf(p: Promise<unknown>): Promise<ApiError> {
  try {
    await p;
  } catch (e) {
    if (e instanceof ApiError) return e;
    throw e;
  }
  throw new Error('expected an API error');
}
