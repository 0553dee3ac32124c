/**
 * The microVM runtime: one QEMU `microvm` machine per box, with its own guest kernel (KVM when the
 * probe boot works, TCG otherwise). Inside the VM the image root is run the way the sandbox runs it
 * (Kata-style): the initramfs mounts the image's root disk, the workspace volume and the tools, and
 * the guest agent (PID 1) starts every process chrooted into the image root, so exec, the gateway's
 * SSH/SFTP/port forwarding and secrets behave the same on both runtimes.
 *
 * Layout of `<dataDir>`:
 *   base/<digest>.qcow2   image base disks, shared read-only (vm-disk-store.ts)
 *   boxes/<id>/           root's (0700): box.json, snapshot/ (state + meta while paused), and the
 *                         VM's own files, owned by its uid (0600): root.qcow2 (overlay),
 *                         volume.ext4 (workspace volume), mem (guest RAM file), run/ (qmp.sock,
 *                         agent.sock, qemu.pid, console.log, qemu.log)
 *   jail/                 empty: each QEMU's jail mounts its root here, in its own mount namespace
 *
 * Every QEMU runs jailed (host/devyard-vm-jail.c, like Firecracker's jailer): as a uid and gid of
 * its box's own (vm-uid-allocator.ts) with no groups and no capabilities, under QEMU's seccomp
 * filter, in a mount namespace whose root holds that VM's files (RAM file, disks, run/), the base
 * disk its overlay reads, the boot assets and the host's /usr read-only — nothing of other boxes,
 * of the data dir or of the host. The agent, as root, reaches the VM through the sockets in run/.
 *
 * Pause writes a snapshot and ends QEMU, so the VM's CPU and memory are released; resume restores
 * it in a new QEMU. Guest RAM lives in a shared RAM file, so a snapshot is the device state only
 * (`x-ignore-shared`): the fast path leaves the RAM file on the node; the portable path compresses
 * it (zstd) into the snapshot and drops it, and any node with the same QEMU and guest kernel can
 * restore that. Disks stay as they are while paused: nothing writes them until the restored VM runs.
 */
import { createHash } from 'node:crypto';
import { existsSync, readFileSync } from 'node:fs';
import { chmod, chown, mkdir, readdir, readFile, rename, rm, stat, writeFile } from 'node:fs/promises';
import { connect, createServer, type Socket } from 'node:net';
import { join } from 'node:path';
import type { Duplex, Readable } from 'node:stream';
import { spawn } from 'node:child_process';
import { BOX_DEFAULT_PATH } from '../box-tools-bundle.js';
import type { BoxRuntimeSpec, BoxSecret, ExecOptions, ExecProcess, RuntimeBoxStatus, RuntimeDriver } from '../runtime-driver.js';
import { boxMac, BridgeNetwork, type BridgeNetworkOptions } from '../../network/bridge-network.js';
import { runHostCommand, runHostCommandRaw } from '../../network/host-command-runner.js';
import { allocateAddress } from '../../network/ipv4-subnet.js';
import type { GuestBootAssets } from './guest-boot-assets.js';
import { GuestChannel, GuestChannelError } from './guest-channel.js';
import { QmpClient } from './qmp-client.js';
import { prepareMicrovmHost } from './microvm-host.js';
import { hostTscKhz, qemuArgs, waitForExit, type Accel, type QemuVmConfig } from './qemu-command.js';
import { qcow2BackingFile, VmDiskStore } from './vm-disk-store.js';
import { VmUidAllocator, type VmUidAllocatorOptions } from './vm-uid-allocator.js';

/** Where secrets appear in the guest (the same path as in a sandbox). */
const SECRETS_DIR = '/run/devyard/secrets';
const MiB = 1024 ** 2;
/** What QEMU runs from: the host's, read-only in every jail (what a host does not have is left out). */
const JAIL_HOST_PATHS = ['/usr', '/bin', '/sbin', '/lib', '/lib32', '/lib64', '/libx32', '/etc/ld.so.cache'];
/** Device nodes every VM's QEMU opens (the jail makes them the VM's own). */
const JAIL_DEVICES = ['/dev/null', '/dev/zero', '/dev/random', '/dev/urandom'];
/** The VM's files QEMU creates (sockets, pid file, logs), in a directory the VM's uid owns. */
const RUN_DIR = 'run';

/** How pause stores a VM. */
export type SnapshotMode = 'fast' | 'portable';

/** A box operation the microVM runtime cannot do; `code` as in the sandbox driver's errors. */
export class MicrovmError extends Error {
  constructor(
    /** Stable error code. */
    readonly code: 'BOX_NOT_RUNNING' | 'BOX_NOT_FOUND' | 'BOX_PAUSED' | 'INVALID_BOX_ID' | 'INVALID_SPEC' | 'BOOT_FAILED' | 'SNAPSHOT_INVALID' | 'RESTORE_FAILED',
    message: string,
  ) {
    super(message);
  }
}

/** Options of {@link MicrovmDriver}. */
export interface MicrovmDriverOptions {
  /** Everything of the runtime lives below (see the layout above). */
  dataDir: string;
  /**
   * Kernel, initramfs, tools disk and the KVM probe's answer (microvm-host.ts): the same for every
   * data dir of a host, so shared (default /var/cache/devyard/microvm).
   */
  assetsDir?: string;
  /** The VMs' network (its own bridge and subnet: default devyardvm0, 10.214.0.0/16). */
  network?: BridgeNetworkOptions;
  /** Host uid that is root in image trees (the sandbox's id shift). */
  uidShift: number;
  /** Static busybox of the host (initramfs and /.devyard/busybox). */
  busybox: string;
  /** Force an accelerator instead of probing (`DEVYARD_MICROVM_ACCEL`). */
  accel?: Accel;
  /** How pause stores VMs (default fast). */
  snapshotMode?: SnapshotMode;
  /** How long a cold boot may take until the guest agent answers (default 90 s). */
  bootTimeoutMs?: number;
  /** Workspace volume size when the box's resources give none (default 10 GiB, sparse). */
  defaultVolumeBytes?: number;
  /**
   * Guest kernels zero memory as they free it (`init_on_free=1`), so that what exited processes
   * held — every session's environment holds the box's secrets — is not in a RAM snapshot either.
   * The kernel then also zeroes all of a VM's memory at boot: every page of its RAM file is
   * written (no longer sparse), and under TCG a boot takes seconds longer per GiB.
   */
  zeroFreedMemory?: boolean;
  /** The node-wide range and registry of the uids VMs run as (default /var/lib/devyard/vm-uids). */
  vmUids?: VmUidAllocatorOptions;
  log?: (msg: string, fields?: object) => void;
}

interface BoxRecord {
  boxId: string;
  name: string;
  imageRootfs: string;
  imageDigest: string;
  vcpus: number;
  memoryMiB: number;
  env: Record<string, string>;
  ip: string;
  mac: string;
  createdAt: string;
  /** Why the VM ended without a stop, until the next start. */
  failure?: string;
  /** The host uid (and gid) the box's QEMU runs as and its files belong to, for the box's life. */
  uid?: number;
  /** Whether a QEMU started by this driver should be running (cleared by stop/pause). */
  expectRunning?: boolean;
  /**
   * The address and MAC the guest has configured (from its last cold boot, or its source's when
   * it was forked or moved here); a restore reconfigures the guest when they differ from ip/mac.
   */
  guestIp?: string;
  guestMac?: string;
}

