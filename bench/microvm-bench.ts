/**
 * microVM lifecycle next to raw QEMU doing the same operations, in one run: boot to exec-ready,
 * pause (fast: device state only, RAM stays in the RAM file; portable: the RAM file zstd-compressed
 * into the snapshot), resume to exec-ready, and fork (clone of a running VM to exec-ready) — at 256 MiB
 * and 1 GiB with memory touched in the guest (tmpfs filled from /dev/urandom, so neither zero-page
 * detection nor compression can skip it).
 *
 * "Raw" is QEMU with the same command line, kernel, initramfs and disks, driven by hand: create
 * the overlay and volume, launch, QMP, the guest agent's HELLO and one `true`. The driver adds what
 * a box needs on top (records, address allocation, TAP device, checksums, secrets, identity).
 */
import { mkdir, mkdtemp, readFile, rm } from 'node:fs/promises';
import { connect, type Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { BuiltinImageStore } from '@devyard/agent/images/builtin-image-store';
import { GuestChannel } from '@devyard/agent/runtime/microvm/guest-channel';
import { MicrovmDriver } from '@devyard/agent/runtime/microvm/microvm-driver';
import { QmpClient } from '@devyard/agent/runtime/microvm/qmp-client';
import { hostTscKhz, qemuArgs, waitForExit, type QemuVmConfig } from '@devyard/agent/runtime/microvm/qemu-command';
import { runHostCommand } from '@devyard/agent/network/host-command-runner';
import type { BoxRuntimeSpec } from '@devyard/agent/runtime/runtime-driver';
import { pct } from './bench-support.js';

const SAMPLES = Number(process.env.BENCH_VM_SAMPLES ?? 3);
const SIZES_MIB = [256, 1024];
/** MiB of guest memory filled before pause/fork (leaves room for the guest's own use at 256 MiB). */
const touchMiB = (mem: number) => Math.min(200, Math.floor(mem * 0.55));

type Op = 'boot' | 'pause' | 'resume' | 'pausePortable' | 'resumePortable' | 'fork';
const OPS: Array<[Op, string]> = [
  ['boot', 'boot → exec-ready'],
  ['pause', 'pause, fast (device state; RAM stays in its file)'],
  ['resume', 'resume → exec-ready, fast'],
  ['pausePortable', 'pause, portable (RAM file zstd-compressed)'],
  ['resumePortable', 'resume → exec-ready, portable'],
  ['fork', 'fork a running VM → clone exec-ready'],
];

async function execTrue(channel: GuestChannel, argv = ['true']): Promise<void> {
  const p = await channel.exec({ argv, cwd: '/' });
  p.stdout.resume();
  p.stderr.resume();
  p.stdin.end();
  if ((await p.exited) !== 0) throw new Error(`${argv.join(' ')} failed in the guest`);
}

// /dev/shm is a tmpfs of half the RAM by default: grown first so the fill fits.
const fill = (mib: number) => ['sh', '-c', `mount -o remount,size=90% /dev/shm && dd if=/dev/urandom of=/dev/shm/fill bs=1048576 count=${mib} 2>/dev/null`];

/** One VM driven by hand with the driver's own command line. */
class RawVm {
  qmp!: QmpClient;
  channel!: GuestChannel;
  constructor(
    readonly dir: string,
    readonly cfg: QemuVmConfig,
  ) {}

  async launch(incoming: boolean): Promise<void> {
    await runHostCommand(['qemu-system-x86_64', ...qemuArgs({ ...this.cfg, incoming })]);
    this.qmp = await QmpClient.connect(this.cfg.qmpSocket);
  }
  async boot(): Promise<void> {
    await this.launch(false);
    this.channel = await GuestChannel.connect(this.cfg.agentSocket, { timeoutMs: 120_000 });
    await execTrue(this.channel);
  }
  async pause(portable: boolean): Promise<void> {
    await this.qmp.execute('stop');
    await this.migrateOut();
    if (portable) await runHostCommand(['bash', '-c', `set -o pipefail; tar --sparse -C ${this.dir} -cf - mem | zstd -1 -T0 -q -f -o ${join(this.dir, 'mem.tar.zst')}`]);
    await this.qmp.execute('quit').catch(() => undefined);
    this.channel.close();
    this.qmp.close();
    if (portable) await rm(this.cfg.memFile, { force: true });
    await waitGone(this.cfg.pidFile);
  }
  /** Device state only: guest RAM is in the shared RAM file (`x-ignore-shared`), as in the driver. */
  async migrateOut(file = join(this.dir, 'state')): Promise<void> {
    await this.qmp.execute('migrate-set-capabilities', { capabilities: [{ capability: 'x-ignore-shared', state: true }] });
    await this.qmp.execute('migrate-set-parameters', { 'max-bandwidth': 64 * 1024 ** 3 });
    await this.qmp.execute('migrate', { uri: `exec:cat > ${file}` });
    for (;;) {
      const r = await this.qmp.execute<{ status: string }>('query-migrate');
      if (r.status === 'completed') return;
      if (r.status === 'failed') throw new Error('migrate failed');
      await new Promise((res) => setTimeout(res, 5));
    }
  }
  async resume(portable: boolean, file = join(this.dir, 'state')): Promise<void> {
    if (portable) await runHostCommand(['bash', '-c', `set -o pipefail; zstd -dcq ${join(this.dir, 'mem.tar.zst')} | tar --sparse -xf - -C ${this.dir} mem`]);
    await this.launch(true);
    await this.qmp.execute('migrate-set-capabilities', { capabilities: [{ capability: 'x-ignore-shared', state: true }] });
    await this.qmp.execute('migrate-incoming', { uri: `exec:cat ${file}` });
    for (;;) {
      const r = await this.qmp.execute<{ status: string }>('query-status');
      if (r.status !== 'inmigrate') break;
      await new Promise((res) => setTimeout(res, 5));
    }
    const sock = await new Promise<Socket>((res, rej) => {
      const s = connect(this.cfg.agentSocket);
      s.once('connect', () => res(s));
      s.once('error', rej);
    });
    await this.qmp.execute('cont');
    this.channel = await GuestChannel.open(sock, { timeoutMs: 30_000 });
    await execTrue(this.channel);
  }
  /** SIGKILL by pid file, for the cleanup after a failure (a no-op once the VM is gone). */
  async killHard(): Promise<void> {
    this.channel?.close();
    this.qmp?.close();
    const pid = Number((await readFile(this.cfg.pidFile, 'utf8').catch(() => '0')).trim());
    const cmdline = pid > 0 ? await readFile(`/proc/${pid}/cmdline`, 'utf8').catch(() => '') : '';
    if (cmdline.includes(this.cfg.qmpSocket)) process.kill(pid, 'SIGKILL');
    await waitGone(this.cfg.pidFile);
  }
  async kill(): Promise<void> {
    this.channel?.close();
    await this.qmp?.execute('quit').catch(() => undefined);
    this.qmp?.close();
    await waitGone(this.cfg.pidFile);
  }
}

/** Waits for the QEMU of a pid file to exit (the driver's wait: a zombie counts as gone). */
async function waitGone(pidFile: string): Promise<void> {
  const pid = Number((await readFile(pidFile, 'utf8').catch(() => '0')).trim());
  if (pid > 0) await waitForExit(pid, 5000);
}

export async function microvmBench(): Promise<string> {
  const dir = await mkdtemp(join(tmpdir(), 'devyard-bench-vm-'));
  const driver = new MicrovmDriver({
    dataDir: join(dir, 'microvm'),
    uidShift: 100_000,
    busybox: '/usr/bin/busybox',
    network: { bridge: 'dybenchv0', subnet: '10.220.0.0/16', nftTable: 'devyard_bench_vm' },
  });
  const results: Record<string, Record<Op, number[]>> = {};
  // Raw VMs are not the driver's: whatever happens, they are killed in the end.
  const rawVms: RawVm[] = [];
  let stateBytes: Record<number, number[]> = {};
  try {
    await driver.init();
    const image = await new BuiltinImageStore({ dataDir: join(dir, 'images') }).ensure('tiny');
    const base = await driver.diskStore.ensureBase(image.rootfs, image.digest);
    const a = driver.bootAssets;
    for (const mem of SIZES_MIB) {
      const d: Record<Op, number[]> = { boot: [], pause: [], resume: [], pausePortable: [], resumePortable: [], fork: [] };
      const r: Record<Op, number[]> = { boot: [], pause: [], resume: [], pausePortable: [], resumePortable: [], fork: [] };
      stateBytes = { ...stateBytes, [mem]: [] };
      for (let i = 0; i < SAMPLES; i++) {
        // Driver.
        const id = `bv${mem}_${i}`;
        const spec: BoxRuntimeSpec = {
          boxId: id,
          name: `bv${mem}-${i}`,
          runtime: 'microvm',
          imageRootfs: image.rootfs,
          imageDigest: image.digest,
          resources: { cpuMillis: 1000, memoryBytes: mem * 1024 ** 2, pids: 4096, diskBytes: 1024 ** 3 },
          env: {},
        };
        const dexec = async (boxId: string) => {
          const p = await driver.exec(boxId, { argv: ['true'] });
          p.stdout.resume();
          p.stderr.resume();
          p.stdin.end();
          await p.exited;
        };
        let t = performance.now();
        await driver.create(spec);
        await driver.start(spec);
        await dexec(id);
        d.boot.push(performance.now() - t);
        const f = await driver.exec(id, { argv: fill(touchMiB(mem)) });
        f.stdout.resume();
        f.stderr.resume();
        f.stdin.end();
        if ((await f.exited) !== 0) throw new Error('filling guest memory failed');
        t = performance.now();
        await driver.pause(id, 'fast');
        d.pause.push(performance.now() - t);
        t = performance.now();
        await driver.resume(id);
        await dexec(id);
        d.resume.push(performance.now() - t);
        t = performance.now();
        await driver.pause(id, 'portable');
        d.pausePortable.push(performance.now() - t);
        stateBytes[mem]!.push((await driver.diskUsage(id))['snapshot/mem.tar.zst'] ?? 0);
        t = performance.now();
        await driver.resume(id);
        await dexec(id);
        d.resumePortable.push(performance.now() - t);
        t = performance.now();
        await driver.fork(id, { ...spec, boxId: `${id}f`, name: `${spec.name}-f` });
        await dexec(`${id}f`);
        d.fork.push(performance.now() - t);
        await driver.destroy(`${id}f`);
        await driver.destroy(id);

        // Raw QEMU, same command line, kernel, initramfs and disks.
        const rdir = join(dir, 'raw', `${mem}_${i}`);
        await mkdir(rdir, { recursive: true });
        const cfg: QemuVmConfig = {
          accel: driver.accel.accel,
          vcpus: 1,
          memoryMiB: mem,
          kernel: a.kernel.vmlinuz,
          initramfs: a.initramfs,
          guestParams: { 'devyard.hostname': 'raw' },
          tscKhz: hostTscKhz(),
          rootDisk: join(rdir, 'root.qcow2'),
          volumeDisk: join(rdir, 'volume.ext4'),
          toolsDisk: a.toolsDisk,
          mac: '52:54:00:00:00:01',
          agentSocket: join(rdir, 'agent.sock'),
          qmpSocket: join(rdir, 'qmp.sock'),
          memFile: join(rdir, 'mem'),
          pidFile: join(rdir, 'qemu.pid'),
          consoleLog: join(rdir, 'console.log'),
        };
        const vm = new RawVm(rdir, cfg);
        rawVms.push(vm);
        t = performance.now();
        await runHostCommand(['qemu-img', 'create', '-q', '-f', 'qcow2', '-b', base, '-F', 'qcow2', cfg.rootDisk]);
        await runHostCommand(['truncate', '-s', String(1024 ** 3), cfg.volumeDisk]);
        await runHostCommand(['mkfs.ext4', '-q', '-F', cfg.volumeDisk]);
        await vm.boot();
        r.boot.push(performance.now() - t);
        await execTrue(vm.channel, fill(touchMiB(mem)));
        t = performance.now();
        await vm.pause(false);
        r.pause.push(performance.now() - t);
        t = performance.now();
        await vm.resume(false);
        r.resume.push(performance.now() - t);
        t = performance.now();
        await vm.pause(true);
        r.pausePortable.push(performance.now() - t);
        t = performance.now();
        await vm.resume(true);
        r.resumePortable.push(performance.now() - t);
        // Fork: stop, device state out, copy RAM file and disks, cont; restore the copy.
        t = performance.now();
        const fdir = join(rdir, 'fork');
        await mkdir(fdir);
        await vm.qmp.execute('stop');
        await vm.migrateOut(join(fdir, 'state'));
        for (const [from, to] of [[cfg.memFile, 'mem'], [cfg.rootDisk, 'root.qcow2'], [cfg.volumeDisk, 'volume.ext4']] as const) {
          await runHostCommand(['cp', '--sparse=always', '--reflink=auto', from, join(fdir, to)]);
        }
        await vm.qmp.execute('cont');
        const clone: RawVm = new RawVm(fdir, { ...cfg, rootDisk: join(fdir, 'root.qcow2'), volumeDisk: join(fdir, 'volume.ext4'), memFile: join(fdir, 'mem'), agentSocket: join(fdir, 'agent.sock'), qmpSocket: join(fdir, 'qmp.sock'), pidFile: join(fdir, 'qemu.pid'), consoleLog: join(fdir, 'console.log') });
        rawVms.push(clone);
        await clone.resume(false, join(fdir, 'state'));
        r.fork.push(performance.now() - t);
        await clone.kill();
        await vm.kill();
        await rm(rdir, { recursive: true, force: true });
      }
      results[`driver ${mem}`] = d;
      results[`raw ${mem}`] = r;
    }
  } finally {
    for (const vm of rawVms) await vm.killHard();
    for (const b of await driver.list().catch(() => [])) await driver.destroy(b.boxId).catch(() => undefined);
    await driver.network.teardown().catch(() => undefined);
    await rm(dir, { recursive: true, force: true });
  }
  const fmt = (v: number) => `${v.toFixed(0)} ms`;
  const lines = [
    `## microVM: boot, pause, resume, fork (QEMU microvm, ${driver.accel.accel.toUpperCase()}, guest kernel ${driver.kernelRelease}, \`tiny\` image, 1 vCPU, ${SAMPLES} samples each, p50)`,
    '',
    `Raw = QEMU with the same command line, kernel, initramfs and disks, driven by hand. Guest memory touched before pause/fork: ${SIZES_MIB.map((m) => `${touchMiB(m)} MiB at ${m} MiB`).join(', ')} (tmpfs filled from /dev/urandom).`,
    '',
    '| operation | memory | Devyard | raw QEMU | ratio | target |',
    '|---|---|---|---|---|---|',
  ];
  for (const mem of SIZES_MIB) {
    for (const [op, label] of OPS) {
      const dv = pct(results[`driver ${mem}`]![op], 50);
      const rv = pct(results[`raw ${mem}`]![op], 50);
      const ratio = dv / rv;
      const targets: string[] = [`≤ 1.2× raw ${ratio <= 1.2 ? '✅' : '❌'}`];
      if (op === 'resume' && mem === 1024) targets.push(`≤ 300 ms ${dv <= 300 ? '✅' : '❌'}`);
      if (op === 'pausePortable') targets.push(`≤ 1 s/GiB (${fmt(dv / (mem / 1024))}/GiB) ${dv / (mem / 1024) <= 1000 ? '✅' : '❌'}`);
      lines.push(`| ${label} | ${mem} MiB | ${fmt(dv)} | ${fmt(rv)} | ${ratio.toFixed(2)}× | ${targets.join('; ')} |`);
    }
  }
  lines.push('', `Portable snapshot size (zstd -1): ${SIZES_MIB.map((m) => `${(pct(stateBytes[m]!, 50) / 1024 ** 2).toFixed(0)} MB at ${m} MiB`).join(', ')}.`, '');
  return lines.join('\n');
}
