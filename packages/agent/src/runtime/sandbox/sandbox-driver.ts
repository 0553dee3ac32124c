/**
 * The `sandbox` runtime: one box = one crun container (user, pid, mount, uts, ipc and network
 * namespaces, cgroup limits, seccomp) on a read-only shared image with a per-box overlayfs upper.
 *
 * Host state of a box: `<dataDir>/boxes/<boxId>/` (box.json, config.json, upper/, work/, merged/,
 * sys/, etc/, volume/{workspace,home}/), crun's state `/run/crun/<boxId>`, cgroups
 * `<hierarchy>/<cgroupParent>/<boxId>`, the netns `dy-<boxId>` and a veth named by a hash of the
 * id. The overlay and sysfs are mounted in the private mount namespace crun runs in, so they live
 * and die with the box's processes and never show in the host's mount table.
 *
 * Optional layers (a prebuild): `spec.layers` stack read-only directories between the image and the
 * box's upper; `spec.workspaceBase` turns /workspace into a second overlay (lower = the base, upper =
 * volume/workspace, work = volume/.workspace-work, mounted at ws-merged/ in the same private
 * namespace), so a box from a prebuild is a copy-on-write clone of it and its workspace volume holds
 * only its own changes.
 *
 * Ids: every box's root maps to a host id range of its own (IdRangeAllocator), recorded in box.json
 * and freed on destroy. Images and prebuild layers are stored once, in the image id range, and
 * shared: they enter a box's overlay as idmapped mounts (image range → the box's range, made by the
 * devyard-idmap-mount helper in the same private namespace), the way Kubernetes' user-namespaced
 * pods and LXD's isolated containers see shared layers. What the box writes (upper, volumes, its
 * secrets) belongs to its own range on the host.
 *
 * Disk: a box with a disk size (`resources.diskBytes`) keeps upper/, work/ and volume/ on a
 * filesystem of that size of its own (box-disk.ts: an image under `<dataDir>/disks`, loop-mounted;
 * the box directory's `disk` is a symlink to the mount), so filling it is ENOSPC inside the box and
 * nothing on the node's filesystem. A box without one keeps them in the box directory, unbounded.
 */
import { createHash, randomBytes } from 'node:crypto';
import { existsSync, readFileSync, realpathSync, statSync } from 'node:fs';
import { chmod, chown, mkdir, readdir, readFile, rename, rm, rmdir, stat, symlink, writeFile } from 'node:fs/promises';
import type { Socket } from 'node:net';
import { dirname, join, resolve } from 'node:path';
import { BridgeNetwork, type BridgeNetworkOptions } from '../../network/bridge-network.js';
import { runHostCommand, runHostCommandRaw } from '../../network/host-command-runner.js';
import { allocateAddress } from '../../network/ipv4-subnet.js';
import type {
  BoxRuntimeSpec,
  BoxSecret,
  ExecOptions,
  ExecProcess,
  RuntimeBoxStatus,
  RuntimeDriver,
} from '../runtime-driver.js';
import { BOX_DEFAULT_PATH, BOX_TOOLS_BIN, BOX_TOOLS_DIR, ensureBoxToolsBundle, type BoxTool } from '../box-tools-bundle.js';
import { BOX_SECRETS_MOUNT, BoxSecretsDir } from '../box-secrets-dir.js';
import { spawnPipeExec, spawnPtyExec } from './box-exec-process.js';
import { CgroupLayout, type CgroupMode } from './cgroup-layout.js';
import { CrunCli } from './crun-cli.js';
import { DialError, NetnsDialer } from './netns-dialer-process.js';
import { buildOciSpec, type IdRange } from './oci-spec-builder.js';
import { IdRangeAllocator } from './id-range-allocator.js';
import { ensureIdmapMountHelper } from './idmap-mount-helper.js';
import { shiftTreeIds } from '../../images/tree-id-shift.js';
import { BoxDiskPool } from './box-disk.js';

/**
 * The image id range: image stores shift image ownership into it (root = 100000) and shared layers
 * are kept in it. No box runs as it: each box has a range of its own, and sees images through an
 * idmapped mount.
 */
export const DEFAULT_ID_RANGE: IdRange = { hostId: 100_000, size: 65_536 };

/** Options of {@link SandboxDriver}. */
export interface SandboxDriverOptions {
  /** Directory holding every box's disk state. */
  dataDir: string;
  /** Bridge, subnet and host object names of the box network. */
  network?: BridgeNetworkOptions;
  /** Parent cgroup of every box (default `devyard`). */
  cgroupParent?: string;
  /** The image id range (default 100000/65536); must match the image stores' shift. */
  imageIdRange?: IdRange;
  /** Where the boxes' own id ranges come from (default: the host-wide pool). */
  idRanges?: IdRangeAllocator;
  /** Formatted box disks kept ready per recently used disk size, so a create does not wait for mkfs (default 2; 0: none). */
  spareDisks?: number;
  /** Static busybox on the host, bound read-only into every box as its init (default: found in PATH dirs). */
  busyboxPath?: string;
  /** crun state directory (default /run/crun). */
  crunStateRoot?: string;
  /** Forces the cgroup layout instead of detecting it. */
  cgroupMode?: CgroupMode;
  /** Host programs bundled into every box at {@link BOX_TOOLS_DIR} (default: rsync and sftp-server). */
  boxTools?: BoxTool[];
  /** A box's network dialer exits after this long without a dial (default 60 s). */
  dialerIdleMs?: number;
  /** Host directory (a tmpfs) of the boxes' secrets directories (default /run/devyard/secrets). */
  secretsRoot?: string;
  /** Structured log sink. */
  log?: (msg: string, fields?: object) => void;
}

/** What the driver records about a box next to its disk state. */
interface BoxRecord {
  boxId: string;
  name: string;
  imageRootfs: string;
  imageDigest: string;
  resources: BoxRuntimeSpec['resources'];
  env: Record<string, string>;
  layers?: string[];
  workspaceBase?: string;
  ip: string;
  /** The box's own host id range; absent on boxes made before boxes had one (they use the image range until their next start). */
  idRange?: IdRange;
  /** The box's own filesystem (its size and the pool's id of it), made at create from `resources.diskBytes`; absent: unbounded, in the box directory. */
  disk?: { bytes: number; id: string };
  createdAt: string;
}

