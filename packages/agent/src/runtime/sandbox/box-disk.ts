/**
 * Sandbox boxes' own disks. A box with a disk size (`resources.diskBytes`) gets a sparse ext4 image
 * of that size, loop-mounted on the host; the box directory's `disk` is a symlink to the mount.
 * Everything the box writes lives there — its root overlay's upper and work directories and its
 * /workspace and /root volumes — so a box that fills it gets ENOSPC inside, and the node's own
 * filesystem only ever holds the image file, which cannot grow past the size it was made with.
 *
 *   <disks dir>/<id>.ext4   the image (0600, host root's)
 *   <disks dir>/<id>/       its mount point, from create until destroy
 *
 * A filesystem per box rather than quotas on a shared one: the host's data directory is plain ext4
 * here, whose quotas overlayfs bypasses (copy-up and writes through the overlay run with the
 * mounter's CAP_SYS_RESOURCE), while a filesystem of its own is full when it is full, whoever
 * writes. No blocks are reserved for root (the agent writes nothing there). The image is sparse:
 * the host pays for what the box stored, up to its size.
 *
 * Mounted on the host rather than only in the box's private namespace: host-side work on a stopped
 * box (repository checkouts, prebuild and recipe captures) sees it at a fixed path, starts do not
 * pay for a mount, and after a reboot the next start mounts it again.
 *
 * mkfs and the loop mount take 50–100 ms here (each `mount` process alone is 15–20 ms on a busy
 * node), more than a third of a box's create → first exec. So disks are made ahead: the pool keeps
 * a formatted, mounted spare of each recently used size, and a create only points the box's
 * symlink at one — no process is started; a new spare is made, at low priority, once the box runs.
 */
import { randomBytes } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { chmod, mkdir, open, readdir, rename, rm } from 'node:fs/promises';
import { join } from 'node:path';
import { runHostCommand, runHostCommandRaw } from '../../network/host-command-runner.js';

/** Smaller disks are made this size: ext4's own structures need room, and a box needs a little. */
export const MIN_BOX_DISK_BYTES = 64 * 1024 ** 2;
const DISK_ID = /^[0-9a-f]{16}$/;
const REFILL_DELAY_MS = 300;

/** Options of {@link BoxDiskPool}. */
export interface BoxDiskPoolOptions {
  /** Directory of the images and their mount points, reachable by box root (see exposedBoxesDir). */
  dir: string;
  /** Spares kept per size (default 2; 0: every disk is made at create). */
  sparesPerSize?: number;
  /** Sizes spares are kept for, the most recently used ones (default 2). */
  sizes?: number;
  /** Structured log sink. */
  log?: (msg: string, fields?: object) => void;
}

/** Makes, mounts and removes box disks, from a spare of the size when one is ready. */
export class BoxDiskPool {
  /** Directory of the images and mount points. */
  readonly dir: string;
  /** Spare disk ids by size, most recently used size last. */
  private readonly ready = new Map<number, string[]>();
  private readonly filling = new Map<number, Promise<void>>();
  /** Sizes whose spare was taken and not yet made again. */
  private readonly wanted = new Set<number>();
  private refillTimer: NodeJS.Timeout | undefined;
  private readonly spares: number;
  private readonly sizes: number;
  private readonly log: (msg: string, fields?: object) => void;

  constructor(opts: BoxDiskPoolOptions) {
    this.dir = opts.dir;
    this.spares = opts.sparesPerSize ?? 2;
    this.sizes = opts.sizes ?? 2;
    this.log = opts.log ?? (() => {});
  }

  /** Mount point of a disk: what a box's `disk` symlink points at. */
  mountPoint(id: string): string {
    if (!DISK_ID.test(id)) throw new Error(`invalid disk id: ${id}`);
    return join(this.dir, id);
  }

  /** A mounted disk of `bytes` for a new box (a spare when one is ready); returns its id. */
  async take(bytes: number): Promise<string> {
    const size = diskSize(bytes);
    const spares = this.ready.get(size) ?? [];
    this.ready.delete(size);
    this.ready.set(size, spares);
    if (this.spares > 0) this.wanted.add(size);
    for (let id = spares.shift(); id !== undefined; id = spares.shift()) {
      if (isMountPoint(this.mountPoint(id))) return id;
      await this.remove(id);
    }
    return this.make(size, false);
  }

  /** Mounts the disk unless it is (after a reboot); idempotent. */
  async ensureMounted(id: string): Promise<void> {
    const at = this.mountPoint(id);
    if (isMountPoint(at)) return;
    await mkdir(at, { recursive: true, mode: 0o711 });
    await mountImage(this.image(id), at, false);
  }

