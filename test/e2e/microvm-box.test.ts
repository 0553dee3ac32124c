/**
 * End to end on the microVM runtime, the way a user works: `devyard up` offering sandbox and
 * microvm, then `devyard create vm1 --template base --runtime microvm --wait`, a counter running
 * inside, pause and resume through the control plane (RAM snapshot, a new QEMU), the guest's own
 * kernel, SSH through the gateway, and fork.
 */
import { existsSync, mkdirSync, readdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { hostname, release } from 'node:os';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { execFileSync, spawnSync, type ChildProcess } from 'node:child_process';
import { MicrovmDriver } from '@devyard/agent/runtime/microvm/microvm-driver';
import { SandboxDriver } from '@devyard/agent/runtime/sandbox/sandbox-driver';
import { GitFixture } from '../../packages/agent/test/workspace-git-fixture.js';
import { cleanup, cli, cliOk, daemonOutput, kill9, microvmArgs, newHarness, startDaemon, startUp, waitUntil, type Harness } from './devyard-harness.js';

let h: Harness;
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

beforeAll(async () => {
  h = newHarness('vm', 250);
  await startUp(h, microvmArgs(h));
});

afterAll(async () => {
  if (h) await cleanup(h);
  // Nothing of the VMs is left: no QEMU of this harness runs.
  const left = readdirSync('/proc').filter((p) => /^\d+$/.test(p)).filter((p) => {
    try {
      return readFileSync(`/proc/${p}/cmdline`, 'utf8').includes(h.dir);
    } catch {
      return false;
    }
  });
  expect(left).toEqual([]);
});

const json = <T = Record<string, unknown>>(args: string[]) => JSON.parse(cliOk(h, [...args, '--json'])) as T;
const counter = (box: string) => Number(cliOk(h, ['exec', box, '--', 'cat', '/workspace/counter']).trim() || 0);

describe('a microVM box through devyard up', () => {
  it('the node offers both runtimes and reports the accelerator', () => {
    const [node] = json<Array<{ runtimes: string[]; labels: Record<string, string> }>>(['nodes']);
    expect(node!.runtimes).toEqual(['sandbox', 'microvm']);
    expect(node!.labels['microvm.accel']).toMatch(/^(kvm|tcg)$/);
    expect(daemonOutput(h)).toContain('devyard create vm1 --template base --runtime microvm --wait');
  });

  it('devyard create vm1 --template base --runtime microvm --wait', () => {
    const r = cli(h, ['create', 'vm1', '--template', 'base', '--runtime', 'microvm', '--memory', '512MiB', '--wait', '--json']);
    expect(r.code, r.stderr).toBe(0);
    const box = JSON.parse(r.stdout) as { id: string };
    expect(box).toMatchObject({ name: 'vm1', runtime: 'microvm', phase: 'running' });
    // Everything of it is the microVM runtime's: nothing was set up for it in the sandbox runtime.
    expect(existsSync(`/run/devyard/secrets/${box.id}`)).toBe(false);
  });

  it('runs the guest kernel, not the host one', () => {
    const guest = cliOk(h, ['exec', 'vm1', '--', 'uname', '-r']).trim();
    expect(guest).toMatch(/cloud-amd64$/);
    expect(guest).not.toBe(release());
    // The box's timeline says what it runs on.
    expect(cliOk(h, ['events', 'vm1'])).toMatch(new RegExp(`microVM under (KVM|TCG), guest kernel ${guest.replace(/\./g, '\\.')}`));
    expect(cliOk(h, ['exec', 'vm1', '--', 'hostname']).trim()).toBe('vm1');
    expect(cliOk(h, ['exec', 'vm1', '-t', '--', 'sh', '-c', '[ -t 0 ] && echo tty']).trim()).toBe('tty');
  });

  it('a counter continues from where it was after pause and resume', async () => {
    cliOk(h, ['exec', 'vm1', '--', 'sh', '-c', "setsid sh -c 'i=0; while :; do i=$((i+1)); echo $i > /workspace/c.tmp; mv /workspace/c.tmp /workspace/counter; sleep 0.1; done' >/dev/null 2>&1 </dev/null &"]);
    for (let i = 0; i < 100 && counter('vm1') < 5; i++) await sleep(100);
    expect(json(['pause', 'vm1', '--wait'])).toMatchObject({ phase: 'paused' });
    // Paused means no QEMU: its CPU and memory are released.
    expect(cli(h, ['exec', 'vm1', '--', 'true']).stderr).toContain('paused');
    expect(json(['resume', 'vm1', '--wait'])).toMatchObject({ phase: 'running' });
    const resumed = counter('vm1');
    expect(resumed).toBeGreaterThanOrEqual(5);
    let later = resumed;
    for (let i = 0; i < 50 && later <= resumed; i++) later = (await sleep(100), counter('vm1'));
    expect(later).toBeGreaterThan(resumed);
    expect(cliOk(h, ['exec', 'vm1', '--', 'uname', '-r']).trim()).toMatch(/cloud-amd64$/);
  });

  it('devyard fork clones the running box: its processes and files, with its own identity', async () => {
    const r = cli(h, ['fork', 'vm1', 'vm1c', '--wait', '--json']);
    expect(r.code, r.stderr).toBe(0);
    expect(cliOk(h, ['exec', 'vm1c', '--', 'hostname']).trim()).toBe('vm1c');
    const cloned = counter('vm1c');
    expect(cloned).toBeGreaterThanOrEqual(5);
    let later = cloned;
    for (let i = 0; i < 50 && later <= cloned; i++) later = (await sleep(100), counter('vm1c'));
    expect(later).toBeGreaterThan(cloned);
    const [a, b] = ['vm1', 'vm1c'].map((n) => json<{ ip: string; forkOf?: string }>(['get', n]));
    expect(a!.ip).not.toBe(b!.ip);
    expect(b!.forkOf).toBe('vm1');
    expect(cliOk(h, ['exec', 'vm1c', '--', 'cat', '/etc/machine-id'])).not.toBe(cliOk(h, ['exec', 'vm1', '--', 'cat', '/etc/machine-id']));
    cliOk(h, ['delete', 'vm1c', '--wait']);
  });

  it('a template with a repository and an onCreate hook runs as a microVM (checkout into its volume, hook in the guest)', async () => {
    const git = await GitFixture.start();
    try {
      writeFileSync(join(h.dir, 'repo-vm.yaml'), `name: repo-vm\nimage: tiny\nruntime: microvm\nrepository:\n  url: ${git.daemonUrl}/app.git\nhooks:\n  onCreate: uname -r > /workspace/.created-in\n`);
      cliOk(h, ['templates', 'push', join(h.dir, 'repo-vm.yaml')]);
      const r = cli(h, ['create', 'rv', '--template', 'repo-vm', '--memory', '256MiB', '--wait', '--json']);
      expect(r.code, r.stderr).toBe(0);
      expect(JSON.parse(r.stdout)).toMatchObject({ runtime: 'microvm', phase: 'running' });
      expect(cliOk(h, ['exec', 'rv', '--', 'cat', '/workspace/.created-in']).trim()).toMatch(/cloud-amd64$/);
      expect(cliOk(h, ['exec', 'rv', '--', 'ls', '/workspace/app'])).not.toBe('');
      cliOk(h, ['delete', 'rv', '--wait']);
    } finally {
      await git.close();
    }
  });

  it('reaches the box over SSH through the gateway, as in a sandbox', () => {
    const home = join(h.dir, 'home');
    mkdirSync(join(home, '.ssh'), { recursive: true, mode: 0o700 });
    h.env = { ...h.env, HOME: home };
    execFileSync('ssh-keygen', ['-q', '-t', 'ed25519', '-N', '', '-C', 'e2e', '-f', join(home, '.ssh', 'id_ed25519')]);
    cliOk(h, ['keys', 'add']);
    const r = cli(h, ['ssh', 'vm1', '--', 'uname -r; cat /workspace/counter >/dev/null && echo ssh-ok']);
    expect(r.code, r.stderr).toBe(0);
    expect(r.stdout).toMatch(/cloud-amd64\nssh-ok\n$/);
  });
});

describe('a paused microVM moves to another node and resumes there', () => {
  // A second node on this host: its own data dir, bridges and subnets.
  let agent2: ChildProcess | null = null;
  const node2 = () => ({
    dataDir: join(h.dir, 'node2'),
    bridge: 'dytvmb0',
    subnet: '10.250.2.0/24',
    vmBridge: 'dytvmb0v',
    vmSubnet: '10.250.3.0/24',
  });

  beforeAll(async () => {
    const n = node2();
    spawnSync('ip', ['link', 'del', n.bridge], { stdio: 'ignore' });
    spawnSync('ip', ['link', 'del', n.vmBridge], { stdio: 'ignore' });
    const token = readFileSync(join(h.dataDir, 'server', 'node.token'), 'utf8').trim();
    agent2 = (
      await startDaemon(
        h,
        ['agent', '--server', h.url, '--token', token, '--name', 'node-b', '--data-dir', n.dataDir, '--bridge', n.bridge, '--subnet', n.subnet,
          '--runtimes', 'sandbox,microvm', '--vm-bridge', n.vmBridge, '--vm-subnet', n.vmSubnet, '--resync-ms', '1000'],
        /"msg":"registered"/,
        120_000,
      )
    ).proc;
  });

  afterAll(async () => {
    await kill9(agent2);
    const n = node2();
    const vms = new MicrovmDriver({ dataDir: join(n.dataDir, 'microvm'), uidShift: 100_000, busybox: '/usr/bin/busybox', network: { bridge: n.vmBridge, nftTable: `devyard_${n.vmBridge}` } });
    for (const b of await vms.list().catch(() => [])) await vms.destroy(b.boxId);
    await vms.network.teardown().catch(() => undefined);
    const sandbox = new SandboxDriver({ dataDir: join(n.dataDir, 'sandbox'), network: { bridge: n.bridge, subnet: n.subnet, nftTable: `devyard_${n.bridge}` } });
    await sandbox.teardownHost().catch(() => undefined);
  });

  it('devyard move NAME --to NODE, then resume: the counter continues on the new node', async () => {
    const r = cli(h, ['create', 'mv', '--template', 'tiny', '--runtime', 'microvm', '--memory', '256MiB', '--wait', '--json']);
    expect(r.code, r.stderr).toBe(0);
    const from = (JSON.parse(r.stdout) as { node: string }).node;
    const to = from === 'node-b' ? hostname() : 'node-b';
    cliOk(h, ['exec', 'mv', '--', 'sh', '-c', "echo kept > /workspace/file; setsid sh -c 'i=0; while :; do i=$((i+1)); echo $i > /workspace/c.tmp; mv /workspace/c.tmp /workspace/counter; sleep 0.1; done' >/dev/null 2>&1 </dev/null &"]);
    for (let i = 0; i < 100 && counter('mv') < 5; i++) await sleep(100);
    cliOk(h, ['pause', 'mv', '--wait']);
    const moved = cli(h, ['move', 'mv', '--to', to, '--wait', '--json']);
    expect(moved.code, moved.stderr).toBe(0);
    expect(JSON.parse(moved.stdout)).toMatchObject({ node: to, phase: 'paused' });
    // The old node deleted its copy once the new one had it.
    await waitUntil(h, () => json<{ movingFrom?: string }>(['get', 'mv']), (b) => b.movingFrom === undefined);
    expect(json(['resume', 'mv', '--wait'])).toMatchObject({ phase: 'running', node: to });
    const resumed = counter('mv');
    expect(resumed).toBeGreaterThanOrEqual(5);
    let later = resumed;
    for (let i = 0; i < 50 && later <= resumed; i++) later = (await sleep(100), counter('mv'));
    expect(later).toBeGreaterThan(resumed);
    expect(cliOk(h, ['exec', 'mv', '--', 'cat', '/workspace/file'])).toBe('kept\n');
    expect(cliOk(h, ['events', 'mv'])).toContain('Moved');
    cliOk(h, ['delete', 'mv', '--wait']);
  });
});
