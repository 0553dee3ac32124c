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
import { BuiltinImageStore } from '@devyard/agent/images/builtin-image-store';
import { NodeAgent } from '@devyard/agent/node-agent';
import { SandboxDriver } from '@devyard/agent/runtime/sandbox/sandbox-driver';
import { DevyardClient } from '@devyard/sdk/devyard-client';
import { startControlPlane } from '@devyard/server/control-plane';
import { execTrue as execTrueIn, pct, PhaseWaiter, row } from './bench-support.js';
import { rawCleanup, rawCreateExec, rawFreezer } from './raw-primitives.js';
import { templateCreateBench } from './template-create-bench.js';
import { gatewayBench } from './gateway-bench.js';
import { microvmBench } from './microvm-bench.js';

const N = Number(process.env.BENCH_BOXES ?? 30);
const network = { bridge: 'dybenchp0', subnet: '10.217.0.0/16', nftTable: 'devyard_bench' };


async function main(): Promise<void> {
  // BENCH_ONLY=lifecycle|templates|gateway|microvm runs one part (the document then has only that part).
  const only = process.env.BENCH_ONLY;
  const sections = [];
  if (!only || only === 'lifecycle') sections.push(await lifecycleBench());
  if (!only || only === 'templates') sections.push(await templateCreateBench());
  if (!only || only === 'gateway') sections.push(await gatewayBench());
  if (!only || only === 'microvm') sections.push(await microvmBench());
  const md = [
    '# Benchmarks',
    '',
    `Written by \`make bench\` on ${new Date().toISOString()} — ${cpus().length} × ${cpus()[0]?.model ?? 'cpu'}, ${(totalmem() / 1024 ** 3).toFixed(0)} GiB, Node ${process.version}.`,
    'Each table comes from one run; the machine is shared and noisy, so compare rows of the same table.',
    '',
    ...sections,
  ].join('\n');
  await writeFile(join(process.cwd(), 'docs/benchmarks.md'), md);
  process.stdout.write(`${md}\n`);
}

/** Sandbox create → exec and pause/resume next to the raw primitives (`tiny`, cached). */
async function lifecycleBench(): Promise<string> {
  const dir = await mkdtemp(join(tmpdir(), 'devyard-bench-'));
  const driver = new SandboxDriver({ dataDir: join(dir, 'sandbox'), network });
  try {
    return await run(dir, driver);
  } finally {
    // Whatever happened, leave nothing behind: boxes, netns, bridge, cgroups, temp files.
    await rawCleanup().catch(() => undefined);
    for (const b of await driver.list().catch(() => [])) await driver.destroy(b.boxId).catch(() => undefined);
    await driver.teardownHost().catch(() => undefined);
    await rm(dir, { recursive: true, force: true });
  }
}

async function run(dir: string, driver: SandboxDriver): Promise<string> {
  const cp = await startControlPlane({ dataDir: join(dir, 'server') });
  const images = new BuiltinImageStore({ dataDir: join(dir, 'images') });
  const tiny = await images.ensure('tiny');
  const agent = new NodeAgent({ serverUrl: cp.url, token: cp.tokens.nodeToken, dataDir: join(dir, 'agent'), driver, images });
  await agent.start();
  const client = new DevyardClient({ url: cp.url, token: cp.tokens.adminToken });
  while ((await client.listNodes()).length === 0) await new Promise((r) => setTimeout(r, 20));

  const waiter = new PhaseWaiter(client);
  const phase = (name: string, p: string) => waiter.phase(name, p);
  const execTrue = (name: string) => execTrueIn(client, name);

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
  waiter.close();
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
  return [
    `## Create → \`exec true\` (sandbox runtime, \`tiny\` image cached, ${N} samples)`,
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
}

main().catch((e) => {
  console.error(e);
  process.exitCode = 1;
});