  /** Unmounts the disk (lazily when something still holds it) and deletes it; idempotent. */
  async remove(id: string): Promise<void> {
    const at = this.mountPoint(id);
    for (let i = 0; i < 8 && isMountPoint(at); i++) {
      const r = await runHostCommandRaw(['umount', at]);
      if (r.code !== 0) await runHostCommandRaw(['umount', '-l', at]);
    }
    await rm(at, { recursive: true, force: true });
    await rm(this.image(id), { force: true });
  }

  /**
   * Makes the spares taken since the last call, in the background, a moment from now: right after a
   * start the box's first exec is still to come, and on a busy node mkfs would slow it down.
   */
  refillTaken(): void {
    if (this.wanted.size === 0 || this.refillTimer) return;
    this.refillTimer = setTimeout(() => {
      this.refillTimer = undefined;
      for (const size of this.wanted) this.refill(size);
      this.wanted.clear();
    }, REFILL_DELAY_MS);
    this.refillTimer.unref();
  }

  /** Removes every disk but those in `keep` (the boxes'): spares, and what a crashed process left. */
  async clear(keep: ReadonlySet<string>): Promise<void> {
    clearTimeout(this.refillTimer);
    this.refillTimer = undefined;
    await Promise.all([...this.filling.values()].map((p) => p.catch(() => undefined)));
    this.ready.clear();
    this.wanted.clear();
    const ids = new Set<string>();
    for (const name of await readdir(this.dir).catch(() => [] as string[])) {
      const id = name.replace(/\.ext4(\.tmp-\d+)?$/, '');
      if (DISK_ID.test(id) && !keep.has(id)) ids.add(id);
    }
    for (const id of ids) {
      await this.remove(id);
      for (const name of await readdir(this.dir).catch(() => [] as string[])) {
        if (name.startsWith(`${id}.ext4.tmp-`)) await rm(join(this.dir, name), { force: true });
      }
    }
  }

  private image(id: string): string {
    return `${this.mountPoint(id)}.ext4`;
  }

  /** A new disk, formatted and mounted; `background` lowers its CPU and I/O priority. */
  private async make(size: number, background: boolean): Promise<string> {
    const id = randomBytes(8).toString('hex');
    const file = this.image(id);
    const tmp = `${file}.tmp-${process.pid}`;
    try {
      await mkdir(this.mountPoint(id), { recursive: true, mode: 0o711 });
      const fh = await open(tmp, 'w', 0o600);
      try {
        await fh.truncate(size);
      } finally {
        await fh.close();
      }
      // Lazy init: inode tables and the journal are zeroed in the background, not here.
      const mkfs = ['mkfs.ext4', '-q', '-F', '-m', '0', '-L', 'devyard-box', '-E', 'lazy_itable_init=1,lazy_journal_init=1,nodiscard,root_owner=0:0', tmp];
      // host-programs: nice mkfs.ext4
      await runHostCommand(background ? ['nice', '-n', '19', ...mkfs] : mkfs);
      await rename(tmp, file);
      await mountImage(file, this.mountPoint(id), background);
      return id;
    } catch (err) {
      await rm(tmp, { force: true });
      await this.remove(id).catch(() => undefined);
      throw err;
    }
  }

  private refill(size: number): void {
    if (this.spares === 0 || this.filling.has(size)) return;
    const job = (async () => {
      while ((this.ready.get(size)?.length ?? 0) < this.spares && this.ready.has(size)) {
        const id = await this.make(size, true);
        const list = this.ready.get(size);
        if (list) list.push(id);
        else await this.remove(id);
      }
      // Sizes beyond the most recent few give their spares back.
      while (this.ready.size > this.sizes) {
        const [oldest, ids] = this.ready.entries().next().value as [number, string[]];
        this.ready.delete(oldest);
        for (const id of ids) await this.remove(id);
      }
    })()
      .catch((err: unknown) => this.log('box disks: no spare made', { size, error: (err as Error).message }))
      .finally(() => this.filling.delete(size));
    this.filling.set(size, job);
  }
}

/** Mounts an image; `loop` sets autoclear, so the loop device goes away with the last unmount. */
async function mountImage(file: string, at: string, background: boolean): Promise<void> {
  const mount = ['mount', '-o', 'loop,nodev,nosuid,noatime', file, at];
  // host-programs: nice mount
  await runHostCommand(background ? ['nice', '-n', '19', ...mount] : mount);
  // Box root reaches its volumes from inside its user namespace, as "other" to host root.
  await chmod(at, 0o711);
}

/** The size a disk of `bytes` is made with. */
function diskSize(bytes: number): number {
  return Math.max(Math.floor(bytes / 4096) * 4096, MIN_BOX_DISK_BYTES);
}

/** Whether `path` is a mount point in this mount namespace. */
export function isMountPoint(path: string): boolean {
  const escaped = path.replace(/ /g, '\\040');
  return readFileSync('/proc/self/mountinfo', 'utf8')
    .split('\n')
    .some((l) => l.split(' ')[4] === escaped);
}
