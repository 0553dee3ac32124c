/**
 * A sandbox box's disk: a sparse ext4 image of the box's disk size (`resources.diskBytes`),
 * loop-mounted on the host at `<box>/disk` from create until destroy. Everything the box writes
 * lives on it — its root overlay's upper and work directories and its /workspace and /root volumes —
 * so a box that fills it gets ENOSPC inside, and the node's own filesystem only ever holds the
 * image file, which cannot grow past the size it was made with.
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
 * mkfs and the loop mount cost about 50 ms, more than a third of a box's create → first exec, so a
 * {@link BoxDiskPool} keeps a formatted, mounted spare of each recently used size: a create takes
 * it with a rename and a `mount --move`, and a new spare is made in the background once the box has
 * started (made during the start, its mkfs would compete with it for the CPU).
 */
import { randomBytes } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { mkdir, open, readdir, rename, rm } from 'node:fs/promises';
import { join } from 'node:path';
import { runHostCommand, runHostCommandRaw } from '../../network/host-command-runner.js';

/** The image file in the box directory. */
export const BOX_DISK_FILE = 'disk.ext4';
/** Its mount point in the box directory. */
export const BOX_DISK_MOUNT = 'disk';
/** Smaller disks are made this size: ext4's own structures need room, and a box needs a little. */
export const MIN_BOX_DISK_BYTES = 64 * 1024 ** 2;

/**
 * Makes the box's filesystem image: sparse, `bytes` long (at least {@link MIN_BOX_DISK_BYTES}).
 * Written under a temporary name and renamed, so a crash never leaves a half-made image in place.
 */
export async function createBoxDisk(file: string, bytes: number): Promise<void> {
  const size = diskSize(bytes);
  const tmp = `${file}.tmp-${process.pid}`;
  try {
    const fh = await open(tmp, 'w', 0o600);
    try {
      await fh.truncate(size);
    } finally {
      await fh.close();
    }
    // Lazy init: inode tables and the journal are zeroed in the background, not at create.
    await runHostCommand([
      'mkfs.ext4', '-q', '-F', '-m', '0', '-L', 'devyard-box',
      '-E', 'lazy_itable_init=1,lazy_journal_init=1,nodiscard,root_owner=0:0',
      tmp,
    ]);
    await rename(tmp, file);
  } catch (err) {
    await rm(tmp, { force: true });
    throw err;
  }
}

/** Mounts the image at `mountPoint` unless it already is (after a reboot, or on create). */
export async function mountBoxDisk(file: string, mountPoint: string): Promise<void> {
  if (isMountPoint(mountPoint)) return;
  // `loop` sets autoclear: the loop device goes away with the last unmount.
  await runHostCommand(['mount', '-o', 'loop,nodev,nosuid,noatime', file, mountPoint]);
}

/** Options of {@link BoxDiskPool}. */
export interface BoxDiskPoolOptions {
  /** Directory of the spares, on the boxes' filesystem and mount (renames and mount moves). */
  dir: string;
  /** Spares kept per size (default 1; 0: every disk is made at create). */
  sparesPerSize?: number;
  /** Sizes kept spares for, the most recently used ones (default 2). */
  sizes?: number;
  /** Structured log sink. */
  log?: (msg: string, fields?: object) => void;
}

interface Spare {
  dir: string;
  file: string;
  mount: string;
}

/** Makes box disks, from a spare of the size when one is ready. */
export class BoxDiskPool {
  private readonly ready = new Map<number, Spare[]>();
  private readonly filling = new Map<number, Promise<void>>();
  /** Sizes whose spare was taken and not yet made again. */
  private readonly wanted = new Set<number>();
  private readonly spares: number;
  private readonly sizes: number;
  private readonly log: (msg: string, fields?: object) => void;

  constructor(private readonly opts: BoxDiskPoolOptions) {
    this.spares = opts.sparesPerSize ?? 1;
    this.sizes = opts.sizes ?? 2;
    this.log = opts.log ?? (() => {});
  }

