/**
 * `make bench`: Devyard's create → exec and pause/resume latencies next to the raw host primitives
 * they are made of, measured in one run on this machine, written to docs/benchmarks.md.
 *
 * The platform runs in this process the way `devyard up` runs it (control plane on SQLite, node
 * agent with the sandbox driver, talking HTTP/SSE/WebSocket over loopback); the client is the SDK.
 */
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { cpus, tmpdir, totalmem } from 'node:os';
import { join } from 'node:path';
import { PassThrough } from 'node:stream';
import type { Box } from '@devyard/api/box-schemas';
import { BuiltinImageStore } from '@devyard/agent/images/builtin-image-store';
import { NodeAgent } from '@devyard/agent/node-agent';
import { SandboxDriver } from '@devyard/agent/runtime/sandbox/sandbox-driver';
import { DevyardClient } from '@devyard/sdk/devyard-client';
import { execInBox } from '@devyard/sdk/exec-client';
import { startControlPlane } from '@devyard/server/control-plane';
import { rawCleanup, rawCreateExec, rawFreezer } from './raw-primitives.js';

const N = Number(process.env.BENCH_BOXES ?? 30);
const network = { bridge: 'dybenchp0', subnet: '10.217.0.0/16', nftTable: 'devyard_bench' };

function pct(xs: number[], p: number): number {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.min(s.length - 1, Math.max(0, Math.ceil((p / 100) * s.length) - 1))]!;
}
const f = (ms: number) => `${ms.toFixed(1)} ms`;

async function main(): Promise<void> {
  const dir = await mkdtemp(join(tmpdir(), 'devyard-bench-'));
  const driver = new SandboxDriver({ dataDir: join(dir, 'sandbox'), network });
  try {
    await run(dir, driver);
  } finally {
    // Whatever happened, leave nothing behind: boxes, netns, bridge, cgroups, temp files.
    await rawCleanup().catch(() => undefined);
    for (const b of await driver.list().catch(() => [])) await driver.destroy(b.boxId).catch(() => undefined);
    await driver.teardownHost().catch(() => undefined);
    await rm(dir, { recursive: true, force: true });
  }
}