/** Host paths of a box's disk state, for host-side work on a stopped box (checkout, capture). */
export interface BoxHostPaths {
  /** The box directory. */
  dir: string;
  /** Upper directory of the box's root overlay: everything the box changed outside its volumes. */
  rootUpper: string;
  /** The workspace volume: /workspace itself, or its overlay upper when the box has a workspace base. */
  workspace: string;
  /** Host uid/gid box root maps to: files placed in the box's disk state must belong to it. */
  owner: { uid: number; gid: number };
  /** The box's host id range (owner is its first id). */
  idRange: IdRange;
  /** Where shared layers captured from the box (prebuilds, recipe images) must be moved to. */
  imageIdRange: IdRange;
}

const BOX_ID = /^[a-z0-9_]{1,40}$/;
/** The image's own programs come first; the bundled tools only fill in what it lacks. */
const BUSYBOX_IN_BOX = '/.devyard/busybox';
/** Overlay work dir of a copy-on-write /workspace: next to its upper (same filesystem), in the volume. */
const WORKSPACE_WORK = 'volume/.workspace-work';
/** Symlink in the box directory to the box's own disk (box-disk.ts). */
const DISK_LINK = 'disk';
/** Mount point of a copy-on-write /workspace, bound into the box by crun. */
const WORKSPACE_MERGED = 'ws-merged';
/** Init: reaps every child (ash's wait uses waitpid(-1)) and exits on SIGTERM. */
const INIT_SLEEP = '2147483647';
const INIT_SCRIPT = `trap 'exit 0' TERM INT; while :; do ${BUSYBOX_IN_BOX} sleep ${INIT_SLEEP} & wait; done`;

/** A box operation on a box this host cannot act on. */
export class SandboxError extends Error {
  constructor(
    /** Stable error code. */
    readonly code:
      | 'BOX_NOT_RUNNING'
      | 'BOX_NOT_FOUND'
      | 'BOX_PAUSED'
      | 'INVALID_BOX_ID'
      | 'INVALID_SPEC'
      /** Another box holds the host id range this box's record names. */
      | 'ID_RANGE_CONFLICT'
      /** Nothing listens on the dialed port inside the box. */
      | 'PORT_REFUSED'
      /** A dial failed otherwise (timeout, reset, the dialer died). */
      | 'DIAL_FAILED',
    message: string,
  ) {
    super(message);
  }
}

/** The crun-based sandbox runtime driver. */
export class SandboxDriver implements RuntimeDriver {
  /** Runtime name advertised by the node. */
  readonly name = 'sandbox';
  /** The cgroup freezer keeps process memory on the node. */
  readonly pauseKeepsMemory = true;
  /** The box network (exposed for diagnostics and tests). */
  readonly network: BridgeNetwork;
  /** The cgroup layout (exposed for diagnostics and tests). */
  readonly cgroups: CgroupLayout;
  private readonly crun: CrunCli;
  private readonly dataDir: string;
  /** Where crun sees the boxes: the data dir itself, or a bind of it under /run (see exposedBoxesDir). */
  private readonly boxesDir: string;
  /** The boxes directory inside the data dir. */
  private readonly hostBoxesDir: string;
  private preparing: Promise<void> = Promise.resolve();
  private readonly imageIdRange: IdRange;
  /** The boxes' own host id ranges. */
  readonly idRanges: IdRangeAllocator;
  private idmapHelper: Promise<string> | undefined;
  /** Makes the boxes' own disks. */
  private readonly disks: BoxDiskPool;
  /** The disks directory inside the data dir (the pool may see it through a bind under /run). */
  private readonly hostDisksDir: string;
  /** The static busybox every box gets at /.devyard/busybox (the microVM runtime reuses it). */
  readonly busyboxPath: string;
  private readonly log: (msg: string, fields?: object) => void;
  private readonly records = new Map<string, BoxRecord>();
  private readonly locks = new Map<string, Promise<unknown>>();
  private allocLock: Promise<unknown> = Promise.resolve();
  private resolvConf: string | undefined;
  /** Host directory bound at /.devyard/tools; unset until init built the bundle. */
  private toolsSource: string | undefined;
  /** The box tools bundle under the data dir. */
  private readonly toolsDir: string;
  private readonly boxTools: BoxTool[] | undefined;
  private readonly dialerIdleMs: number | undefined;
  private readonly dialers = new Map<string, NetnsDialer>();
  /** Boxes' secrets on tmpfs, bound read-only at /run/devyard/secrets (exposed for tests). */
  readonly secrets: BoxSecretsDir;

  constructor(opts: SandboxDriverOptions) {
    if (/[,:\s]/.test(opts.dataDir)) throw new Error('dataDir must not contain commas, colons or spaces (overlay options)');
    this.dataDir = opts.dataDir;
    this.hostBoxesDir = join(opts.dataDir, 'boxes');
    this.boxesDir = exposedBoxesDir(opts.dataDir, this.hostBoxesDir);
    this.network = new BridgeNetwork(opts.network);
    this.cgroups = new CgroupLayout({ parent: opts.cgroupParent ?? 'devyard', mode: opts.cgroupMode });
    this.crun = new CrunCli(this.cgroups.mode, { stateRoot: opts.crunStateRoot });
    this.imageIdRange = opts.imageIdRange ?? DEFAULT_ID_RANGE;
    this.idRanges = opts.idRanges ?? new IdRangeAllocator({ reserved: [this.imageIdRange] });
    this.busyboxPath = opts.busyboxPath ?? findBusybox();
    this.log = opts.log ?? (() => {});
    this.hostDisksDir = join(opts.dataDir, 'disks');
    this.disks = new BoxDiskPool({ dir: this.exposedDir(this.hostDisksDir, 'disks'), sparesPerSize: opts.spareDisks, log: this.log });
    this.toolsDir = join(opts.dataDir, 'tools');
    this.boxTools = opts.boxTools;
    this.dialerIdleMs = opts.dialerIdleMs;
    this.secrets = new BoxSecretsDir({ root: opts.secretsRoot, owner: (boxId) => this.boxOwner(boxId), log: this.log });
  }