/** What a snapshot directory holds, next to the state file. */
interface SnapshotMeta {
  mode: SnapshotMode;
  qemuVersion: string;
  kernelRelease: string;
  memoryMiB: number;
  vcpus: number;
  stateFile: string;
  stateBytes: number;
  stateSha256: string;
  /** Portable snapshots: the guest RAM file as a sparse tar, zstd-compressed, in the snapshot directory. */
  ramFile?: string;
  createdAt: string;
}

/** A live connection to a running VM. */
interface LiveVm {
  qmp: QmpClient;
  channel: GuestChannel;
}

export class MicrovmDriver implements RuntimeDriver {
  readonly name = 'microvm';
  readonly pauseKeepsMemory = true;
  readonly network: BridgeNetwork;
  private readonly boxesDir: string;
  private readonly disks: VmDiskStore;
  private readonly log: (msg: string, fields?: object) => void;
  private assets: GuestBootAssets | null = null;
  private jail = '';
  private readonly jailRoot: string;
  /** The uids VMs run as. */
  readonly vmUids: VmUidAllocator;
  private accelInfo: { accel: Accel; reason: string } | null = null;
  private qemuVer = '';
  private readonly tscKhz = hostTscKhz();
  private readonly locks = new Map<string, Promise<unknown>>();
  private readonly live = new Map<string, LiveVm>();
  private readonly connecting = new Map<string, Promise<LiveVm>>();
  private readonly secrets = new Map<string, readonly BoxSecret[]>();
  /**
   * QEMU processes told to quit after a snapshot, still exiting (tearing down a large guest
   * mapping can take a second): pause does not wait for them, the box's next operation does.
   */
  private readonly exiting = new Map<string, Promise<void>>();
  private allocLock: Promise<unknown> = Promise.resolve();

  constructor(private readonly opts: MicrovmDriverOptions) {
    this.boxesDir = join(opts.dataDir, 'boxes');
    this.jailRoot = join(opts.dataDir, 'jail');
    this.vmUids = new VmUidAllocator(opts.vmUids);
    this.network = new BridgeNetwork({ bridge: 'devyardvm0', subnet: '10.214.0.0/16', nftTable: 'devyard_vm', ...opts.network });
    this.disks = new VmDiskStore({ dir: join(opts.dataDir, 'base'), uidShift: opts.uidShift, log: opts.log });
    this.log = opts.log ?? (() => {});
  }

  /** The accelerator VMs run under, and why (after init). */
  get accel(): { accel: Accel; reason: string } {
    if (!this.accelInfo) throw new Error('microvm driver not initialised');
    return this.accelInfo;
  }

  /** Kernel, initramfs and tools disk the VMs boot from (after init); the benchmark's raw baseline uses them too. */
  get bootAssets(): GuestBootAssets {
    if (!this.assets) throw new Error('microvm driver not initialised');
    return this.assets;
  }

  /** The VM disk store (base disks per image). */
  get diskStore(): VmDiskStore {
    return this.disks;
  }

  /** The guest kernel release (after init). */
  get kernelRelease(): string {
    return this.assets?.kernel.release ?? '';
  }

  nodeLabels(): Record<string, string> {
    return this.accelInfo ? { 'microvm.accel': this.accelInfo.accel, 'microvm.kernel': this.kernelRelease } : {};
  }

  async init(): Promise<void> {
    await mkdir(this.boxesDir, { recursive: true, mode: 0o700 });
    await chmod(this.boxesDir, 0o700);
    await mkdir(this.jailRoot, { recursive: true, mode: 0o700 });
    await this.network.init();
    const host = await prepareMicrovmHost({ assetsDir: this.opts.assetsDir, busybox: this.opts.busybox, accel: this.opts.accel, log: this.log });
    this.assets = host.assets;
    this.jail = host.jail;
    const freed = await this.vmUids.collectStale();
    if (freed.length) this.log('microvm: freed the uids of boxes that are gone', { uids: freed });
    this.qemuVer = host.qemuVersion;
    this.accelInfo = host.accel;
    this.log('microvm runtime ready', { accel: this.accelInfo.accel, why: this.accelInfo.reason, kernel: this.assets.kernel.release, qemu: this.qemuVer });
  }

  private boxDir(boxId: string): string {
    return join(this.boxesDir, boxId);
  }

  /**
   * Where the box's QEMU keeps its sockets, pid file and logs: run/, or the box dir itself for a
   * VM started before QEMU was jailed, which runs on (unjailed) until it next stops or pauses.
   */
  private runDir(boxId: string): string {
    const dir = this.boxDir(boxId);
    return existsSync(join(dir, 'qemu.pid')) ? dir : join(dir, RUN_DIR);
  }

  private withLock<T>(boxId: string, fn: () => Promise<T>): Promise<T> {
    const prev = this.locks.get(boxId) ?? Promise.resolve();
    const next = prev.catch(() => undefined).then(async () => {
      await this.exiting.get(boxId);
      return fn();
    });
    const tail = next.catch(() => undefined);
    this.locks.set(boxId, tail);
    void tail.then(() => {
      if (this.locks.get(boxId) === tail) this.locks.delete(boxId);
    });
    return next;
  }

  private async readRecord(boxId: string): Promise<BoxRecord | undefined> {
    try {
      return JSON.parse(await readFile(join(this.boxDir(boxId), 'box.json'), 'utf8')) as BoxRecord;
    } catch {
      return undefined;
    }
  }

  private async writeRecord(rec: BoxRecord): Promise<void> {
    const tmp = join(this.boxDir(rec.boxId), `.box.json.${process.pid}`);
    await writeFile(tmp, JSON.stringify(rec, null, 2), { mode: 0o600 });
    await rename(tmp, join(this.boxDir(rec.boxId), 'box.json'));
  }

  /** Pid of the box's QEMU while it runs. */
  private qemuPid(boxId: string): number | undefined {
    const run = this.runDir(boxId);
    try {
      const pid = Number(readFileSync(join(run, 'qemu.pid'), 'utf8').trim());
      if (!Number.isInteger(pid) || pid <= 0) return undefined;
      // A recycled pid is some other process: QEMU's command line names the box's own files.
      const cmdline = readFileSync(`/proc/${pid}/cmdline`, 'utf8');
      return cmdline.includes(join(run, 'qmp.sock')) ? pid : undefined;
    } catch {
      return undefined;
    }
  }

  async create(spec: BoxRuntimeSpec): Promise<void> {
    checkBoxId(spec.boxId);
    await this.withLock(spec.boxId, () => this.ensureDisks(spec));
  }

