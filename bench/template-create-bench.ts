/**
 * Template creates (issue: templates, prebuilds, warm pools): for one template — a registry image
 * plus a repository with an onCreate hook — create → `exec true` from scratch (pull, unpack,
 * checkout, hook), from a prebuild (COW clone), and from a warm pool claim, next to a plain create
 * of the same cached image without repository or hooks. Real docker-registry and git daemon on
 * loopback, the node from `createSandboxNode` as `devyard up` builds it.
 */
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createSandboxNode, type SandboxNode } from '@devyard/agent/sandbox-node';
import { DevyardClient } from '@devyard/sdk/devyard-client';
import { startControlPlane, type ControlPlane } from '@devyard/server/control-plane';
import { GitFixture } from '../packages/agent/test/workspace-git-fixture.js';
import { busyboxRootEntries, OciLayoutBuilder, tarLayer } from '../packages/oci/test/oci-layout-builder.js';
import { TestRegistry } from '../packages/oci/test/registry-test-host.js';
import { execTrue, pct, PhaseWaiter, row } from './bench-support.js';

const N = Number(process.env.BENCH_TEMPLATE_BOXES ?? 10);
const SCRATCH = Number(process.env.BENCH_SCRATCH_BOXES ?? 5);
const APPLETS = ['sh', 'cat', 'echo', 'ls', 'true', 'mkdir', 'touch', 'sleep'];

/** Pushes a busybox image; `salt` makes each tag a distinct image (a fresh pull and unpack). */
async function pushImage(registry: TestRegistry, dir: string, tag: string, salt: string): Promise<string> {
  const layout = new OciLayoutBuilder(join(dir, `layout-${tag}`));
  const image = await layout.image([await tarLayer(busyboxRootEntries(APPLETS, [{ path: 'etc/salt', content: salt }]))]);
  await layout.tag(tag, image);
  await registry.push(layout.dir, tag, `bench/tools:${tag}`);
  return `${registry.host}/bench/tools:${tag}`;
}