  /** Prepares the bridge, NAT, cgroup parent and data directory. */
  async init(): Promise<void> {
    await this.prepareBoxesDir();
    // Spares an earlier agent process left (maybe half made) go; boxes' disks stay.
    await this.prepareDisksDir();
    await this.disks.clear(await this.disksInUse());
    await this.prepareTools();
    await this.idmapMountHelper();
    await this.network.init();
    await this.cgroups.init();
    this.log('sandbox: host ready', { cgroupMode: this.cgroups.mode, bridge: this.network.bridge });
  }

  /** Removes the bridge, NAT table and cgroup parents (uninstall and tests); destroy boxes first. */
  async teardownHost(): Promise<void> {
    try {
      await this.disks.clear(await this.disksInUse());
      await this.network.teardown();
      await this.cgroups.removeParent();
    } finally {
      await this.unexposeDisksDir();
      await this.unexposeBoxesDir();
      await this.unexposeTools();
      await this.secrets.teardown().catch(() => undefined);
    }
  }

  /**
   * Builds the box tools bundle (when the host's programs changed) and makes it bindable: like the
   * boxes directory, through a bind under /run when the data dir is not searchable by others.
   * A rebuild (after a host package upgrade) removes the old bundle: boxes started before it see an
   * empty /.devyard/tools until they restart.
   */
  private async prepareTools(): Promise<void> {
    try {
      await ensureBoxToolsBundle({ dir: this.toolsDir, tools: this.boxTools, log: this.log });
    } catch (err) {
      // Boxes run without the tools rather than not at all (scp and rsync into them fail).
      this.log('box tools: bundle unavailable', { error: (err as Error).message });
      this.toolsSource = undefined;
      return;
    }
    const exposed = this.exposedToolsDir();
    if (exposed !== this.toolsDir) {
      // Re-bind every time: a rebuilt bundle is a new directory the old bind does not show.
      await this.unexposeTools();
      await mkdir(exposed, { recursive: true, mode: 0o755 });
      await runHostCommand(['mount', '--bind', '-o', 'ro', this.toolsDir, exposed]);
    }
    this.toolsSource = exposed;
  }

  private exposedToolsDir(): string {
    if (this.boxesDir === this.hostBoxesDir) return this.toolsDir;
    const hash = createHash('sha256').update(resolve(this.toolsDir)).digest('hex').slice(0, 16);
    return `/run/devyard/tools-${hash}`;
  }

  private async unexposeTools(): Promise<void> {
    const exposed = this.exposedToolsDir();
    if (exposed === this.toolsDir) return;
    for (let i = 0; i < 64 && isMountPoint(exposed); i++) await runHostCommandRaw(['umount', exposed]);
    await rmdir(exposed).catch(() => undefined);
  }

  /** Removes the /run bind of the boxes directory (see exposedBoxesDir), every stacked layer of it. */
  private async unexposeBoxesDir(): Promise<void> {
    if (this.boxesDir !== this.hostBoxesDir) {
      // Unmount every layer (an older agent may have stacked binds), then the empty mount point.
      for (let i = 0; i < 64 && isMountPoint(this.boxesDir); i++) await runHostCommandRaw(['umount', this.boxesDir]);
      await rmdir(this.boxesDir).catch(() => undefined);
    }
  }

  /** Creates the box's disk state; keeps an existing one (and its address). */
  async create(spec: BoxRuntimeSpec): Promise<void> {
    checkBoxId(spec.boxId);
    checkLayers(spec);
    await this.withLock(spec.boxId, () => this.createLocked(spec));
  }

  /** Cold-boots the box from its disk state; converges when it already runs. */
  async start(spec: BoxRuntimeSpec): Promise<void> {
    checkBoxId(spec.boxId);
    checkLayers(spec);
    await this.withLock(spec.boxId, async () => {
      const t0 = performance.now();
      let rec = await this.createLocked(spec);
      const existing = await this.crunState(spec.boxId);
      if (existing && (existing.status === 'running' || existing.status === 'paused')) return;
      if (existing) await this.releaseRuntime(spec.boxId, 0);
      const dir = this.boxDir(spec.boxId);
      if (rec.disk) {
        // After a reboot: the /run bind and the mount are made again.
        await this.prepareDisksDir();
        await this.disks.ensureMounted(rec.disk.id);
      }
      rec = await this.ensureOwnIdRange(rec);
      const range = rec.idRange ?? this.imageIdRange;
      const data = dataRoot(dir, rec);
      // Shared layers show as the box's own through idmapped mounts (none for a box still on the image range).
      const lowers = [...(rec.layers ?? []), rec.imageRootfs];
      const idmapped = range.hostId !== this.imageIdRange.hostId;
      const lowerAt = idmapped ? lowers.map((_, i) => join(dir, 'lower', String(i))) : lowers;
      const wsBaseAt = rec.workspaceBase && idmapped ? join(dir, 'ws-lower') : rec.workspaceBase;
      try {
        const helper = idmapped ? await this.idmapMountHelper() : '';
        if (idmapped) for (const p of [...lowerAt, ...(wsBaseAt ? [wsBaseAt] : [])]) await mkdir(p, { recursive: true, mode: 0o755 });
        // The agent wrote the box's secrets before starting it; an empty directory otherwise.
        const secretsSource = spec.secrets ? await this.secrets.ensure(spec.boxId) : undefined;
        const netnsPath = await this.network.createNamespace(spec.boxId);
        // The box joins its namespace right away; the veth and address are set up meanwhile
        // (start returns only when both are done, so the first exec sees a configured network).
        const configured = this.network.configure(spec.boxId, rec.ip);
        configured.catch(() => {});
        this.resolvConf ??= await this.network.resolvConf();
        await Promise.all([
          writeFile(join(dir, 'etc/hostname'), `${rec.name}\n`),
          writeFile(
            join(dir, 'etc/hosts'),
            `127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n${rec.ip}\t${rec.name}\n`,
          ),
          writeFile(join(dir, 'etc/resolv.conf'), this.resolvConf),
          writeFile(join(dir, 'config.json'), JSON.stringify(this.ociSpec(rec, netnsPath, secretsSource))),
        ]);
        await Promise.all([
          configured,
          this.crun.runDetached(
            spec.boxId,
            dir,
            {
              idmapped: idmapped
                ? {
                    helper,
                    from: this.imageIdRange.hostId,
                    to: range.hostId,
                    count: Math.min(range.size, this.imageIdRange.size),
                    mounts: [
                      ...lowers.map((source, i) => ({ source, target: lowerAt[i]! })),
                      ...(rec.workspaceBase && wsBaseAt ? [{ source: rec.workspaceBase, target: wsBaseAt }] : []),
                    ],
                  }
                : undefined,
              overlay: {
                lower: lowerAt.join(':'),
                upper: join(data, 'upper'),
                work: join(data, 'work'),
                target: join(dir, 'merged'),
              },
              overlays: wsBaseAt
                ? [
                    {
                      lower: wsBaseAt,
                      upper: join(data, 'volume/workspace'),
                      work: join(data, WORKSPACE_WORK),
                      target: join(dir, WORKSPACE_MERGED),
                    },
                  ]
                : undefined,
              sysfs: { netnsPath, target: join(dir, 'sys') },
            },
            join(dir, 'init.log'),
          ),
        ]);
      } catch (err) {
        await this.releaseRuntime(spec.boxId, 0).catch(() => {});
        await this.secrets.remove(spec.boxId).catch(() => {});
        throw err;
      }
      this.log('sandbox: started', { boxId: spec.boxId, ms: Math.round(performance.now() - t0) });
      this.disks.refillTaken();
    });
  }

