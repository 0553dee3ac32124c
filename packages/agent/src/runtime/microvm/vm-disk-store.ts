/**
 * The disks of microVMs: one read-only qcow2 base per image digest (an ext4 of the image root,
 * built once, shared by every VM of that image), a qcow2 overlay per box on top of it (the box's
 * root changes), and a raw ext4 workspace volume per box (the user's /workspace and /root; it
 * survives stop/start and is never touched by a failed boot or restore).
 *
 * Image trees on the node are owned by the sandbox's shifted uid range (see builtin-image-store.ts).
 * The base disk must hold the image's own owners (root = 0), so mkfs.ext4 reads the tree from inside
 * a user namespace that maps the shifted range back to 0 — no copy of the tree is made.
 */
import { spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { existsSync } from 'node:fs';
import { chmod, chown, mkdir, open, rename, rm, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { runHostCommand } from '../../network/host-command-runner.js';

/** Smallest virtual size of a box's root disk; an image's own size is doubled when larger. */
const MIN_ROOT_BYTES = 4 * 1024 ** 3;

/** Options of {@link VmDiskStore}. */
export interface VmDiskStoreOptions {
  /** Where base disks live (`<node data>/microvm/base`); the path is stored in every overlay. */
  dir: string;
  /** Host uid/gid that is root in the image trees (the sandbox's id shift), 0 for unshifted trees. */
  uidShift: number;
  /** Size of the shifted range. */
  idRangeSize?: number;
  log?: (msg: string, fields?: object) => void;
}

export class VmDiskStore {
  private readonly building = new Map<string, Promise<string>>();

  constructor(private readonly opts: VmDiskStoreOptions) {}

  /** Path of an image's base disk (whether built or not). */
  basePath(imageDigest: string): string {
    return join(this.opts.dir, `${imageDigest.replace(/^sha256:/, '').slice(0, 32)}.qcow2`);
  }

  /** Returns the image's base disk, building it from the image root first when missing. */
  ensureBase(imageRootfs: string, imageDigest: string): Promise<string> {
    const out = this.basePath(imageDigest);
    if (existsSync(out)) return Promise.resolve(out);
    const inflight = this.building.get(out);
    if (inflight) return inflight;
    const p = this.buildBase(imageRootfs, out).finally(() => this.building.delete(out));
    this.building.set(out, p);
    return p;
  }

  private async buildBase(rootfs: string, out: string): Promise<string> {
    // Root's alone: a base is readable by every VM (see below), but only through their jails.
    await mkdir(this.opts.dir, { recursive: true, mode: 0o700 });
    await chmod(this.opts.dir, 0o700);
    const raw = `${out}.${randomBytes(4).toString('hex')}.raw`;
    const tmp = `${out}.${randomBytes(4).toString('hex')}.tmp`;
    try {
      const used = Number((await runHostCommand(['du', '-sb', rootfs])).split('\t')[0]);
      const size = Math.max(MIN_ROOT_BYTES, Math.ceil((used * 2) / 2 ** 20) * 2 ** 20);
      await writeFile(raw, '');
      await runHostCommand(['truncate', '-s', String(size), raw]);
      this.opts.log?.('building a microVM base disk', { rootfs, sizeBytes: size });
      await this.mkfsFromShiftedTree(rootfs, raw);
      // qcow2 keeps only the written clusters: the base costs what the image holds, not its size.
      await runHostCommand(['qemu-img', 'convert', '-O', 'qcow2', raw, tmp]);
      // Every VM of the image reads it, each as its own uid (inside its jail, which holds this one
      // base file read-only; the directories above it on the host stay root's).
      await chmod(tmp, 0o644);
      await rename(tmp, out);
      return out;
    } finally {
      await rm(raw, { force: true });
      await rm(tmp, { force: true });
    }
  }

  /**
   * mkfs.ext4 -d over a tree owned by the shifted range, run as root of a user namespace mapping
   * that range to 0..size: the filesystem records the image's own owners. A holder process keeps
   * the namespace while the maps are written (by host root, which needs no newuidmap), then
   * `nsenter --setuid 0` runs mkfs inside it with its capabilities intact.
   */
  private async mkfsFromShiftedTree(rootfs: string, raw: string): Promise<void> {
    const shift = this.opts.uidShift;
    if (shift === 0) {
      await runHostCommand(['mkfs.ext4', '-q', '-F', '-d', rootfs, raw]);
      return;
    }
    await chown(raw, shift, shift);
    const holder = spawn('unshare', ['--user', '--', 'sh', '-c', 'echo ready; read _'], { stdio: ['pipe', 'pipe', 'ignore'] });
    try {
      await new Promise<void>((resolve, reject) => {
        holder.once('error', reject);
        holder.once('exit', (code) => reject(new Error(`user namespace holder exited ${code}`)));
        holder.stdout!.once('data', () => resolve());
      });
      const size = this.opts.idRangeSize ?? 65_536;
      await writeFile(`/proc/${holder.pid}/uid_map`, `0 ${shift} ${size}\n`);
      await writeFile(`/proc/${holder.pid}/gid_map`, `0 ${shift} ${size}\n`);
      // mkfs runs as the shifted uid, which may not traverse the data dir's ancestors (a 0700 temp
      // dir): it gets the tree as its working directory and the disk as an inherited descriptor.
      const fd = await open(raw, 'r+');
      try {
        await new Promise<void>((resolve, reject) => {
          const c = spawn('nsenter', [`--user=/proc/${holder.pid}/ns/user`, '--setuid', '0', '--setgid', '0', 'mkfs.ext4', '-q', '-F', '-d', '.', '/proc/self/fd/3'], {
            cwd: rootfs,
            stdio: ['ignore', 'ignore', 'pipe', fd.fd],
          });
          let err = '';
          c.stderr!.on('data', (b: Buffer) => (err += b.toString()));
          c.on('error', reject);
          c.on('close', (code) => (code === 0 ? resolve() : reject(new Error(`mkfs.ext4 of the image root failed (${code}): ${err.trim()}`))));
        });
      } finally {
        await fd.close();
      }
    } finally {
      holder.stdin!.end('\n');
      holder.kill('SIGKILL');
    }
    await chown(raw, 0, 0);
  }

  /** Creates a box's root overlay on its image's base disk (replacing a stale one); readable by root only. */
  async createOverlay(base: string, path: string): Promise<void> {
    const tmp = `${path}.tmp`;
    await runHostCommand(['qemu-img', 'create', '-q', '-f', 'qcow2', '-b', base, '-F', 'qcow2', tmp]);
    await chmod(tmp, 0o600);
    await rename(tmp, path);
  }

  /** Creates an empty ext4 workspace volume of `bytes` (sparse: it costs what is written); readable by root only. */
  async createVolume(path: string, bytes: number): Promise<void> {
    const tmp = `${path}.tmp`;
    await writeFile(tmp, '', { mode: 0o600 });
    await runHostCommand(['truncate', '-s', String(bytes), tmp]);
    await runHostCommand(['mkfs.ext4', '-q', '-F', '-E', 'root_owner=0:0', tmp]);
    await rename(tmp, path);
  }
}

/**
 * The backing file a qcow2 image names in its header (undefined: none, or not a qcow2 image).
 * A box's overlay is one level above its image's base, so this is every file the disk reads.
 */
export async function qcow2BackingFile(path: string): Promise<string | undefined> {
  const fh = await open(path, 'r').catch(() => null);
  if (!fh) return undefined;
  try {
    const head = Buffer.alloc(20);
    const { bytesRead } = await fh.read(head, 0, 20, 0);
    // QFI\xfb, then big-endian: version (4), backing_file_offset (8), backing_file_size (4).
    if (bytesRead < 20 || head.readUInt32BE(0) !== 0x514649fb) return undefined;
    const offset = Number(head.readBigUInt64BE(8));
    const size = head.readUInt32BE(16);
    if (offset === 0 || size === 0 || size > 1023) return undefined;
    const name = Buffer.alloc(size);
    await fh.read(name, 0, size, offset);
    return name.toString('utf8');
  } finally {
    await fh.close();
  }
}