  /** Gives the box a disk of `bytes` at `file`, mounted at `mountPoint`; true when it was a spare. */
  async provide(file: string, mountPoint: string, bytes: number): Promise<boolean> {
    const size = diskSize(bytes);
    // Most recently used sizes last: the first one is the one to drop.
    const spares = this.ready.get(size) ?? [];
    this.ready.delete(size);
    this.ready.set(size, spares);
    const spare = spares.shift();
    let used = false;
    if (spare) {
      try {
        await rename(spare.file, file);
        await runHostCommand(['mount', '--move', spare.mount, mountPoint]);
        used = true;
      } catch (err) {
        this.log('box disks: spare unusable, making a disk', { error: (err as Error).message });
        await unmountBoxDisk(spare.mount);
        await rm(file, { force: true });
      }
      await rm(spare.dir, { recursive: true, force: true });
    }
    if (!used) {
      await createBoxDisk(file, size);
      await mountBoxDisk(file, mountPoint);
    }
    if (this.spares > 0) this.wanted.add(size);
    return used;
  }

  /** Makes the spares taken since the last call, in the background. */
  refillTaken(): void {
    for (const size of this.wanted) this.refill(size);
    this.wanted.clear();
  }

  /** Unmounts and removes every spare (teardown, and leftovers of an earlier process at init). */
  async clear(): Promise<void> {
    await Promise.all([...this.filling.values()].map((p) => p.catch(() => undefined)));
    this.ready.clear();
    this.wanted.clear();
    for (const name of await readdir(this.opts.dir).catch(() => [] as string[])) {
      await unmountBoxDisk(join(this.opts.dir, name, 'mnt'));
      await rm(join(this.opts.dir, name), { recursive: true, force: true });
    }
    await rm(this.opts.dir, { recursive: true, force: true });
  }

  private refill(size: number): void {
    if (this.spares === 0 || this.filling.has(size)) return;
    const job = (async () => {
      while ((this.ready.get(size)?.length ?? 0) < this.spares && this.ready.has(size)) {
        const dir = join(this.opts.dir, `${size}-${randomBytes(6).toString('hex')}`);
        const spare = { dir, file: join(dir, BOX_DISK_FILE), mount: join(dir, 'mnt') };
        await mkdir(spare.mount, { recursive: true, mode: 0o700 });
        await createBoxDisk(spare.file, size);
        await mountBoxDisk(spare.file, spare.mount);
        const list = this.ready.get(size);
        if (list) list.push(spare);
        else await this.drop([spare]);
      }
      // Sizes beyond the most recent few give their spares back.
      while (this.ready.size > this.sizes) {
        const [oldest, spares] = this.ready.entries().next().value as [number, Spare[]];
        this.ready.delete(oldest);
        await this.drop(spares);
      }
    })()
      .catch((err: unknown) => this.log('box disks: no spare made', { size, error: (err as Error).message }))
      .finally(() => this.filling.delete(size));
    this.filling.set(size, job);
  }

  private async drop(spares: Spare[]): Promise<void> {
    for (const s of spares) {
      await unmountBoxDisk(s.mount);
      await rm(s.dir, { recursive: true, force: true });
    }
  }
}

/** The size a disk of `bytes` is made with. */
function diskSize(bytes: number): number {
  return Math.max(Math.floor(bytes / 4096) * 4096, MIN_BOX_DISK_BYTES);
}

/** Unmounts the box's disk, lazily when something still holds it; idempotent. */
export async function unmountBoxDisk(mountPoint: string): Promise<void> {
  for (let i = 0; i < 8 && isMountPoint(mountPoint); i++) {
    const r = await runHostCommandRaw(['umount', mountPoint]);
    if (r.code !== 0) await runHostCommandRaw(['umount', '-l', mountPoint]);
  }
}

/** Whether `path` is a mount point in this mount namespace. */
export function isMountPoint(path: string): boolean {
  const escaped = path.replace(/ /g, '\\040');
  return readFileSync('/proc/self/mountinfo', 'utf8')
    .split('\n')
    .some((l) => l.split(' ')[4] === escaped);
}