  /** Ends every process (SIGTERM, grace, SIGKILL) and releases cgroups and network; keeps disk state. */
  async stop(boxId: string, opts: { graceMs?: number } = {}): Promise<void> {
    checkBoxId(boxId);
    await this.withLock(boxId, async () => {
      await this.releaseRuntime(boxId, opts.graceMs ?? 10_000);
      await this.secrets.remove(boxId);
    });
  }

  /** Replaces the box's secrets: files on tmpfs, bound read-only into the box, and exec environment. */
  async writeSecrets(boxId: string, secrets: readonly BoxSecret[]): Promise<void> {
    checkBoxId(boxId);
    await this.withLock(boxId, () => this.secrets.write(boxId, secrets));
  }

  /** Freezes every process of the box through the cgroup freezer. */
  /**
   * Renames a box without restarting it (a warm-pool box claimed under its user's name): the UTS
   * host name is set from the host inside the box's namespace (box root lacks CAP_SYS_ADMIN for
   * it), /etc/hostname and /etc/hosts are rewritten in place (they are bind mounts: the inode must
   * stay), and the record keeps the name for later starts.
   */
  async setHostname(boxId: string, name: string): Promise<void> {
    checkBoxId(boxId);
    if (!/^[a-z]([a-z0-9-]*[a-z0-9])?$/.test(name) || name.length > 63) throw new SandboxError('INVALID_SPEC', `invalid host name: ${name}`);
    await this.withLock(boxId, async () => {
      const rec = await this.readRecord(boxId);
      if (!rec) throw new SandboxError('BOX_NOT_FOUND', `box ${boxId} does not exist`);
      const dir = this.boxDir(boxId);
      const next = { ...rec, name };
      await writeFile(join(dir, 'etc/hostname'), `${name}\n`);
      await writeFile(join(dir, 'etc/hosts'), `127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n${rec.ip}\t${name}\n`);
      const st = await this.crunState(boxId);
      if (st?.pid) await runHostCommand(['nsenter', '--target', String(st.pid), '--uts', 'hostname', name]);
      const tmp = join(dir, `.box.json.${process.pid}`);
      await writeFile(tmp, JSON.stringify(next, null, 2));
      await rename(tmp, join(dir, 'box.json'));
      this.records.set(boxId, next);
    });
  }

  async pause(boxId: string): Promise<void> {
    checkBoxId(boxId);
    await this.withLock(boxId, async () => {
      if (!this.hasRuntime(boxId)) throw new SandboxError('BOX_NOT_RUNNING', `box ${boxId} is not running`);
      await this.cgroups.freeze(boxId);
    });
  }

  /** Thaws a paused box. */
  async resume(boxId: string): Promise<void> {
    checkBoxId(boxId);
    await this.withLock(boxId, async () => {
      if (!this.hasRuntime(boxId)) throw new SandboxError('BOX_NOT_RUNNING', `box ${boxId} is not running`);
      await this.cgroups.thaw(boxId);
    });
  }

  /** Removes everything of the box; idempotent. */
  async destroy(boxId: string): Promise<void> {
    checkBoxId(boxId);
    await this.withLock(boxId, async () => {
      await this.releaseRuntime(boxId, 0);
      await this.secrets.remove(boxId);
      const range = (await this.readRecord(boxId))?.idRange;
      const dir = this.boxDir(boxId);
      const disk = (await this.readRecord(boxId))?.disk;
      if (disk) {
        await this.prepareDisksDir();
        await this.disks.remove(disk.id);
      }
      // Other mounts on the host under the box (none normally: they live in crun's private namespace).
      for (const m of await hostMountsUnder(dir)) await runHostCommandRaw(['umount', '-l', m]);
      await rm(dir, { recursive: true, force: true });
      this.records.delete(boxId);
      // Only once nothing of the box is left that its range owns.
      if (range) await this.idRanges.free(range, join(this.hostBoxesDir, boxId));
      this.log('sandbox: destroyed', { boxId });
    });
  }

  /** Observes one box. */
  async inspect(boxId: string): Promise<RuntimeBoxStatus> {
    checkBoxId(boxId);
    const rec = await this.readRecord(boxId);
    const st = await this.crunState(boxId);
    if (st && (st.status === 'running' || st.status === 'paused' || st.status === 'created')) {
      const paused = st.status === 'paused' || (await this.cgroups.isFrozen(boxId));
      return { boxId, state: paused ? 'paused' : 'running', ip: rec?.ip, pid: st.pid || undefined };
    }
    if (rec || existsSync(this.boxDir(boxId)) || st) return { boxId, state: 'stopped' };
    return { boxId, state: 'absent' };
  }