  /** Box record, root overlay and workspace volume; existing ones are kept (the volume above all). */
  private async ensureDisks(spec: BoxRuntimeSpec): Promise<BoxRecord> {
    if (spec.layers?.length || spec.workspaceBase) throw new MicrovmError('INVALID_SPEC', 'the microvm runtime does not run prebuilds yet');
    const dir = this.boxDir(spec.boxId);
    await mkdir(join(dir, 'snapshot'), { recursive: true, mode: 0o700 });
    await chmod(dir, 0o700);
    const existing = await this.readRecord(spec.boxId);
    const root = join(dir, 'root.qcow2');
    if (!existsSync(root)) {
      const base = await this.disks.ensureBase(spec.imageRootfs, spec.imageDigest);
      await this.disks.createOverlay(base, root);
    }
    const volume = join(dir, 'volume.ext4');
    if (!existsSync(volume)) await this.disks.createVolume(volume, spec.resources.diskBytes || this.opts.defaultVolumeBytes || 10 * 1024 ** 3);
    const rec: BoxRecord = {
      boxId: spec.boxId,
      name: spec.name,
      imageRootfs: spec.imageRootfs,
      imageDigest: spec.imageDigest,
      vcpus: Math.max(1, Math.ceil(spec.resources.cpuMillis / 1000)),
      memoryMiB: Math.max(128, Math.floor(spec.resources.memoryBytes / MiB)),
      env: spec.env,
      ip: existing?.ip ?? (await this.allocateIp(spec.boxId)),
      mac: existing?.mac ?? boxMac(spec.boxId),
      createdAt: existing?.createdAt ?? new Date().toISOString(),
      ...(existing?.failure ? { failure: existing.failure } : {}),
      ...(existing?.uid !== undefined ? { uid: existing.uid } : {}),
    };
    await this.writeRecord(rec);
    await this.ownFiles(rec);
    return rec;
  }

  /** The box's uid (gid the same), allocated on first need and kept in its record until delete. */
  private async ensureUid(rec: BoxRecord): Promise<number> {
    const dir = this.boxDir(rec.boxId);
    // A record copied from another box (a fork) or node (a move) names a uid that is not this box's.
    if (rec.uid !== undefined && this.vmUids.holder(rec.uid) === dir) return rec.uid;
    rec.uid = await this.vmUids.allocate(dir);
    await this.writeRecord(rec);
    return rec.uid;
  }

  /**
   * Makes the VM's own files (RAM file, disks, run/) belong to its uid, readable by nobody else:
   * its jailed QEMU opens them as that uid. Copies made by a fork or an import are root's until then.
   */
  private async ownFiles(rec: BoxRecord): Promise<number> {
    const uid = await this.ensureUid(rec);
    const dir = this.boxDir(rec.boxId);
    for (const f of ['mem', 'root.qcow2', 'volume.ext4']) {
      const path = join(dir, f);
      if (!existsSync(path)) continue;
      await chown(path, uid, uid);
      await chmod(path, 0o600);
    }
    return uid;
  }

  private allocateIp(boxId: string): Promise<string> {
    const next = this.allocLock.then(async () => {
      const used: string[] = [];
      for (const id of await readdir(this.boxesDir).catch(() => [] as string[])) {
        if (id === boxId) continue;
        const rec = await this.readRecord(id);
        if (rec) used.push(rec.ip);
      }
      return allocateAddress(this.network.subnet, used);
    });
    this.allocLock = next.catch(() => {});
    return next;
  }

  private vmConfig(rec: BoxRecord, incoming: boolean): QemuVmConfig {
    const dir = this.boxDir(rec.boxId);
    const run = join(dir, RUN_DIR);
    const a = this.assets!;
    return {
      accel: this.accel.accel,
      vcpus: rec.vcpus,
      memoryMiB: rec.memoryMiB,
      kernel: a.kernel.vmlinuz,
      initramfs: a.initramfs,
      guestParams: {
        'devyard.ip': `${rec.ip}/${this.network.subnet.prefix}`,
        'devyard.gw': this.network.gateway,
        'devyard.hostname': rec.name,
        ...(this.dns ? { 'devyard.dns': this.dns } : {}),
      },
      tscKhz: this.tscKhz,
      rootDisk: join(dir, 'root.qcow2'),
      volumeDisk: join(dir, 'volume.ext4'),
      toolsDisk: a.toolsDisk,
      tap: this.network.vethName(rec.boxId),
      mac: rec.mac,
      agentSocket: join(run, 'agent.sock'),
      qmpSocket: join(run, 'qmp.sock'),
      memFile: join(dir, 'mem'),
      pidFile: join(run, 'qemu.pid'),
      consoleLog: join(run, 'console.log'),
      incoming,
      sandboxed: true,
      zeroFreedMemory: this.opts.zeroFreedMemory ?? false,
    };
  }
  private dns = '';

  /**
   * Starts the VM's QEMU in its jail and connects QMP. The jail daemonizes QEMU (VMs outlive an
   * agent restart) and returns once QEMU runs, or with QEMU's exit status and reason.
   */
  private async launch(rec: BoxRecord, incoming: boolean): Promise<QmpClient> {
    const dir = this.boxDir(rec.boxId);
    const run = join(dir, RUN_DIR);
    // What a VM started before QEMU was jailed kept in the box dir itself.
    for (const f of ['qmp.sock', 'agent.sock', 'qemu.pid', 'console.log']) await rm(join(dir, f), { force: true });
    await rm(run, { recursive: true, force: true });
    await mkdir(run, { mode: 0o700 });
    // QEMU sizes the RAM file; it must exist to be bound into the jail.
    if (!existsSync(join(dir, 'mem'))) await writeFile(join(dir, 'mem'), '', { mode: 0o600 });
    const uid = await this.ownFiles(rec);
    await chown(run, uid, uid);
    if (!this.dns) this.dns = (await this.network.resolvConf()).split('\n').filter((l) => l.startsWith('nameserver ')).map((l) => l.slice(11)).join(',');
    // A paused box kept its TAP device; anything else gets a fresh one, and so does a device the
    // VM's uid may not attach to (kept from before QEMU was jailed).
    if (!incoming || !existsSync(`/sys/class/net/${this.network.vethName(rec.boxId)}`) || this.network.tapOwner(rec.boxId) !== uid) {
      await this.network.attachTap(rec.boxId, rec.ip, rec.mac, { uid, gid: uid });
    }
    const cfg = this.vmConfig(rec, incoming);
    // The overlay reads its image's base disk by the path in its header: that one file is bound.
    const base = await qcow2BackingFile(cfg.rootDisk);
    const readOnly = [...JAIL_HOST_PATHS, cfg.kernel, cfg.initramfs, cfg.toolsDisk, ...(base ? [base] : [])];
    const writable = [cfg.memFile, cfg.rootDisk, cfg.volumeDisk, run];
    const devices = [...JAIL_DEVICES, ...(cfg.tap ? ['/dev/net/tun'] : []), ...(cfg.accel === 'kvm' ? ['/dev/kvm'] : [])];
    const argv = [
      this.jail,
      ...['--root', this.jailRoot, '--uid', String(uid), '--gid', String(uid), '--qmp', cfg.qmpSocket, '--log', join(run, 'qemu.log')],
      ...readOnly.flatMap((p) => ['--ro', p]),
      ...writable.flatMap((p) => ['--rw', p]),
      ...devices.flatMap((p) => ['--dev', p]),
      '--',
      'qemu-system-x86_64',
      ...qemuArgs(cfg),
    ];
    // host-programs: qemu-system-x86_64
    const { code, stderr } = await runHostCommandRaw(argv);
    if (code !== 0) throw new MicrovmError('BOOT_FAILED', `qemu exited ${code}: ${stderr.trim().split('\n').slice(-3).join(' | ')}`);
    return QmpClient.connect(cfg.qmpSocket);
  }