async function run(dir: string, driver: SandboxDriver): Promise<void> {
  const cp = await startControlPlane({ dataDir: join(dir, 'server') });
  const images = new BuiltinImageStore({ dataDir: join(dir, 'images') });
  const tiny = await images.ensure('tiny');
  const agent = new NodeAgent({ serverUrl: cp.url, token: cp.tokens.nodeToken, dataDir: join(dir, 'agent'), driver, images });
  await agent.start();
  const client = new DevyardClient({ url: cp.url, token: cp.tokens.adminToken });
  while ((await client.listNodes()).length === 0) await new Promise((r) => setTimeout(r, 20));

  // One watch for the whole run: phase changes resolve the waiters below.
  const waiters = new Map<string, { phase: string; resolve: (b: Box) => void }>();
  const ac = new AbortController();
  void (async () => {
    for await (const b of client.watchBoxes(ac.signal)) {
      const w = waiters.get(b.name);
      if (w && b.phase === w.phase) {
        waiters.delete(b.name);
        w.resolve(b);
      } else if (w && b.phase === 'failed') throw new Error(`${b.name} failed: ${b.lastError}`);
    }
  })().catch((e) => {
    if (!ac.signal.aborted) console.error(e);
  });
  const phase = (name: string, p: string) =>
    new Promise<Box>((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`${name} did not reach ${p} within 60 s`)), 60_000);
      waiters.set(name, { phase: p, resolve: (b) => (clearTimeout(timer), resolve(b)) });
    });
  const execTrue = async (name: string) => {
    const session = await client.createExecSession(name);
    const code = await execInBox(session, { argv: ['true'], stdout: new PassThrough(), stderr: new PassThrough() }).exited;
    if (code !== 0) throw new Error(`exec true exited ${code}`);
  };

  // Create → exec true, `tiny` cached, one box at a time (latency, not throughput).
  const create: number[] = [];
  for (let i = 0; i < N + 3; i++) {
    const name = `b${i}`;
    const t0 = performance.now();
    const running = phase(name, 'running');
    await client.createBox({ name, template: 'tiny', resources: { cpu: '100m', memory: '64MiB' } });
    await running;
    await execTrue(name);
    if (i >= 3) create.push(performance.now() - t0); // the first three warm up the JIT and caches
  }

  // Pause and resume through the API (verb → phase observed by the client) and in the driver alone.
  const apiPause: number[] = [];
  const apiResume: number[] = [];
  const drvPause: number[] = [];
  const drvResume: number[] = [];
  for (let i = 0; i < N; i++) {
    const name = `b${3 + i}`;
    let t0 = performance.now();
    let w = phase(name, 'paused');
    await client.boxVerb(name, 'pause');
    await w;
    apiPause.push(performance.now() - t0);
    t0 = performance.now();
    w = phase(name, 'running');
    await client.boxVerb(name, 'resume');
    await w;
    apiResume.push(performance.now() - t0);
  }
  const probe = (await client.getBox('b3')).id;
  for (let i = 0; i < N; i++) {
    let t0 = performance.now();
    await driver.pause(probe);
    drvPause.push(performance.now() - t0);
    t0 = performance.now();
    await driver.resume(probe);
    drvResume.push(performance.now() - t0);
  }

  // Delete everything (timed for information), then the raw baselines on the same machine.
  const del: number[] = [];
  for (let i = 0; i < N + 3; i++) {
    const t0 = performance.now();
    const gone = phase(`b${i}`, 'deleted');
    await client.deleteBox(`b${i}`);
    await gone;
    del.push(performance.now() - t0);
  }
  ac.abort();
  await agent.stop();
  await cp.close();

  const raw: number[] = [];
  const freeze: number[] = [];
  const thaw: number[] = [];
  for (let i = 0; i < N; i++) raw.push(await rawCreateExec(tiny.rootfs));
  for (let i = 0; i < N; i++) {
    const r = await rawFreezer();
    freeze.push(r.freezeMs);
    thaw.push(r.thawMs);
  }

  const ratio = pct(create, 50) / pct(raw, 50);
  const row = (what: string, xs: number[], target = '', ok?: boolean) =>
    `| ${what} | ${f(pct(xs, 50))} | ${f(pct(xs, 99))} | ${target}${ok === undefined ? '' : ok ? ' ✅' : ' ❌'} |`;
  const md = [
    '# Benchmarks',
    '',
    `Written by \`make bench\` on ${new Date().toISOString()} — ${cpus().length} × ${cpus()[0]?.model ?? 'cpu'}, ${(totalmem() / 1024 ** 3).toFixed(0)} GiB, Node ${process.version}.`,
    `All figures from one run, ${N} samples each; the machine is shared and noisy, so compare rows of the same run.`,
    '',
    '## Create → `exec true` (sandbox runtime, `tiny` image cached)',
    '',
    'Client-observed: `POST /v1/boxes` → the box reaches `running` (scheduling, agent watch, overlay,',
    'netns, veth, `crun run`, status report, SSE back to the client) → exec session signed → WebSocket to the',
    'agent → `crun exec true` exits 0. Raw: overlay mount + netns + veth on a bridge + `crun run true` with the',
    'same namespaces and limits, no Devyard code.',
    '',
    '| what | p50 | p99 | target |',
    '|---|---|---|---|',
    row('Devyard API create → exec true', create, 'p50 ≤ 100 ms', pct(create, 50) <= 100),
    row('raw primitives (overlay + netns + veth + crun run)', raw),
    `| ratio Devyard / raw (p50) | ${ratio.toFixed(2)}× | | ≤ 2× ${ratio <= 2 ? '✅' : '❌'} |`,
    row('delete (API → phase deleted, for information)', del),
    '',
    '## Pause and resume (cgroup freezer)',
    '',
    '| what | p50 | p99 | target |',
    '|---|---|---|---|',
    row('API pause → phase paused (client-observed)', apiPause, '≤ 20 ms', pct(apiPause, 50) <= 20),
    row('API resume → phase running (client-observed)', apiResume, '≤ 20 ms', pct(apiResume, 50) <= 20),
    row('driver pause (freezer write + wait for FROZEN)', drvPause),
    row('driver resume', drvResume),
    row('raw freezer.state FROZEN write', freeze),
    row('raw freezer.state THAWED write', thaw),
    '',
  ].join('\n');
  await writeFile(new URL('../../docs/benchmarks.md', import.meta.url), md);
  process.stdout.write(`${md}\n`);
}

main().catch(async (e) => {
  console.error(e);
  process.exitCode = 1;
});