  /** Every box with disk state under dataDir or a crun container whose bundle is there. */
  async list(): Promise<RuntimeBoxStatus[]> {
    await this.prepareBoxesDir();
    const ids = new Set<string>();
    try {
      for (const e of await readdir(this.boxesDir, { withFileTypes: true })) {
        if (e.isDirectory() && BOX_ID.test(e.name)) ids.add(e.name);
      }
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'ENOENT') throw err;
    }
    for (const c of await this.crun.list()) {
      if (c.bundle.startsWith(`${this.boxesDir}/`) && BOX_ID.test(c.id)) ids.add(c.id);
    }
    return Promise.all([...ids].sort().map((id) => this.inspect(id)));
  }

  /**
   * Connects to 127.0.0.1:port inside the box's network namespace through the box's dialer
   * process (started on first use); the socket allows half-close.
   */
  async dial(boxId: string, port: number): Promise<Socket> {
    checkBoxId(boxId);
    if (!Number.isInteger(port) || port < 1 || port > 65535) throw new SandboxError('INVALID_SPEC', `invalid port: ${port}`);
    // Under the box lock, so a stop cannot slip between the state check and the dialer's start.
    const dialer = await this.withLock(boxId, async () => {
      if (!this.hasRuntime(boxId)) throw new SandboxError('BOX_NOT_RUNNING', `box ${boxId} is not running`);
      if (await this.cgroups.isFrozen(boxId)) throw new SandboxError('BOX_PAUSED', `box ${boxId} is paused`);
      let d = this.dialers.get(boxId);
      if (!d?.alive) {
        const created: NetnsDialer = new NetnsDialer({
          netnsPath: this.network.netnsPath(boxId),
          idleMs: this.dialerIdleMs,
          onExit: () => {
            if (this.dialers.get(boxId) === created) this.dialers.delete(boxId);
          },
        });
        d = created;
        this.dialers.set(boxId, d);
      }
      return d;
    });
    try {
      const socket = await dialer.dial(port);
      // Half-close passes through (SSH channels, `{"type":"eof"}` in the tunnel protocol).
      socket.allowHalfOpen = true;
      return socket;
    } catch (err) {
      if (!(err instanceof DialError)) throw err;
      if (err.code === 'ECONNREFUSED') throw new SandboxError('PORT_REFUSED', `nothing listens on port ${port} in box ${boxId}`);
      if (err.code === 'DIALER_EXITED' && !this.hasRuntime(boxId)) throw new SandboxError('BOX_NOT_RUNNING', `box ${boxId} is not running`);
      throw new SandboxError('DIAL_FAILED', `cannot connect to port ${port} in box ${boxId}: ${err.message}`);
    }
  }

  /** Host pid of the box's dialer process while one runs (diagnostics and tests). */
  dialerPid(boxId: string): number | undefined {
    const d = this.dialers.get(boxId);
    return d?.alive ? d.pid : undefined;
  }

  /** Starts a process in a running box. */
  async exec(boxId: string, opts: ExecOptions): Promise<ExecProcess> {
    checkBoxId(boxId);
    if (opts.argv.length === 0) throw new Error('exec: empty argv');
    if (!this.hasRuntime(boxId)) throw new SandboxError('BOX_NOT_RUNNING', `box ${boxId} is not running`);
    if (await this.cgroups.isFrozen(boxId)) throw new SandboxError('BOX_PAUSED', `box ${boxId} is paused`);
    const rec = await this.readRecord(boxId);
    const env: Record<string, string> = {
      PATH: BOX_DEFAULT_PATH,
      HOME: '/root',
      HOSTNAME: rec?.name ?? boxId,
      ...(rec?.env ?? {}),
      // Secrets over the box's env, under the session's own (read from tmpfs: never in box.json).
      ...(await this.secrets.read(boxId)),
      ...(opts.env ?? {}),
    };
    env.PATH = withBoxTools(env.PATH);
    if (opts.tty && env.TERM === undefined) env.TERM = 'xterm-256color';
    const pidFile = join(this.boxDir(boxId), `exec-${randomBytes(6).toString('hex')}.pid`);
    const argv = this.crun.execArgv(boxId, {
      cwd: opts.cwd ?? '/workspace',
      env: Object.entries(env).map(([k, v]) => `${k}=${v}`),
      pidFile,
      argv: opts.argv,
    });
    return opts.tty
      ? spawnPtyExec(argv, pidFile, { cols: opts.cols ?? 80, rows: opts.rows ?? 24 })
      : spawnPipeExec(argv, pidFile);
  }

  /**
   * crun sets up bind mounts from inside the box's user namespace, where host root's files are
   * "other": every directory on the way to a box must be searchable (x) by others.
   */
  /** Serialized: concurrent first calls must not each bind-mount the boxes directory. */
  private prepareBoxesDir(): Promise<void> {
    const next = this.preparing.then(() => this.prepareBoxesDirOnce());
    this.preparing = next.catch(() => undefined);
    return next;
  }

  private async prepareBoxesDirOnce(): Promise<void> {
    await mkdir(this.hostBoxesDir, { recursive: true });
    await chmod(this.hostBoxesDir, 0o711);
    await chmod(this.dataDir, (await stat(this.dataDir)).mode | 0o111);
    if (this.boxesDir !== this.hostBoxesDir && !isMountPoint(this.boxesDir)) {
      await mkdir(this.boxesDir, { recursive: true, mode: 0o711 });
      await runHostCommand(['mount', '--bind', this.hostBoxesDir, this.boxesDir]);
    }
  }

  private boxDir(boxId: string): string {
    return join(this.boxesDir, boxId);
  }

  /**
   * Host paths of a box's disk state under the data dir itself (not the /run bind crun may see),
   * so callers can rename between them and other directories of the data dir.
   */
  boxHostPaths(boxId: string): BoxHostPaths {
    checkBoxId(boxId);
    const dir = join(this.hostBoxesDir, boxId);
    const rec = this.recordSync(boxId);
    const idRange = rec?.idRange ?? this.imageIdRange;
    const data = rec?.disk ? join(dir, DISK_LINK) : dir;
    return {
      dir,
      rootUpper: join(data, 'upper'),
      workspace: join(data, 'volume/workspace'),
      owner: { uid: idRange.hostId, gid: idRange.hostId },
      idRange,
      imageIdRange: { ...this.imageIdRange },
    };
  }

  /** Ids of the disks boxes on this data dir hold (the pool removes every other). */
  private async disksInUse(): Promise<Set<string>> {
    const ids = new Set<string>();
    for (const name of await readdir(this.boxesDir).catch(() => [] as string[])) {
      if (!BOX_ID.test(name)) continue;
      const id = (await this.readRecord(name))?.disk?.id;
      if (id) ids.add(id);
    }
    return ids;
  }

  /**
   * The disks directory as box root can reach it: like the boxes directory, a bind under /run when
   * the data dir is not searchable by others. Mounts are made on that path, so the box's `disk`
   * symlink (absolute) leads to them from either view of the box directory.
   */
  private async prepareDisksDir(): Promise<void> {
    await mkdir(this.hostDisksDir, { recursive: true, mode: 0o711 });
    await chmod(this.hostDisksDir, 0o711);
    if (this.disks.dir !== this.hostDisksDir && !isMountPoint(this.disks.dir)) {
      await mkdir(this.disks.dir, { recursive: true, mode: 0o711 });
      await runHostCommand(['mount', '--bind', this.hostDisksDir, this.disks.dir]);
    }
  }

  private async unexposeDisksDir(): Promise<void> {
    if (this.disks.dir === this.hostDisksDir) return;
    // A box's disk still mounted under it keeps it busy: it stays, with the disks it shows.
    for (let i = 0; i < 64 && isMountPoint(this.disks.dir); i++) {
      if ((await runHostCommandRaw(['umount', this.disks.dir])).code !== 0) return;
    }
    await rmdir(this.disks.dir).catch(() => undefined);
  }

  /** A path under /run for a data dir directory box root must reach (see exposedBoxesDir), or the directory itself. */
  private exposedDir(hostDir: string, kind: string): string {
    if (this.boxesDir === this.hostBoxesDir) return hostDir;
    const hash = createHash('sha256').update(resolve(hostDir)).digest('hex').slice(0, 16);
    return `/run/devyard/${kind}-${hash}`;
  }

  /** The box's record, read synchronously when it is not cached (undefined when there is none). */
  private recordSync(boxId: string): BoxRecord | undefined {
    let rec = this.records.get(boxId);
    if (!rec) {
      try {
        rec = JSON.parse(readFileSync(join(this.boxDir(boxId), 'box.json'), 'utf8')) as BoxRecord;
      } catch {}
    }
    return rec;
  }

  /** Host uid/gid of the box's root. */
  private async boxOwner(boxId: string): Promise<{ uid: number; gid: number }> {
    const range = (await this.readRecord(boxId))?.idRange ?? this.imageIdRange;
    return { uid: range.hostId, gid: range.hostId };
  }

  /** The helper that makes idmapped mounts, compiled on first use. */
  private idmapMountHelper(): Promise<string> {
    this.idmapHelper ??= ensureIdmapMountHelper(join(this.dataDir, 'helpers')).catch((err: unknown) => {
      this.idmapHelper = undefined;
      throw err;
    });
    return this.idmapHelper;
  }

  /**
   * Gives a box made before boxes had ranges of their own a range, moving its disk state's
   * ownership from the image range into it (the box is stopped: called before it starts); makes
   * sure the registry still knows the range of any other box.
   */
  private async ensureOwnIdRange(rec: BoxRecord): Promise<BoxRecord> {
    const owner = join(this.hostBoxesDir, rec.boxId);
    if (rec.idRange) {
      if (!(await this.idRanges.confirm(rec.idRange, owner))) {
        throw new SandboxError('ID_RANGE_CONFLICT', `box ${rec.boxId}: its host id range ${rec.idRange.hostId} is held by ${await this.idRanges.holder(rec.idRange)}`);
      }
      return rec;
    }
    const idRange = await this.idRanges.allocate(owner);
    const dir = this.boxDir(rec.boxId);
    const t0 = performance.now();
    for (const sub of [join(dataRoot(dir, rec), 'upper'), join(dataRoot(dir, rec), 'volume'), join(dir, 'etc')]) {
      if (existsSync(sub)) await shiftTreeIds(sub, this.imageIdRange, idRange);
    }
    const next = { ...rec, idRange };
    await this.writeRecord(next);
    this.log('sandbox: box moved to its own id range', { boxId: rec.boxId, hostId: idRange.hostId, ms: Math.round(performance.now() - t0) });
    return next;
  }

  private async writeRecord(rec: BoxRecord): Promise<void> {
    const dir = this.boxDir(rec.boxId);
    const tmp = join(dir, `.box.json.${process.pid}`);
    await writeFile(tmp, JSON.stringify(rec, null, 2));
    await rename(tmp, join(dir, 'box.json'));
    this.records.set(rec.boxId, rec);
  }

  /** crun keeps a directory per container: a cheap check before spawning `crun state`. */
  private hasRuntime(boxId: string): boolean {
    return existsSync(join(this.crun.stateRoot, boxId));
  }

  private async crunState(boxId: string) {
    if (!this.hasRuntime(boxId)) return null;
    return this.crun.state(boxId);
  }

  private ociSpec(rec: BoxRecord, netnsPath: string, secretsSource?: string): Record<string, unknown> {
    const dir = this.boxDir(rec.boxId);
    const data = dataRoot(dir, rec);
    return buildOciSpec({
      rootfs: join(dir, 'merged'),
      hostname: rec.name,
      args: [BUSYBOX_IN_BOX, 'sh', '-c', INIT_SCRIPT],
      env: Object.entries({ HOME: '/root', ...rec.env, PATH: withBoxTools(rec.env.PATH) }).map(([k, v]) => `${k}=${v}`),
      resources: rec.resources,
      cgroupsPath: this.cgroups.cgroupsPath(rec.boxId),
      netnsPath,
      idRange: rec.idRange ?? this.imageIdRange,
      sysfsSource: join(dir, 'sys'),
      binds: [
        { source: this.busyboxPath, destination: BUSYBOX_IN_BOX, readonly: true },
        ...(this.toolsSource ? [{ source: this.toolsSource, destination: BOX_TOOLS_DIR, readonly: true }] : []),
        {
          source: rec.workspaceBase ? join(dir, WORKSPACE_MERGED) : join(data, 'volume/workspace'),
          destination: '/workspace',
          readonly: false,
        },
        { source: join(data, 'volume/home'), destination: '/root', readonly: false },
        { source: join(dir, 'etc/hosts'), destination: '/etc/hosts', readonly: false },
        { source: join(dir, 'etc/hostname'), destination: '/etc/hostname', readonly: false },
        { source: join(dir, 'etc/resolv.conf'), destination: '/etc/resolv.conf', readonly: false },
        ...(secretsSource ? [{ source: secretsSource, destination: BOX_SECRETS_MOUNT, readonly: true }] : []),
      ],
    });
  }

  private async createLocked(spec: BoxRuntimeSpec): Promise<BoxRecord> {
    const dir = this.boxDir(spec.boxId);
    const existing = await this.readRecord(spec.boxId);
    if (existing && existing.imageRootfs === spec.imageRootfs && sameSpec(existing, spec)) return existing;
    let idRange = existing ? existing.idRange : undefined;
    // The disk size is the one the box was made with (growing or shrinking it is not supported).
    let disk = existing?.disk;
    if (existing && (existing.disk?.bytes ?? 0) !== (spec.resources.diskBytes ?? 0)) {
      this.log('sandbox: disk size change ignored; a box keeps the disk it was made with', { boxId: spec.boxId, disk: existing.disk?.bytes ?? null, asked: spec.resources.diskBytes ?? null });
    }
    if (!existing) {
      await this.prepareBoxesDir();
      idRange = await this.idRanges.allocate(join(this.hostBoxesDir, spec.boxId));
      try {
        if (spec.resources.diskBytes) {
          await this.prepareDisksDir();
          disk = { bytes: spec.resources.diskBytes, id: await this.disks.take(spec.resources.diskBytes) };
        }
        await this.makeBoxDirs(dir, idRange.hostId, disk);
      } catch (err) {
        if (disk) await this.disks.remove(disk.id);
        await rm(dir, { recursive: true, force: true });
        await this.idRanges.free(idRange, join(this.hostBoxesDir, spec.boxId));
        throw err;
      }
    }
    if (spec.workspaceBase) {
      // Only boxes with a workspace base get these, so plain boxes keep exactly their old layout.
      await mkdir(join(dataRoot(dir, { disk }), WORKSPACE_WORK), { recursive: true, mode: 0o700 });
      await mkdir(join(dir, WORKSPACE_MERGED), { recursive: true, mode: 0o755 });
    }
    const ip = existing?.ip ?? (await this.allocateIp(spec.boxId));
    const rec: BoxRecord = {
      boxId: spec.boxId,
      name: spec.name,
      imageRootfs: spec.imageRootfs,
      imageDigest: spec.imageDigest,
      resources: spec.resources,
      env: spec.env,
      ...(spec.layers?.length ? { layers: [...spec.layers] } : {}),
      ...(spec.workspaceBase ? { workspaceBase: spec.workspaceBase } : {}),
      ip,
      ...(idRange ? { idRange } : {}),
      ...(disk ? { disk } : {}),
      createdAt: existing?.createdAt ?? new Date().toISOString(),
    };
    await this.writeRecord(rec);
    return rec;
  }

  /**
   * A new box's directories (and its own filesystem when it has a disk size): everything box root
   * writes to belongs to its range (root = its first id).
   */
  private async makeBoxDirs(dir: string, root: number, disk: BoxRecord['disk'] | undefined): Promise<void> {
    await mkdir(dir, { recursive: true, mode: 0o711 });
    for (const sub of ['merged', 'sys', 'etc']) await mkdir(join(dir, sub), { recursive: true });
    if (disk) {
      // A link left by a create that crashed before it wrote the record points at a disk now gone.
      await rm(join(dir, DISK_LINK), { force: true });
      await symlink(this.disks.mountPoint(disk.id), join(dir, DISK_LINK));
    }
    const data = dataRoot(dir, { disk });
    for (const sub of ['work', 'volume']) await mkdir(join(data, sub), { recursive: true });
    // The overlay's root directory takes the upper's owner and mode: box root must own it.
    for (const [sub, mode] of [
      ['upper', 0o755],
      ['volume/workspace', 0o755],
      ['volume/home', 0o700],
    ] as const) {
      await mkdir(join(data, sub), { recursive: true });
      await chown(join(data, sub), root, root);
      await chmod(join(data, sub), mode);
    }
    for (const f of ['hosts', 'hostname', 'resolv.conf']) {
      await writeFile(join(dir, 'etc', f), '');
      await chown(join(dir, 'etc', f), root, root);
    }
  }

  /** Picks the lowest free address; serialized so two creates never take the same one. */
  private allocateIp(boxId: string): Promise<string> {
    const next = this.allocLock.then(async () => {
      const used: string[] = [];
      let names: string[] = [];
      try {
        names = await readdir(this.boxesDir);
      } catch {
        names = [];
      }
      for (const id of names) {
        if (id === boxId) continue;
        const rec = await this.readRecord(id);
        if (rec) used.push(rec.ip);
      }
      for (const rec of this.records.values()) if (rec.boxId !== boxId) used.push(rec.ip);
      return allocateAddress(this.network.subnet, used);
    });
    this.allocLock = next.catch(() => {});
    return next;
  }

  private async readRecord(boxId: string): Promise<BoxRecord | undefined> {
    const cached = this.records.get(boxId);
    if (cached) return cached;
    try {
      const rec = JSON.parse(await readFile(join(this.boxDir(boxId), 'box.json'), 'utf8')) as BoxRecord;
      this.records.set(boxId, rec);
      return rec;
    } catch {
      return undefined;
    }
  }

  /**
   * Ends the box's processes and frees everything but its disk state: SIGTERM to every process
   * but init, up to `graceMs` for them to exit, SIGKILL to what is left, `crun delete`, then the
   * network namespace and any cgroup directory left over.
   */
  private async releaseRuntime(boxId: string, graceMs: number): Promise<void> {
    const t0 = performance.now();
    const dialer = this.dialers.get(boxId);
    if (dialer) {
      this.dialers.delete(boxId);
      await dialer.close();
    }
    if (this.hasRuntime(boxId)) {
      const st = await this.crun.state(boxId);
      if (await this.cgroups.isFrozen(boxId)) await this.cgroups.thaw(boxId);
      const initPid = st?.pid ?? 0;
      if (graceMs > 0) {
        // Init's own idle sleep is restarted by init at once: it is not a process to wait for.
        const userProcs = async () =>
          (await this.cgroups.procs(boxId)).filter((p) => p !== initPid && !isInitSleeper(p));
        for (const pid of await userProcs()) tryKill(pid, 'SIGTERM');
        const deadline = Date.now() + graceMs;
        while (Date.now() < deadline && (await userProcs()).length > 0) await sleep(10);
        if (initPid) tryKill(initPid, 'SIGTERM');
      }
      for (let i = 0; i < 100; i++) {
        const left = await this.cgroups.procs(boxId);
        if (left.length === 0) break;
        for (const pid of left) tryKill(pid, 'SIGKILL');
        await sleep(5);
      }
      await this.crun.delete(boxId);
      if (this.hasRuntime(boxId)) throw new Error(`crun delete ${boxId} left its state behind`);
    }
    await this.network.detach(boxId);
    await this.cgroups.removeBox(boxId);
    this.log('sandbox: released', { boxId, ms: Math.round(performance.now() - t0) });
  }

  private withLock<T>(boxId: string, fn: () => Promise<T>): Promise<T> {
    const prev = this.locks.get(boxId) ?? Promise.resolve();
    const next = prev.then(fn, fn);
    const settled = next.catch(() => {});
    this.locks.set(boxId, settled);
    void settled.then(() => {
      if (this.locks.get(boxId) === settled) this.locks.delete(boxId);
    });
    return next;
  }
}