  async start(spec: BoxRuntimeSpec): Promise<void> {
    checkBoxId(spec.boxId);
    await this.withLock(spec.boxId, async () => {
      if (this.qemuPid(spec.boxId)) return;
      const dir = this.boxDir(spec.boxId);
      // A start is a cold boot: a snapshot left by a pause is not resumed by it (resume does that).
      if (existsSync(join(dir, 'snapshot', 'meta.json'))) throw new MicrovmError('BOX_PAUSED', `box ${spec.boxId} is paused: resume it`);
      const rec = await this.ensureDisks(spec);
      delete rec.failure;
      await rm(join(dir, 'mem'), { force: true });
      rec.expectRunning = true;
      // A cold boot configures the network from the kernel command line.
      rec.guestIp = rec.ip;
      rec.guestMac = rec.mac;
      await this.writeRecord(rec);
      const timeoutMs = this.opts.bootTimeoutMs ?? 90_000;
      let qmp: QmpClient | undefined;
      try {
        qmp = await this.launch(rec, false);
        const channel = await GuestChannel.connect(join(dir, RUN_DIR, 'agent.sock'), { timeoutMs });
        this.attachLive(spec.boxId, { qmp, channel });
        // Images ship without a machine-id (or with the one of their build): each box gets its own.
        await channel.setIdentity(rec.name, machineIdFor(spec.boxId));
        await this.injectSecrets(spec.boxId, channel);
        this.log('microvm booted', { boxId: spec.boxId, accel: this.accel.accel, kernel: channel.kernelRelease });
      } catch (e) {
        qmp?.close();
        const consoleTail = await this.consoleTail(spec.boxId);
        await this.kill(spec.boxId);
        rec.expectRunning = false;
        await this.writeRecord(rec);
        await rm(join(dir, 'mem'), { force: true });
        throw new MicrovmError('BOOT_FAILED', `the VM did not come up: ${(e as Error).message}${consoleTail ? `; console: ${consoleTail}` : ''}`);
      }
    });
  }

  private attachLive(boxId: string, vm: LiveVm): void {
    this.live.get(boxId)?.channel.close();
    this.live.set(boxId, vm);
    void vm.channel.closed.then(() => {
      const reason = vm.channel.closeReason;
      // Either a bug or an attack from inside the VM; the next call on the box reconnects.
      if (reason instanceof GuestChannelError) this.log('guest channel closed on a protocol error', { boxId, code: reason.code, error: reason.message });
      if (this.live.get(boxId) === vm) {
        this.live.delete(boxId);
        vm.qmp.close();
      }
    });
  }

  /** The live connection of a running VM, reconnected after an agent restart. */
  private async liveVm(boxId: string): Promise<LiveVm> {
    const have = this.live.get(boxId);
    if (have) return have;
    const pending = this.connecting.get(boxId);
    if (pending) return pending;
    const p = (async () => {
      if (this.exiting.has(boxId) || !this.qemuPid(boxId)) {
        if (existsSync(join(this.boxDir(boxId), 'snapshot', 'meta.json'))) throw new MicrovmError('BOX_PAUSED', `box ${boxId} is paused`);
        throw new MicrovmError('BOX_NOT_RUNNING', `box ${boxId} is not running`);
      }
      const run = this.runDir(boxId);
      const qmp = await QmpClient.connect(join(run, 'qmp.sock'), 5000);
      const channel = await GuestChannel.connect(join(run, 'agent.sock'), { timeoutMs: 15_000 }).catch((e: unknown) => {
        qmp.close();
        throw e;
      });
      const vm = { qmp, channel };
      this.attachLive(boxId, vm);
      return vm;
    })().finally(() => this.connecting.delete(boxId));
    this.connecting.set(boxId, p);
    return p;
  }

  private async consoleTail(boxId: string): Promise<string> {
    const text = await readFile(join(this.runDir(boxId), 'console.log'), 'utf8').catch(() => '');
    return text.trim().split('\n').slice(-3).join(' | ').slice(0, 500);
  }

  /**
   * Ends QEMU at once (SIGKILL) and removes its network device; disks are kept. After a pause the
   * TAP device stays (`keepNic`): the box keeps its address, and resume does not pay for a new one.
   */
  private async kill(boxId: string, opts: { keepNic?: boolean } = {}): Promise<void> {
    const vm = this.live.get(boxId);
    this.live.delete(boxId);
    vm?.channel.close();
    vm?.qmp.close();
    const pid = this.qemuPid(boxId);
    if (pid) {
      try {
        process.kill(pid, 'SIGKILL');
      } catch {
        /* gone already */
      }
      await waitForExit(pid, 5000);
    }
    if (!opts.keepNic) await this.network.detach(boxId);
    const run = this.runDir(boxId);
    for (const f of ['qmp.sock', 'agent.sock', 'qemu.pid', 'migrate.sock']) await rm(join(run, f), { force: true });
  }

  async stop(boxId: string, opts: { graceMs?: number } = {}): Promise<void> {
    checkBoxId(boxId);
    await this.withLock(boxId, async () => {
      const rec = await this.readRecord(boxId);
      if (!rec) return;
      const pid = this.qemuPid(boxId);
      if (pid) {
        // Flush the guest's filesystems first: quitting QEMU is a power cut for the guest.
        try {
          const vm = await withTimeout(this.liveVm(boxId), opts.graceMs ?? 10_000);
          await withTimeout(vm.channel.quiesce(SECRETS_DIR), opts.graceMs ?? 10_000);
          await vm.qmp.execute('quit').catch(() => undefined);
          await waitForExit(pid, 5000);
        } catch (e) {
          this.log('microvm stop: the guest did not flush, stopping it hard', { boxId, err: (e as Error).message });
        }
      }
      await this.kill(boxId);
      // A stopped box has no memory: a snapshot and the RAM file go (the volume and root stay).
      await this.dropSnapshot(boxId);
      await rm(join(this.boxDir(boxId), 'mem'), { force: true });
      rec.expectRunning = false;
      await this.writeRecord(rec);
      this.secrets.delete(boxId);
    });
  }

  private async dropSnapshot(boxId: string): Promise<void> {
    const snap = join(this.boxDir(boxId), 'snapshot');
    await rm(snap, { recursive: true, force: true });
    await mkdir(snap, { recursive: true, mode: 0o700 });
  }

  /** Snapshots the VM and ends its QEMU; `mode` overrides the driver's snapshot mode for this pause. */
  async pause(boxId: string, mode: SnapshotMode = this.opts.snapshotMode ?? 'fast'): Promise<void> {
    checkBoxId(boxId);
    await this.withLock(boxId, async () => {
      const dir = this.boxDir(boxId);
      if (existsSync(join(dir, 'snapshot', 'meta.json')) && !this.qemuPid(boxId)) return;
      const rec = await this.readRecord(boxId);
      if (!rec) throw new MicrovmError('BOX_NOT_FOUND', `box ${boxId} does not exist`);
      const vm = await this.liveVm(boxId);
      await this.snapshot(boxId, rec, vm, mode);
    });
  }

