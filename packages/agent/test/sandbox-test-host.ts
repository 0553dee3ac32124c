/**
 * Host probes shared by the sandbox integration tests: what of a box is left on the host, and a
 * driver wired to test-only host object names so tests never touch a running Devyard.
 */
import { existsSync, readFileSync } from 'node:fs';
import { chmod, mkdtemp } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { execFileSync } from 'node:child_process';
import { SandboxDriver } from '@devyard/agent/runtime/sandbox/sandbox-driver';
import type { BoxRuntimeSpec, ExecProcess, RuntimeDriver } from '@devyard/agent/runtime/runtime-driver';
import type { BridgeNetworkOptions } from '@devyard/agent/network/bridge-network';

/** Small limits that every test box gets unless it is about limits. */
export const TEST_RESOURCES: BoxRuntimeSpec['resources'] = { cpuMillis: 500, memoryBytes: 64 * 1024 * 1024, pids: 64 };

/** A box spec on `image`, named after its id; tests override only what they are about. */
export function testBoxSpec(boxId: string, image: { rootfs: string; digest: string }, over: Partial<BoxRuntimeSpec> = {}): BoxRuntimeSpec {
  return {
    boxId,
    name: boxId.replace(/_/g, '-'),
    imageRootfs: image.rootfs,
    imageDigest: image.digest,
    resources: TEST_RESOURCES,
    env: {},
    ...over,
  };
}

/** Creates the box's disk state, then starts it (the agent's order). */
export async function startBox(driver: Pick<RuntimeDriver, 'create' | 'start'>, spec: BoxRuntimeSpec): Promise<void> {
  await driver.create(spec);
  await driver.start(spec);
}

/** A driver on a fresh temp dataDir with its own bridge, subnet, nft table and cgroup parent. */
export async function testDriver(tag: string, octet: number): Promise<{ driver: SandboxDriver; dataDir: string; cgroupParent: string; network: BridgeNetworkOptions }> {
  const dataDir = await mkdtemp(join(tmpdir(), `dy-${tag}-`));
  await chmod(dataDir, 0o711);
  const suffix = Math.random().toString(36).slice(2, 7);
  const cgroupParent = `devyard-test-${tag}-${suffix}`;
  const network = { bridge: `dyt${suffix}`, subnet: `10.${octet}.0.0/16`, nftTable: `devyard_test_${suffix}`, netnsPrefix: 'dyt-', vethPrefix: 'dyt' };
  return { driver: new SandboxDriver({ dataDir, network, cgroupParent }), dataDir, cgroupParent, network };
}

/** Everything of a box still on the host (empty when it is fully gone). */
export function boxLeftovers(driver: SandboxDriver, dataDir: string, boxId: string): string[] {
  const left: string[] = [];
  for (const line of readFileSync('/proc/mounts', 'utf8').split('\n')) {
    if (line.includes(join(dataDir, 'boxes', boxId))) left.push(`mount: ${line}`);
  }
  const netns = execFileSync('ip', ['netns', 'list'], { encoding: 'utf8' });
  if (netns.split('\n').some((l) => l.split(' ')[0] === driver.network.netnsName(boxId))) left.push('netns');
  if (existsSync(`/sys/class/net/${driver.network.vethName(boxId)}`)) left.push('veth');
  for (const dir of driver.cgroups.boxDirs(boxId)) if (existsSync(dir)) left.push(`cgroup: ${dir}`);
  if (existsSync(`/run/crun/${boxId}`)) left.push('crun state');
  if (existsSync(join(dataDir, 'boxes', boxId))) left.push('box dir');
  return left;
}

/** Runs a command in a box and collects its output. */
export async function run(driver: SandboxDriver, boxId: string, argv: string[], env?: Record<string, string>): Promise<{ code: number; out: string; err: string }> {
  const p: ExecProcess = await driver.exec(boxId, { argv, env });
  let out = '';
  let err = '';
  p.stdout.on('data', (b: Buffer) => (out += b.toString()));
  p.stderr.on('data', (b: Buffer) => (err += b.toString()));
  p.stdin.end();
  const ended = Promise.all([p.stdout, p.stderr].map((s) => new Promise((r) => s.once('close', r))));
  const code = await p.exited;
  // Output is complete when the pipes close, unless a background process in the box holds them.
  await Promise.race([ended, new Promise((r) => setTimeout(r, 200))]);
  return { code, out, err };
}