/** Where the box's upper, work and volume directories are: its own disk, or the box directory. */
function dataRoot(dir: string, rec: Pick<BoxRecord, 'disk'>): string {
  return rec.disk ? join(dir, DISK_LINK) : dir;
}

/** A PATH set by a template or session still finds the bundled tools, after its own directories. */
function withBoxTools(path: string | undefined): string {
  if (!path) return BOX_DEFAULT_PATH;
  return path.split(':').includes(BOX_TOOLS_BIN) ? path : `${path}:${BOX_TOOLS_BIN}`;
}

function sameSpec(rec: BoxRecord, spec: BoxRuntimeSpec): boolean {
  return (
    rec.name === spec.name &&
    rec.imageDigest === spec.imageDigest &&
    JSON.stringify(rec.resources) === JSON.stringify(spec.resources) &&
    JSON.stringify(rec.env) === JSON.stringify(spec.env) &&
    JSON.stringify(rec.layers ?? []) === JSON.stringify(spec.layers ?? []) &&
    (rec.workspaceBase ?? '') === (spec.workspaceBase ?? '')
  );
}

/**
 * Layer paths go into overlay mount options, where commas and colons separate entries; a relative
 * path would resolve against whatever directory the mount helper runs in.
 */
function checkLayers(spec: BoxRuntimeSpec): void {
  for (const p of [...(spec.layers ?? []), ...(spec.workspaceBase ? [spec.workspaceBase] : [])]) {
    if (!p.startsWith('/') || /[,:\s\\]/.test(p)) {
      throw new SandboxError('INVALID_SPEC', `layer path must be absolute, without commas, colons, spaces or backslashes: ${p}`);
    }
    if (!existsSync(p)) throw new SandboxError('INVALID_SPEC', `layer directory does not exist: ${p}`);
  }
}