  /**
   * Writes the VM's snapshot and ends its QEMU. Secrets are wiped in the guest first (they must
   * not be in a snapshot file) and the guest's filesystems synced (the disks are consistent with
   * the RAM at the moment of `stop`).
   */
  private async snapshot(boxId: string, rec: BoxRecord, vm: LiveVm, mode: SnapshotMode): Promise<void> {
    const dir = this.boxDir(boxId);
    const snap = join(dir, 'snapshot');
    await this.dropSnapshot(boxId);
    const tmp = join(snap, 'state.tmp');
    await vm.channel.quiesce(SECRETS_DIR);
    await vm.qmp.execute('stop');
    let meta: SnapshotMeta;
    try {
      meta = await this.writeState(boxId, vm, rec, mode, tmp);
    } catch (e) {
      // The VM keeps running as it was: a failed pause loses nothing.
      await vm.qmp.execute('cont').catch(() => undefined);
      await this.injectSecrets(boxId, vm.channel).catch(() => undefined);
      throw e;
    }
    await rename(tmp, join(snap, 'state'));
    if (mode === 'portable') {
      // The guest is stopped: its RAM file no longer changes. Compressed next to the state, it is
      // what another node restores from; the RAM file itself goes (unlinking it while the exiting
      // QEMU still maps it is fine: the space is freed with the mapping). tar --sparse skips the
      // file's holes (the RAM the guest never touched): reading them would cost ~1.4 s/GiB.
      try {
        await runHostCommand(['bash', '-c', 'set -o pipefail; tar --sparse -C "$1" -cf - mem | zstd -1 -T0 -q -f -o "$2"', 'bash', dir, join(snap, 'mem.tar.zst')]);
        await chmod(join(snap, 'mem.tar.zst'), 0o600);
      } catch (e) {
        await vm.qmp.execute('cont').catch(() => undefined);
        await this.injectSecrets(boxId, vm.channel).catch(() => undefined);
        throw e;
      }
      meta = { ...meta, ramFile: 'mem.tar.zst' };
    }
    await writeSnapshotMeta(snap, meta);
    rec.expectRunning = false;
    await this.writeRecord(rec);
    await vm.qmp.execute('quit').catch(() => undefined);
    if (mode === 'portable') await rm(join(dir, 'mem'), { force: true });
    const exit = this.kill(boxId, { keepNic: true })
      .catch((e: Error) => this.log('microvm: cleaning up after a pause failed', { boxId, err: e.message }))
      .finally(() => this.exiting.delete(boxId));
    this.exiting.set(boxId, exit);
  }

  /**
   * Writes a stopped VM's device state to `file`. Guest RAM is in the shared RAM file and skipped
   * (`x-ignore-shared`): streaming it through QEMU's migration under TCG costs ~1.7 s/GiB, while
   * compressing the file afterwards (portable mode) reads holes and zero pages at disk speed.
   * The state streams to a unix socket the agent listens on: QEMU's seccomp filter forbids the
   * process an `exec:` migration would spawn, and its jail has no file of the snapshot's.
   */
  private async writeState(boxId: string, vm: LiveVm, rec: BoxRecord, mode: SnapshotMode, file: string): Promise<SnapshotMeta> {
    await vm.qmp.execute('migrate-set-capabilities', { capabilities: [{ capability: 'x-ignore-shared', state: true }] });
    await vm.qmp.execute('migrate-set-parameters', { 'max-bandwidth': 64 * 1024 ** 3 });
    const sock = join(this.runDir(boxId), 'migrate.sock');
    const data = await receiveOnce(sock, rec.uid, async () => {
      await vm.qmp.execute('migrate', { uri: `unix:${sock}` });
      await waitMigration(vm.qmp, 120_000);
    });
    await writeFile(file, data, { mode: 0o600 });
    return {
      mode,
      qemuVersion: this.qemuVer,
      kernelRelease: vm.channel.kernelRelease,
      memoryMiB: rec.memoryMiB,
      vcpus: rec.vcpus,
      stateFile: 'state',
      stateBytes: data.length,
      stateSha256: createHash('sha256').update(data).digest('hex'),
      createdAt: new Date().toISOString(),
    };
  }

  /**
   * The record of a box restored from another box's snapshot (a fork) or from another node's (a
   * move): an address and MAC of its own here, and the guest's current ones remembered, so the
   * restore reconfigures the guest.
   */
  private async restoredRecord(src: BoxRecord, boxId: string, over: Partial<BoxRecord>): Promise<BoxRecord> {
    const rec: BoxRecord = {
      ...src,
      ...over,
      boxId,
      ip: await this.allocateIp(boxId),
      mac: boxMac(boxId),
      guestIp: src.guestIp ?? src.ip,
      guestMac: src.guestMac ?? src.mac,
      expectRunning: false,
    };
    delete rec.failure;
    // Its own uid comes with its first launch.
    delete rec.uid;
    return rec;
  }

  /**
   * Clones a running or paused VM (RAM, device state, root overlay and workspace volume) into a
   * new box and starts the clone with its own identity: host name, machine-id, MAC, address and
   * NIC. A running source is stopped only for the device-state write and the file copies.
   */
  async fork(sourceId: string, spec: BoxRuntimeSpec): Promise<void> {
    checkBoxId(sourceId);
    checkBoxId(spec.boxId);
    if (this.qemuPid(spec.boxId)) return;
    const dst = this.boxDir(spec.boxId);
    const { rec, meta } = await this.withLock(sourceId, async () => {
      const src = await this.readRecord(sourceId);
      if (!src) throw new MicrovmError('BOX_NOT_FOUND', `fork source ${sourceId} does not exist on this node`);
      const srcDir = this.boxDir(sourceId);
      await rm(dst, { recursive: true, force: true });
      await mkdir(join(dst, 'snapshot'), { recursive: true, mode: 0o700 });
      let meta: SnapshotMeta;
      if (this.qemuPid(sourceId)) {
        const vm = await this.liveVm(sourceId);
        await vm.channel.quiesce(SECRETS_DIR);
        await vm.qmp.execute('stop');
        try {
          meta = await this.writeState(sourceId, vm, src, 'fast', join(dst, 'snapshot', 'state'));
          await copyFiles(srcDir, dst, ['mem', 'root.qcow2', 'volume.ext4']);
        } finally {
          await vm.qmp.execute('cont').catch(() => undefined);
          await this.injectSecrets(sourceId, vm.channel).catch(() => undefined);
        }
      } else {
        meta = await this.readSnapshotMeta(sourceId).catch(() => {
          throw new MicrovmError('BOX_NOT_RUNNING', `fork needs a running or paused source; ${sourceId} is stopped`);
        });
        await copyFiles(join(srcDir, 'snapshot'), join(dst, 'snapshot'), [meta.stateFile, ...(meta.ramFile ? [meta.ramFile] : [])]);
        await copyFiles(srcDir, dst, [...(meta.ramFile ? [] : ['mem']), 'root.qcow2', 'volume.ext4']);
      }
      const rec = await this.restoredRecord(src, spec.boxId, { name: spec.name, env: spec.env, createdAt: new Date().toISOString() });
      await this.writeRecord(rec);
      return { rec, meta };
    });
    await this.withLock(spec.boxId, async () => {
      try {
        await this.restore(spec.boxId, rec, meta);
        // The clone woke up as its source (restore gave it its own address): its own name and id too.
        const vm = await this.liveVm(spec.boxId);
        await vm.channel.setIdentity(rec.name, machineIdFor(rec.boxId));
      } catch (e) {
        await this.kill(spec.boxId);
        await rm(dst, { recursive: true, force: true });
        throw e;
      }
    });
  }

