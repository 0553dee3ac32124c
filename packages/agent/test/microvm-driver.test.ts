/**
 * What only the microVM runtime does, against real QEMU, the Debian cloud kernel and the compiled
 * guest agent: its own kernel, portable snapshots, fork with new identities, and the faults
 * (corrupt or foreign snapshots, a missing base disk, a guest that never comes up, QEMU killed).
 * The behaviour both runtimes share is in runtime-conformance.test.ts.
 */
import { readdirSync, readFileSync, existsSync } from 'node:fs';
import { chmod, mkdtemp, readFile, rename, rm, truncate, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { BuiltinImageStore, type BuiltImage } from '@devyard/agent/images/builtin-image-store';
import type { BoxRuntimeSpec } from '@devyard/agent/runtime/runtime-driver';
import { MicrovmDriver, type MicrovmDriverOptions } from '@devyard/agent/runtime/microvm/microvm-driver';
import { checkoutRepository } from '@devyard/agent/workspace/repository-checkout';
import { processesUnder, runInVm, startVmTestHost, vmBoxSpec } from './microvm-test-host.js';
import { GitFixture } from './workspace-git-fixture.js';

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
const suffix = Math.random().toString(36).slice(2, 6);

const run = runInVm;

describe('microvm driver', () => {
  let dataDir: string;
  let driver: MicrovmDriver;
  let image: BuiltImage;
  let opts: MicrovmDriverOptions;
  const boxes = new Set<string>();
  const spec = (boxId: string): BoxRuntimeSpec => {
    boxes.add(boxId);
    return vmBoxSpec(boxId, image);
  };
  const up = async (s: BoxRuntimeSpec) => {
    await driver.create(s);
    await driver.start(s);
  };
  const startCounter = async (boxId: string) => {
    await run(driver, boxId, 'setsid sh -c \'i=0; while :; do i=$((i+1)); echo $i > /workspace/n.tmp; mv /workspace/n.tmp /workspace/n; sleep 0.05; done\' >/dev/null 2>&1 </dev/null &');
    const read = async () => Number((await run(driver, boxId, 'cat /workspace/n 2>/dev/null')).out.trim() || 0);
    for (let i = 0; i < 200 && (await read()) < 3; i++) await sleep(50);
    return read;
  };

  beforeAll(async () => {
    ({ dataDir, opts, driver, image } = await startVmTestHost('vm', '10.249.0.0/16', 'dvm'));
  });

  afterAll(async () => {
    for (const id of boxes) await driver.destroy(id).catch(() => undefined);
    expect(processesUnder(dataDir)).toEqual([]);
    await driver.network.teardown();
    await rm(dataDir, { recursive: true, force: true });
  });

  test('the box runs the guest kernel; the accelerator is reported on the node', async () => {
    await up(spec('v_main'));
    expect((await run(driver, 'v_main', 'uname -r')).out.trim()).toBe(driver.kernelRelease);
    expect(driver.kernelRelease).toMatch(/cloud-amd64$/);
    expect(driver.nodeLabels()['microvm.accel']).toMatch(/^(kvm|tcg)$/);
    // Guest health comes from the guest agent.
    const h = await driver.health('v_main');
    expect(h.mem_total_kb).toBeGreaterThan(100_000);
  });

  test('portable snapshot: RAM in a compressed state file, the RAM file dropped, resume continues', async () => {
    // QEMU serves one QMP client at a time: this driver gets a box of its own.
    const portable = new MicrovmDriver({ ...opts, snapshotMode: 'portable' });
    await portable.init();
    const s = spec('v_port');
    await portable.create(s);
    await portable.start(s);
    await run(portable, 'v_port', "setsid sh -c 'i=0; while :; do i=$((i+1)); echo $i > /workspace/n.tmp; mv /workspace/n.tmp /workspace/n; sleep 0.05; done' >/dev/null 2>&1 </dev/null &");
    await sleep(500);
    const t0 = performance.now();
    await portable.pause('v_port');
    const pauseMs = performance.now() - t0;
    const usage = await portable.diskUsage('v_port');
    expect(usage['snapshot/mem.tar.zst']).toBeGreaterThan(0);
    expect(usage.mem).toBeUndefined();
    const meta = JSON.parse(await readFile(join(dataDir, 'boxes/v_port/snapshot/meta.json'), 'utf8')) as { mode: string };
    expect(meta.mode).toBe('portable');
    // Any driver of the node (a restarted agent) resumes it: the snapshot says how it was written.
    // Paused a while first: the guest's clock is set to the host's on resume, not left behind.
    await sleep(2000);
    const t1 = performance.now();
    await driver.resume('v_port');
    const guestNow = Number((await run(driver, 'v_port', 'date +%s')).out.trim());
    expect(Math.abs(guestNow - Date.now() / 1000)).toBeLessThan(1.5);
    console.log(`portable pause ${pauseMs.toFixed(0)} ms (${usage['snapshot/mem.tar.zst']} bytes), resume ${(performance.now() - t1).toFixed(0)} ms`);
    const read = async () => Number((await run(driver, 'v_port', 'cat /workspace/n')).out.trim() || 0);
    const after = await read();
    expect(after).toBeGreaterThanOrEqual(3);
    let later = after;
    for (let i = 0; i < 100 && later <= after; i++) later = (await sleep(50), await read());
    expect(later).toBeGreaterThan(after);
    await driver.destroy('v_port');
  });

  test('fork: clones of a running box keep its processes and files, with their own identity', async () => {
    const read = await startCounter('v_main');
    await run(driver, 'v_main', 'echo from-source > /workspace/marker; echo 1 > /tmp/only-in-ram-fs');
    const machineIdOf = async (id: string) => (await run(driver, id, 'cat /etc/machine-id 2>/dev/null; hostname')).out;
    await driver.fork('v_main', spec('v_fork1'));
    await driver.fork('v_main', spec('v_fork2'));
    for (const id of ['v_fork1', 'v_fork2']) {
      expect((await driver.inspect(id)).state).toBe('running');
      expect((await run(driver, id, 'cat /workspace/marker')).out).toBe('from-source\n');
      expect((await run(driver, id, 'hostname')).out.trim()).toBe(id.replace('_', '-'));
      // The counter process was cloned with its memory: it continues, it does not restart at 1.
      const n = Number((await run(driver, id, 'cat /workspace/n')).out.trim());
      expect(n).toBeGreaterThanOrEqual(3);
    }
    expect(await machineIdOf('v_fork1')).not.toBe(await machineIdOf('v_fork2'));
    const ips = await Promise.all(['v_main', 'v_fork1', 'v_fork2'].map(async (id) => (await driver.inspect(id)).ip));
    expect(new Set(ips).size).toBe(3);
    // Each clone has its own address inside the guest, and the network works from it.
    const addr = (await run(driver, 'v_fork1', '/.devyard/busybox ip -4 addr show eth0')).out;
    expect(addr).toContain(`${ips[1]}/`);
    expect((await run(driver, 'v_fork1', `ping -c 1 -W 2 ${driver.network.gateway} >/dev/null && echo up`)).out).toBe('up\n');
    // Changes after the fork are each box's own.
    await run(driver, 'v_fork1', 'echo changed > /workspace/marker');
    expect((await run(driver, 'v_main', 'cat /workspace/marker')).out).toBe('from-source\n');
    // The source kept running through the fork.
    const before = await read();
    await sleep(300);
    expect(await read()).toBeGreaterThan(before);
    for (const id of ['v_fork1', 'v_fork2']) await driver.destroy(id);
  });

  test('resume on another node: the paused box is exported, imported there on its own base disk and address, and continues', async () => {
    const otherDir = await mkdtemp(join(tmpdir(), 'dy-vm-other-'));
    await chmod(otherDir, 0o711);
    const other = new MicrovmDriver({ ...opts, dataDir: otherDir, network: { bridge: `dyvo${suffix}`, subnet: '10.251.0.0/16', nftTable: `devyard_vmother_${suffix}`, vethPrefix: 'dvo' } });
    try {
      await other.init();
      const s = spec('v_move');
      await up(s);
      await run(driver, 'v_move', "echo moved-data > /workspace/file; setsid sh -c 'i=0; while :; do i=$((i+1)); echo $i > /workspace/n.tmp; mv /workspace/n.tmp /workspace/n; sleep 0.05; done' >/dev/null 2>&1 </dev/null &");
      await sleep(500);
      await driver.pause('v_move');
      // The image is rebuilt on the other node (same digest): its own base disk at its own path.
      const otherImage = await new BuiltinImageStore({ dataDir: otherDir }).ensure('tiny');
      expect(otherImage.digest).toBe(image.digest);
      await other.importSnapshot({ ...s, imageRootfs: otherImage.rootfs }, await driver.exportSnapshot('v_move'));
      expect((await other.inspect('v_move')).state).toBe('paused');
      await driver.destroy('v_move');
      await other.resume('v_move');
      const read = async () => Number((await run(other, 'v_move', 'cat /workspace/n')).out.trim() || 0);
      const n = await read();
      expect(n).toBeGreaterThanOrEqual(3);
      let later = n;
      for (let i = 0; i < 100 && later <= n; i++) later = (await sleep(50), await read());
      expect(later).toBeGreaterThan(n);
      expect((await run(other, 'v_move', 'cat /workspace/file')).out).toBe('moved-data\n');
      // It has an address of the new node's network, and the network works.
      const ip = (await other.inspect('v_move')).ip!;
      expect(ip).toMatch(/^10\.251\./);
      expect((await run(other, 'v_move', '/.devyard/busybox ip -4 addr show eth0')).out).toContain(`${ip}/`);
      expect((await run(other, 'v_move', `ping -c 1 -W 2 ${other.network.gateway} >/dev/null && echo up`)).out).toBe('up\n');
      // A bundle that is cut short is refused and leaves nothing behind.
      const { Readable } = await import('node:stream');
      await expect(other.importSnapshot({ ...spec('v_cut'), imageRootfs: otherImage.rootfs }, Readable.from([Buffer.from('not a bundle')]))).rejects.toThrow(/unpacking the snapshot failed/);
      expect((await other.inspect('v_cut')).state).toBe('absent');
    } finally {
      for (const b of await other.list()) await other.destroy(b.boxId);
      await other.network.teardown();
      await rm(otherDir, { recursive: true, force: true });
    }
  });

  test('a repository checked out on the host lands in the VM\'s workspace (its volume mounted for the call)', async () => {
    const git = await GitFixture.start();
    try {
      const s = spec('v_repo');
      await driver.create(s);
      const co = await driver.withWorkspaceOnHost('v_repo', (paths) => checkoutRepository({ url: `${git.daemonUrl}/app.git`, workspaceDir: paths.workspace, owner: paths.owner }));
      expect(readFileSync('/proc/mounts', 'utf8')).not.toContain(join(dataDir, 'boxes/v_repo'));
      await driver.start(s);
      const r = await run(driver, 'v_repo', `cd /workspace/${co.name} && ls -a | grep -c . && stat -c %u .`);
      expect(r.code, r.err).toBe(0);
      expect(Number(r.out.split('\n')[0])).toBeGreaterThan(2);
      expect(r.out.split('\n')[1]).toBe('0');
      // While it runs, the volume is the guest's: no host mount.
      await expect(driver.withWorkspaceOnHost('v_repo', async () => undefined)).rejects.toThrow(/running/);
      await driver.destroy('v_repo');
    } finally {
      await git.close();
    }
  });

  test('a corrupt snapshot: resume fails with the reason, the box is stopped, the volume intact', async () => {
    await run(driver, 'v_main', 'echo precious > /workspace/precious; sync');
    const t0 = performance.now();
    await driver.pause('v_main');
    console.log(`fast pause ${(performance.now() - t0).toFixed(0)} ms`);
    const state = join(dataDir, 'boxes/v_main/snapshot/state');
    await truncate(state, 1000);
    await expect(driver.resume('v_main')).rejects.toMatchObject({ code: 'SNAPSHOT_INVALID', message: expect.stringMatching(/corrupt or truncated.*volume is intact/) });
    expect((await driver.inspect('v_main')).state).toBe('stopped');
    await driver.start(spec('v_main'));
    expect((await run(driver, 'v_main', 'cat /workspace/precious')).out).toBe('precious\n');
  });

  test('a snapshot from another QEMU version is refused the same way', async () => {
    await driver.pause('v_main');
    const metaFile = join(dataDir, 'boxes/v_main/snapshot/meta.json');
    const meta = JSON.parse(await readFile(metaFile, 'utf8')) as Record<string, unknown>;
    await writeFile(metaFile, JSON.stringify({ ...meta, qemuVersion: '6.2.0' }));
    await expect(driver.resume('v_main')).rejects.toThrow(/written by QEMU 6\.2\.0/);
    expect((await driver.inspect('v_main')).state).toBe('stopped');
    await driver.start(spec('v_main'));
    expect((await run(driver, 'v_main', 'cat /workspace/precious')).out).toBe('precious\n');
  });

  test('kill -9 of QEMU is noticed and reported with a reason', async () => {
    const pid = (await driver.inspect('v_main')).pid!;
    process.kill(pid, 'SIGKILL');
    for (let i = 0; i < 100 && existsSync(`/proc/${pid}`); i++) await sleep(20);
    const s = await driver.inspect('v_main');
    expect(s.state).toBe('stopped');
    expect(s.failure).toMatch(/QEMU process ended without a stop/);
    await driver.start(spec('v_main'));
    expect((await driver.inspect('v_main')).failure).toBeUndefined();
    expect((await run(driver, 'v_main', 'cat /workspace/precious')).out).toBe('precious\n');
  });

  test('a missing base disk fails the start with the reason; the volume is kept', async () => {
    await driver.stop('v_main');
    const base = readdirSync(join(dataDir, 'base')).find((f) => f.endsWith('.qcow2'))!;
    await rename(join(dataDir, 'base', base), join(dataDir, 'base', `${base}.away`));
    try {
      await expect(driver.start(spec('v_main'))).rejects.toMatchObject({ code: 'BOOT_FAILED', message: expect.stringMatching(/qcow2/) });
      expect((await driver.inspect('v_main')).state).toBe('stopped');
      expect(existsSync(join(dataDir, 'boxes/v_main/volume.ext4'))).toBe(true);
    } finally {
      await rename(join(dataDir, 'base', `${base}.away`), join(dataDir, 'base', base));
    }
    await driver.start(spec('v_main'));
    expect((await run(driver, 'v_main', 'cat /workspace/precious')).out).toBe('precious\n');
  });

  test('a guest that never comes up: the start fails with the console tail, nothing keeps running', async () => {
    const impatient = new MicrovmDriver({ ...opts, bootTimeoutMs: 300 });
    await impatient.init();
    await expect(impatient.create(spec('v_slow')).then(() => impatient.start(spec('v_slow')))).rejects.toMatchObject({ code: 'BOOT_FAILED', message: expect.stringMatching(/did not come up/) });
    expect((await impatient.inspect('v_slow')).state).toBe('stopped');
    expect(processesUnder(join(dataDir, 'boxes/v_slow'))).toEqual([]);
    await impatient.destroy('v_slow');
  });
});