export async function templateCreateBench(): Promise<string> {
  const dir = await mkdtemp(join(tmpdir(), 'devyard-bench-tpl-'));
  const registry = await TestRegistry.start();
  const git = await GitFixture.start();
  let cp: ControlPlane | undefined;
  let node: SandboxNode | undefined;
  const startNode = async (noPrebuilds: boolean) => {
    await node?.agent.stop();
    // BENCH_LOG=1 prints the node's log (to see where a slow sample spent its time).
    const log = process.env.BENCH_LOG ? (msg: string, f?: object) => console.error(`${performance.now().toFixed(0)} ${msg} ${JSON.stringify(f ?? {})}`) : undefined;
    node = createSandboxNode({ serverUrl: cp!.url, token: cp!.tokens.nodeToken, dataDir: join(dir, 'node'), bridge: 'dybencht0', subnet: '10.218.0.0/16', noPrebuilds, runtimes: ['sandbox'], log });
    await node.agent.start();
  };
  try {
    cp = await startControlPlane({ dataDir: join(dir, 'server') });
    const client = new DevyardClient({ url: cp.url, token: cp.tokens.adminToken });
    const waiter = new PhaseWaiter(client);
    const repository = { url: `${git.daemonUrl}/app.git` };
    const hooks = { onCreate: './build.sh' };
    const resources = { cpu: 1, memory: '128MiB' };
    const createExec = async (name: string, template: string) => {
      const t0 = performance.now();
      const running = waiter.phase(name, 'running');
      await client.createBox({ name, template, resources });
      await running;
      await execTrue(client, name);
      const took = performance.now() - t0;
      // Deleted before the next sample: the figures are latency, not density.
      const gone = waiter.phase(name, 'deleted');
      await client.deleteBox(name);
      await gone;
      return took;
    };

    // From scratch: every box pulls and unpacks its own image (a distinct digest each), then
    // checks out the repository and runs onCreate inside the box. No prebuilds on this node.
    await startNode(true);
    const scratch: number[] = [];
    for (let i = 0; i < SCRATCH; i++) {
      // A new version of one template per sample: only the latest version is ever prebuilt.
      const image = await pushImage(registry, dir, `s${i}`, `scratch-${i}`);
      await client.createTemplate({ name: 'scratch', image, runtime: 'sandbox', repository, hooks });
      scratch.push(await createExec(`scratch-${i}`, 'scratch'));
    }

    // The same template from a prebuild, and the same image without repository or hooks.
    await startNode(false);
    const image = await pushImage(registry, dir, 'app', 'app');
    await client.createTemplate({ name: 'app', image, runtime: 'sandbox', repository, hooks });
    await client.createTemplate({ name: 'plain', image, runtime: 'sandbox' });
    await createExec('warm-prebuild', 'app'); // builds the prebuild (and pulls the image) once
    await createExec('warm-plain', 'plain');
    // "From a prebuild" means the node has it: wait until it reported the template's prebuild.
    while (!(await client.listTemplatePrebuilds('app')).some((p) => p.status === 'ready')) await new Promise((r) => setTimeout(r, 50));
    const prebuild: number[] = [];
    const plain: number[] = [];
    for (let i = 0; i < N; i++) {
      prebuild.push(await createExec(`pb-${i}`, 'app'));
      plain.push(await createExec(`plain-${i}`, 'plain'));
    }

    // Warm pool: the same template with a pool; each create claims a ready box. The pool refills
    // between samples (the claim is what is measured, not the refill).
    await client.createTemplate({ name: 'pooled', image, runtime: 'sandbox', repository, hooks, warmPoolSize: 2, defaultResources: resources });
    const poolReady = async () => {
      for (;;) {
        const m = /devyard_boxes\{phase="running"\} (\d+)/.exec(await (await fetch(`${cp!.url}/metrics`)).text());
        const mine = (await client.listBoxes()).filter((b) => b.phase === 'running').length;
        if (Number(m?.[1] ?? 0) - mine >= 2) return;
        await new Promise((r) => setTimeout(r, 50));
      }
    };
    const claim: number[] = [];
    const claimServer: number[] = [];
    for (let i = 0; i < N; i++) {
      await poolReady();
      const t0 = performance.now();
      const box = await client.createBox({ name: `pool-${i}`, template: 'pooled' });
      claimServer.push(performance.now() - t0);
      if (box.phase !== 'running') throw new Error(`pool-${i} was not claimed from the pool (${box.phase})`);
      await execTrue(client, `pool-${i}`);
      claim.push(performance.now() - t0);
      const gone = waiter.phase(`pool-${i}`, 'deleted');
      await client.deleteBox(`pool-${i}`);
      await gone;
    }
    waiter.close();
    for (const b of await client.listBoxes()) await client.deleteBox(b.name);

    const ratio = pct(prebuild, 50) / pct(plain, 50);
    return [
      '## Create from a template: scratch vs prebuild vs warm pool',
      '',
      'One template: an image from a registry on loopback plus a repository (git daemon) with an',
      '`onCreate` hook; each sample is client-observed create → running → `exec true` (`tiny`-sized',
      `busybox image). Scratch: ${SCRATCH} samples, each a new image digest (pull + unpack) with the`,
      `checkout and the hook in the box. Prebuild and plain: ${N} samples each, interleaved. Warm pool:`,
      `${N} claims; "server-side" is the \`POST /v1/boxes\` round trip on loopback.`,
      '',
      '| what | p50 | p99 | target |',
      '|---|---|---|---|',
      row('from scratch (pull + unpack + checkout + onCreate)', scratch),
      row('from a prebuild (COW clone of checkout + onCreate result)', prebuild),
      row('plain create of the same cached image (no repository, no hook)', plain),
      `| ratio prebuild / plain (p50) | ${ratio.toFixed(2)}× | | ≤ 1.2× ${ratio <= 1.2 ? '✅' : '❌'} |`,
      row('warm pool claim, server-side (POST /v1/boxes)', claimServer, 'p50 ≤ 50 ms', pct(claimServer, 50) <= 50),
      row('warm pool claim → exec true (client-observed)', claim),
      '',
    ].join('\n');
  } finally {
    await node?.agent.stop();
    await cp?.close();
    if (node) {
      for (const b of await node.driver.list().catch(() => [])) await node.driver.destroy(b.boxId).catch(() => undefined);
      await node.driver.teardownHost().catch(() => undefined);
    }
    await git.close();
    await registry.stop();
    await rm(dir, { recursive: true, force: true });
  }
}