  /**
   * The paused box as one stream (zstd-compressed tar, holes kept): its record, root overlay,
   * workspace volume, snapshot and, for a fast snapshot, the RAM file. What another node's
   * {@link importSnapshot} takes to resume the box there.
   */
  async exportSnapshot(boxId: string): Promise<Readable> {
    checkBoxId(boxId);
    const dir = this.boxDir(boxId);
    const meta = await this.withLock(boxId, async () => {
      if (this.qemuPid(boxId)) throw new MicrovmError('BOX_NOT_RUNNING', `box ${boxId} is running: pause it before moving it`);
      return this.readSnapshotMeta(boxId);
    });
    const files = ['box.json', 'root.qcow2', 'volume.ext4', 'snapshot', ...(meta.ramFile ? [] : ['mem'])];
    const c = spawn('bash', ['-c', 'set -o pipefail; dir=$1; shift; tar --sparse -cf - -C "$dir" "$@" | zstd -1 -T0 -q', 'sh', dir, ...files], { stdio: ['ignore', 'pipe', 'pipe'] });
    let err = '';
    c.stderr.on('data', (b: Buffer) => (err += b.toString()));
    c.on('close', (code) => {
      if (code !== 0) c.stdout.destroy(new Error(`exporting box ${boxId} failed (${code}): ${err.trim()}`));
    });
    return c.stdout;
  }

  /**
   * Takes a paused box exported by another node ({@link exportSnapshot}): unpacks it next to the
   * boxes, points its root overlay at this node's base disk of the same image, gives it an address
   * of this node (the guest is reconfigured on resume) and leaves it paused. Idempotent: a box
   * that is already here is kept as it is.
   */
  async importSnapshot(spec: BoxRuntimeSpec, bundle: Readable): Promise<void> {
    checkBoxId(spec.boxId);
    await this.withLock(spec.boxId, async () => {
      if (await this.readRecord(spec.boxId)) return;
      const tmp = join(this.boxesDir, `.import-${spec.boxId}-${process.pid}`);
      await rm(tmp, { recursive: true, force: true });
      await mkdir(tmp, { recursive: true });
      try {
        await new Promise<void>((resolve, reject) => {
          // Files come out root's: the owners on the other node mean nothing here.
          const c = spawn('bash', ['-c', 'set -o pipefail; zstd -dcq | tar --sparse --no-same-owner -xf - -C "$1"', 'sh', tmp], { stdio: ['pipe', 'ignore', 'pipe'] });
          let err = '';
          c.stderr.on('data', (b: Buffer) => (err += b.toString()));
          bundle.on('error', (e) => c.kill() && reject(e));
          c.on('error', reject);
          c.on('close', (code) => (code === 0 ? resolve() : reject(new Error(`unpacking the snapshot failed (${code}): ${err.trim()}`))));
          bundle.pipe(c.stdin);
        });
        const src = JSON.parse(await readFile(join(tmp, 'box.json'), 'utf8')) as BoxRecord;
        JSON.parse(await readFile(join(tmp, 'snapshot', 'meta.json'), 'utf8'));
        if (src.boxId !== spec.boxId) throw new MicrovmError('SNAPSHOT_INVALID', `the snapshot is of box ${src.boxId}, not ${spec.boxId}`);
        // The overlay names its base by absolute path: this node's base of the same image.
        const base = await this.disks.ensureBase(spec.imageRootfs, spec.imageDigest);
        await runHostCommand(['qemu-img', 'rebase', '-u', '-b', base, '-F', 'qcow2', join(tmp, 'root.qcow2')]);
        const rec = await this.restoredRecord(src, spec.boxId, { imageRootfs: spec.imageRootfs, imageDigest: spec.imageDigest, env: spec.env });
        await writeFile(join(tmp, 'box.json'), JSON.stringify(rec, null, 2), { mode: 0o600 });
        await chmod(tmp, 0o700);
        await rename(tmp, this.boxDir(spec.boxId));
      } finally {
        await rm(tmp, { recursive: true, force: true });
      }
    });
  }

  async resume(boxId: string): Promise<void> {
    checkBoxId(boxId);
    await this.withLock(boxId, async () => {
      if (this.qemuPid(boxId)) return;
      const dir = this.boxDir(boxId);
      const rec = await this.readRecord(boxId);
      if (!rec) throw new MicrovmError('BOX_NOT_FOUND', `box ${boxId} does not exist`);
      const meta = await this.readSnapshotMeta(boxId);
      try {
        await this.restore(boxId, rec, meta);
      } catch (e) {
        // The snapshot cannot be used: set it aside (kept for inspection, never silently
        // deleted) and leave the box stopped with its disks; the workspace volume is untouched.
        await this.kill(boxId);
        const aside = join(dir, `snapshot.failed-${Date.now()}`);
        await rename(join(dir, 'snapshot'), aside).catch(() => undefined);
        await mkdir(join(dir, 'snapshot'), { recursive: true });
        await rm(join(dir, 'mem'), { force: true });
        rec.expectRunning = false;
        await this.writeRecord(rec);
        const code = e instanceof MicrovmError ? e.code : 'RESTORE_FAILED';
        throw new MicrovmError(code === 'SNAPSHOT_INVALID' ? code : 'RESTORE_FAILED', `${(e as Error).message}; the box is stopped (its volume is intact, the snapshot was moved to ${aside})`);
      }
    });
  }

  private async readSnapshotMeta(boxId: string): Promise<SnapshotMeta> {
    let meta: SnapshotMeta;
    try {
      meta = JSON.parse(await readFile(join(this.boxDir(boxId), 'snapshot', 'meta.json'), 'utf8')) as SnapshotMeta;
    } catch {
      throw new MicrovmError('BOX_NOT_RUNNING', `box ${boxId} has no snapshot to resume from`);
    }
    return meta;
  }