function checkBoxId(boxId: string): void {
  if (!BOX_ID.test(boxId)) throw new SandboxError('INVALID_BOX_ID', `invalid box id: ${boxId}`);
}

function findBusybox(): string {
  for (const p of ['/usr/bin/busybox', '/bin/busybox', '/usr/sbin/busybox']) {
    if (existsSync(p)) return realpathSync(p);
  }
  throw new Error('busybox (static) not found on the host: install busybox-static');
}

function isInitSleeper(pid: number): boolean {
  try {
    return readFileSync(`/proc/${pid}/cmdline`, 'utf8') === `${BUSYBOX_IN_BOX}\0sleep\0${INIT_SLEEP}\0`;
  } catch {
    return false;
  }
}

function tryKill(pid: number, signal: NodeJS.Signals): void {
  try {
    process.kill(pid, signal);
  } catch {
    // Already gone.
  }
}

async function hostMountsUnder(dir: string): Promise<string[]> {
  const text = await readFile('/proc/self/mounts', 'utf8');
  return text
    .split('\n')
    .map((l) => l.split(' ')[1] ?? '')
    .map((p) => p.replace(/\\([0-7]{3})/g, (_, o: string) => String.fromCharCode(parseInt(o, 8))))
    .filter((p) => p === dir || p.startsWith(`${dir}/`))
    .sort((a, b) => b.length - a.length);
}

function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}

/**
 * crun sets up the box's mounts from inside its user namespace, as the box's unprivileged root,
 * so every ancestor of a path it mounts must be searchable by others. A data dir under /root or a
 * 0700 temp dir is not: then the boxes directory is bind-mounted at a fixed place under /run,
 * rather than opening up the user's directories.
 */
export function exposedBoxesDir(dataDir: string, hostBoxesDir: string): string {
  let dir = resolve(dataDir);
  for (;;) {
    try {
      if ((statSync(dir).mode & 0o001) === 0 && dir !== resolve(dataDir)) {
        const hash = createHash('sha256').update(resolve(hostBoxesDir)).digest('hex').slice(0, 16);
        return `/run/devyard/sandbox-${hash}`;
      }
    } catch {}
    const parent = dirname(dir);
    if (parent === dir) return hostBoxesDir;
    dir = parent;
  }
}

function isMountPoint(path: string): boolean {
  const escaped = path.replace(/ /g, '\\040');
  return readFileSync('/proc/self/mountinfo', 'utf8')
    .split('\n')
    .some((l) => l.split(' ')[4] === escaped);
}