  private async restore(boxId: string, rec: BoxRecord, meta: SnapshotMeta): Promise<void> {
    const dir = this.boxDir(boxId);
    const state = join(dir, 'snapshot', meta.stateFile);
    if (meta.qemuVersion !== this.qemuVer) throw new MicrovmError('SNAPSHOT_INVALID', `the snapshot was written by QEMU ${meta.qemuVersion}; this node runs ${this.qemuVer}`);
    if (meta.kernelRelease && meta.kernelRelease !== this.assets!.kernel.release) {
      throw new MicrovmError('SNAPSHOT_INVALID', `the snapshot's guest kernel is ${meta.kernelRelease}; this node boots ${this.assets!.kernel.release}`);
    }
    const data = await readFile(state).catch(() => null);
    if (!data) throw new MicrovmError('SNAPSHOT_INVALID', `snapshot state file ${meta.stateFile} is missing`);
    if (data.length !== meta.stateBytes || createHash('sha256').update(data).digest('hex') !== meta.stateSha256) {
      throw new MicrovmError('SNAPSHOT_INVALID', `snapshot state file ${meta.stateFile} is corrupt or truncated (${data.length} of ${meta.stateBytes} bytes, checksum mismatch)`);
    }
    if (meta.ramFile) {
      // A portable snapshot: the RAM file comes back from its compressed copy (zstd checks it).
      await rm(join(dir, 'mem'), { force: true });
      await runHostCommand(['bash', '-c', 'set -o pipefail; zstd -dcq "$1" | tar --sparse --no-same-owner -xf - -C "$2" mem', 'bash', join(dir, 'snapshot', meta.ramFile), dir]).catch((e: Error) => {
        throw new MicrovmError('SNAPSHOT_INVALID', `the snapshot's RAM file ${meta.ramFile} is corrupt or truncated: ${e.message}`);
      });
    }
    if (!existsSync(join(dir, 'mem'))) throw new MicrovmError('SNAPSHOT_INVALID', 'the snapshot needs the RAM file, which is missing');
    if (!existsSync(join(dir, 'root.qcow2'))) throw new MicrovmError('SNAPSHOT_INVALID', 'the root disk overlay is missing');
    // The snapshot's machine shape wins over later resource edits: the device state fits only it.
    const sized: BoxRecord = { ...rec, vcpus: meta.vcpus, memoryMiB: meta.memoryMiB, expectRunning: true };
    delete sized.failure;
    await this.writeRecord(sized);
    const qmp = await this.launch(sized, true);
    try {
      await qmp.execute('migrate-set-capabilities', { capabilities: [{ capability: 'x-ignore-shared', state: true }] });
      // QEMU listens on a socket of its run dir, and the agent streams the state file into it (the
      // jail holds no snapshot file, and the seccomp filter forbids spawning `cat`).
      const incomingSock = join(dir, RUN_DIR, 'migrate.sock');
      await qmp.execute('migrate-incoming', { uri: `unix:${incomingSock}` });
      await sendOnce(incomingSock, data);
      await waitIncoming(qmp, 120_000, () => this.qemuPid(boxId) !== undefined);
      // Connect before cont: the guest agent reads EOF until a host is there.
      const sock = await connectUnix(join(dir, RUN_DIR, 'agent.sock'));
      await qmp.execute('cont');
      const channel = await GuestChannel.open(sock, { timeoutMs: 15_000 });
      const vm = { qmp, channel };
      this.attachLive(boxId, vm);
      if ((sized.guestIp ?? sized.ip) !== sized.ip || (sized.guestMac ?? sized.mac) !== sized.mac) {
        // Restored on another NIC (a fork, or a box moved from another node): the guest still has
        // its source's address and MAC, which belong to someone else here.
        await channel.netConfig('eth0', `${sized.ip}/${this.network.subnet.prefix}`, this.network.gateway, sized.mac);
        await this.writeRecord({ ...sized, guestIp: sized.ip, guestMac: sized.mac });
      }
      await this.injectSecrets(boxId, channel, { skipEmpty: true });
    } catch (e) {
      qmp.close();
      const tail = await this.consoleTail(boxId);
      throw new MicrovmError('RESTORE_FAILED', `restoring the snapshot failed: ${(e as Error).message}${tail ? `; console: ${tail}` : ''}`);
    }
    await this.dropSnapshot(boxId);
    if (meta.mode === 'portable') this.log('microvm resumed from a portable snapshot', { boxId });
  }

  async destroy(boxId: string): Promise<void> {
    checkBoxId(boxId);
    await this.withLock(boxId, async () => {
      const dir = this.boxDir(boxId);
      const rec = await this.readRecord(boxId);
      await this.kill(boxId);
      await rm(dir, { recursive: true, force: true });
      // The uid goes last: no process and no file of the box is left that it could reach.
      if (rec?.uid !== undefined) await this.vmUids.free(rec.uid, dir);
      const held = this.vmUids.uidHeldBy(dir);
      if (held !== undefined) await this.vmUids.free(held, dir);
      this.secrets.delete(boxId);
    });
  }

  async inspect(boxId: string): Promise<RuntimeBoxStatus> {
    checkBoxId(boxId);
    const rec = await this.readRecord(boxId);
    if (!rec) return { boxId, state: 'absent' };
    const snapshotted = existsSync(join(this.boxDir(boxId), 'snapshot', 'meta.json'));
    // Paused as soon as the snapshot is written, even while its QEMU is still exiting.
    if (snapshotted && !rec.expectRunning) return { boxId, state: 'paused', ip: rec.ip };
    const pid = this.qemuPid(boxId);
    if (pid) return { boxId, state: 'running', ip: rec.ip, pid };
    if (snapshotted) return { boxId, state: 'paused', ip: rec.ip };
    if (rec.expectRunning && !this.locks.has(boxId)) {
      // QEMU is gone although nothing stopped it: killed (OOM, kill -9) or crashed. Recorded once,
      // reported until the next start.
      rec.expectRunning = false;
      rec.failure = `the VM's QEMU process ended without a stop (killed or crashed)${await this.consoleTail(boxId).then((t) => (t ? `; console: ${t}` : ''))}`;
      await this.writeRecord(rec);
      this.live.get(boxId)?.channel.close();
      this.live.delete(boxId);
      await this.network.detach(boxId).catch(() => undefined);
      this.log('microvm ended unexpectedly', { boxId, failure: rec.failure });
    }
    return { boxId, state: 'stopped', ip: rec.ip, ...(rec.failure ? { failure: rec.failure } : {}) };
  }

  async list(): Promise<RuntimeBoxStatus[]> {
    const ids = await readdir(this.boxesDir).catch(() => [] as string[]);
    const out: RuntimeBoxStatus[] = [];
    for (const id of ids) {
      if (!/^[a-zA-Z0-9_-]+$/.test(id)) continue;
      const s = await this.inspect(id);
      if (s.state !== 'absent') out.push(s);
    }
    return out;
  }

  async writeSecrets(boxId: string, secrets: readonly BoxSecret[]): Promise<void> {
    checkBoxId(boxId);
    this.secrets.set(boxId, [...secrets]);
    // A paused or stopped VM gets them when it runs again (resume and start inject them).
    if (!this.qemuPid(boxId)) return;
    await this.withLock(boxId, async () => {
      if (!this.qemuPid(boxId)) return;
      await this.injectSecrets(boxId, (await this.liveVm(boxId)).channel);
    });
  }

  private async injectSecrets(boxId: string, channel: GuestChannel, opts: { skipEmpty?: boolean } = {}): Promise<void> {
    const set = this.secrets.get(boxId) ?? [];
    // After a restore the directory is empty (the pause wiped it): an empty set needs no round trip.
    if (opts.skipEmpty && set.length === 0) return;
    await channel.replaceDir(SECRETS_DIR, set.map((s) => ({ name: s.name, data: s.value })));
  }

  async exec(boxId: string, opts: ExecOptions): Promise<ExecProcess> {
    checkBoxId(boxId);
    if (opts.argv.length === 0) throw new Error('exec: empty argv');
    const rec = await this.readRecord(boxId);
    if (!rec) throw new MicrovmError('BOX_NOT_FOUND', `box ${boxId} does not exist`);
    const vm = await this.liveVm(boxId);
    const env: Record<string, string> = {
      PATH: BOX_DEFAULT_PATH,
      HOME: '/root',
      HOSTNAME: rec.name,
      ...rec.env,
      ...Object.fromEntries((this.secrets.get(boxId) ?? []).map((s) => [s.name, s.value])),
      ...(opts.env ?? {}),
    };
    return vm.channel.exec({ ...opts, env, cwd: opts.cwd ?? '/workspace' });
  }

  async dial(boxId: string, port: number): Promise<Duplex> {
    checkBoxId(boxId);
    if (!Number.isInteger(port) || port < 1 || port > 65535) throw new MicrovmError('INVALID_SPEC', `invalid port: ${port}`);
    const vm = await this.liveVm(boxId);
    return vm.channel.dial(port);
  }

  /** Prebuilds are layered sandbox roots: a microVM box with a repository is set up from scratch. */
  canRunPrebuilds(): boolean {
    return false;
  }

  /**
   * Runs `fn` with the box's workspace volume mounted on the host (loop device), for a host-side
   * repository checkout before the VM first boots. Files belong to the guest's root (uid 0).
   */
  async withWorkspaceOnHost<T>(boxId: string, fn: (paths: { workspace: string; owner: { uid: number; gid: number } }) => Promise<T>): Promise<T> {
    checkBoxId(boxId);
    return this.withLock(boxId, async () => {
      if (this.qemuPid(boxId)) throw new MicrovmError('INVALID_SPEC', `box ${boxId} is running: its volume cannot be mounted on the host`);
      const dir = this.boxDir(boxId);
      const mnt = join(dir, 'volume-mnt');
      await mkdir(mnt, { recursive: true });
      await runHostCommand(['mount', '-o', 'loop,noatime', join(dir, 'volume.ext4'), mnt]);
      try {
        await mkdir(join(mnt, 'workspace'), { recursive: true, mode: 0o755 });
        return await fn({ workspace: join(mnt, 'workspace'), owner: { uid: 0, gid: 0 } });
      } finally {
        await runHostCommand(['umount', mnt]);
        await rm(mnt, { recursive: true, force: true });
      }
    });
  }

  /** Renames a running VM (a warm-pool box claimed under its user's name). */
  async setHostname(boxId: string, name: string): Promise<void> {
    checkBoxId(boxId);
    if (!/^[a-z]([a-z0-9-]*[a-z0-9])?$/.test(name) || name.length > 63) throw new MicrovmError('INVALID_SPEC', `invalid host name: ${name}`);
    await this.withLock(boxId, async () => {
      const rec = await this.readRecord(boxId);
      if (!rec) throw new MicrovmError('BOX_NOT_FOUND', `box ${boxId} does not exist`);
      if (this.qemuPid(boxId)) await (await this.liveVm(boxId)).channel.setIdentity(name, machineIdFor(boxId));
      await this.writeRecord({ ...rec, name });
    });
  }

  /** Guest health (load, memory, idle time) of a running VM. */
  async health(boxId: string): Promise<Record<string, number>> {
    return (await this.liveVm(boxId)).channel.health();
  }

  /** Size of a box's files on the host (disks, RAM file, snapshot), for benchmarks and reports. */
  async diskUsage(boxId: string): Promise<Record<string, number>> {
    const out: Record<string, number> = {};
    for (const f of ['root.qcow2', 'volume.ext4', 'mem', 'snapshot/state', 'snapshot/mem.tar.zst']) {
      const s = await stat(join(this.boxDir(boxId), f)).catch(() => null);
      if (s) out[f] = s.blocks * 512;
    }
    return out;
  }
}

async function writeSnapshotMeta(dir: string, meta: SnapshotMeta): Promise<void> {
  await writeFile(join(dir, 'meta.json.tmp'), JSON.stringify(meta, null, 2), { mode: 0o600 });
  await rename(join(dir, 'meta.json.tmp'), join(dir, 'meta.json'));
}

/** Copies files keeping holes (RAM files and volumes are mostly sparse), reflinked where the filesystem can. */
async function copyFiles(from: string, to: string, names: string[]): Promise<void> {
  for (const n of names) await runHostCommand(['cp', '--sparse=always', '--reflink=auto', join(from, n), join(to, n)]);
}

function checkBoxId(boxId: string): void {
  if (!/^[a-zA-Z0-9_-]{1,64}$/.test(boxId)) throw new MicrovmError('INVALID_BOX_ID', `invalid box id: ${boxId}`);
}

/** A stable machine-id per box (32 hex). */
export function machineIdFor(boxId: string): string {
  return createHash('sha256').update(`machine-id:${boxId}`).digest('hex').slice(0, 32);
}

/**
 * Receives the bytes of one connection to a unix socket at `path` while `drive` runs (and makes
 * QEMU connect and send). `uid` may connect: the jailed QEMU that sends.
 */
async function receiveOnce(path: string, uid: number | undefined, drive: () => Promise<void>): Promise<Buffer> {
  await rm(path, { force: true });
  const chunks: Buffer[] = [];
  const server = createServer();
  const received = new Promise<void>((resolve, reject) => {
    server.once('connection', (s) => {
      server.close();
      s.on('data', (b: Buffer) => chunks.push(b));
      s.once('end', () => resolve());
      s.once('error', reject);
    });
  });
  received.catch(() => undefined);
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(path, () => resolve());
  });
  try {
    if (uid !== undefined) await chown(path, uid, uid);
    await drive();
    await withTimeout(received, 30_000);
  } finally {
    server.close();
    await rm(path, { force: true });
  }
  return Buffer.concat(chunks);
}

/** Sends `data` as one connection to the unix socket at `path` (QEMU's incoming migration). */
async function sendOnce(path: string, data: Buffer): Promise<void> {
  const s = await connectUnix(path);
  await new Promise<void>((resolve, reject) => {
    s.once('error', reject);
    s.end(data, () => resolve());
  });
}

async function waitMigration(qmp: QmpClient, timeoutMs: number): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const r = await qmp.execute<{ status?: string; 'error-desc'?: string }>('query-migrate');
    if (r.status === 'completed') return;
    if (r.status === 'failed' || r.status === 'cancelled') throw new Error(`snapshot failed: ${r['error-desc'] ?? r.status}`);
    if (Date.now() > deadline) throw new Error('snapshot timed out');
    await new Promise((r2) => setTimeout(r2, 5));
  }
}

async function waitIncoming(qmp: QmpClient, timeoutMs: number, alive: () => boolean): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    if (!alive()) throw new Error('QEMU exited while loading the snapshot');
    const r = await qmp.execute<{ status?: string }>('query-status');
    if (r.status !== 'inmigrate') {
      if (r.status === 'paused' || r.status === 'prelaunch' || r.status === 'postmigrate' || r.status === 'running') return;
      throw new Error(`loading the snapshot ended in state ${r.status}`);
    }
    if (Date.now() > deadline) throw new Error('loading the snapshot timed out');
    await new Promise((r2) => setTimeout(r2, 5));
  }
}

function connectUnix(path: string): Promise<Socket> {
  return new Promise((resolve, reject) => {
    const s = connect(path);
    s.once('connect', () => resolve(s));
    s.once('error', reject);
  });
}

function withTimeout<T>(p: Promise<T>, ms: number): Promise<T> {
  return new Promise((resolve, reject) => {
    const t = setTimeout(() => reject(new Error(`timed out after ${ms} ms`)), ms);
    p.then(
      (v) => (clearTimeout(t), resolve(v)),
      (e: unknown) => (clearTimeout(t), reject(e as Error)),
    );
  });
}
