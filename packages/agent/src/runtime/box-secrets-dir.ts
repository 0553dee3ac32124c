/**
 * A box's secrets on the host: one directory per box on a tmpfs (`/run/devyard/secrets/<boxId>`),
 * which the runtime binds read-only into the box at `/run/devyard/secrets`. Values live in memory
 * only: never on a disk, in the box's layers or volumes, or in the agent's state file. Shared by
 * the runtimes (drivers share the secrets code).
 *
 * Layout (the scheme Kubernetes uses for secret volumes), so a change of the set is one atomic
 * step for readers in the box:
 *
 *   <boxId>/..<stamp>/NAME    the values of one version of the set (files 0400, dir 0500)
 *   <boxId>/..data            symlink → ..<stamp>, swapped by rename(2)
 *   <boxId>/NAME              symlink → ..data/NAME, one per secret
 *
 * The symlinks are relative, so they resolve inside the box as well. Everything belongs to the
 * box's root (the host uid the driver maps box root to) and nobody else may read it.
 */
import { randomBytes } from 'node:crypto';
import { existsSync, readFileSync, statfsSync } from 'node:fs';
import { chmod, chown, lchown, lstat, mkdir, readdir, readFile, rename, rm, rmdir, symlink, unlink, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { runHostCommandRaw } from '../network/host-command-runner.js';

/** Where a box sees its secrets. */
/** Device name of the secrets tmpfs in /proc/mounts, so teardown knows it is ours. */
const TMPFS_SOURCE = 'devyard-secrets';

export const BOX_SECRETS_MOUNT = '/run/devyard/secrets';
/** Host directory holding every box's secrets directory (a tmpfs). */
export const DEFAULT_SECRETS_ROOT = '/run/devyard/secrets';

const TMPFS_MAGIC = 0x01021994;
const NAME = /^[A-Z_][A-Z0-9_]{0,127}$/;
const BOX_ID = /^[a-z0-9_]{1,40}$/;
const DATA_LINK = '..data';

/** One secret as a box gets it. */
export interface BoxSecretValue {
  /** Environment-variable style name: the file name and the variable name. */
  name: string;
  /** The value (UTF-8 text). */
  value: string;
}

export interface BoxSecretsDirOptions {
  /** Host directory of the per-box directories (default /run/devyard/secrets); a tmpfs is mounted there unless it is on one. */
  root?: string;
  /** Host uid/gid of box root: the owner of a box's secrets (per box where boxes have ranges of their own). */
  owner: SecretsOwner | ((boxId: string) => SecretsOwner | Promise<SecretsOwner>);
  log?: (msg: string, fields?: object) => void;
}

/** Host uid/gid a box's secrets belong to. */
export interface SecretsOwner {
  /** Host uid. */
  uid: number;
  /** Host gid. */
  gid: number;
}

export class BoxSecretsDir {
  /** Host directory of the per-box directories. */
  readonly root: string;
  private readonly owner: BoxSecretsDirOptions['owner'];
  private readonly log: (msg: string, fields?: object) => void;
  private ready: Promise<void> | null = null;
  /** Whether this instance mounted the tmpfs (then teardown may unmount it once empty). */
  private mounted = false;

  constructor(opts: BoxSecretsDirOptions) {
    this.root = opts.root ?? DEFAULT_SECRETS_ROOT;
    if (/[,:\s]/.test(this.root)) throw new Error('secrets root must not contain commas, colons or spaces');
    this.owner = opts.owner;
    this.log = opts.log ?? (() => undefined);
  }

  private async ownerOf(boxId: string): Promise<SecretsOwner> {
    return typeof this.owner === 'function' ? this.owner(boxId) : this.owner;
  }

  /** Host directory of one box's secrets. */
  path(boxId: string): string {
    if (!BOX_ID.test(boxId)) throw new Error(`invalid box id: ${boxId}`);
    return join(this.root, boxId);
  }

  /**
   * Makes sure the root is a tmpfs, mounting one (noswap where the kernel has it) when it is not:
   * on hosts where /run is a plain directory, secrets would otherwise land on a disk. Done on first
   * use, so hosts and tests that never handle a secret get no mount.
   */
  private ensureRoot(): Promise<void> {
    this.ready ??= (async () => {
      await mkdir(this.root, { recursive: true, mode: 0o711 });
      if (statfsSync(this.root).type !== TMPFS_MAGIC) {
        const base = ['mode=0711', 'nosuid', 'nodev', 'noexec', 'size=256m'];
        let r = await runHostCommandRaw(['mount', '-t', 'tmpfs', '-o', [...base, 'noswap'].join(','), TMPFS_SOURCE, this.root]);
        if (r.code !== 0) r = await runHostCommandRaw(['mount', '-t', 'tmpfs', '-o', base.join(','), TMPFS_SOURCE, this.root]);
        if (r.code !== 0) throw new Error(`cannot mount a tmpfs for box secrets at ${this.root}: ${r.stderr.trim()}`);
        this.mounted = true;
        this.log('box secrets: tmpfs mounted', { root: this.root });
      }
      // Box root must traverse it from inside its user namespace (it is "other" here); nobody may list it.
      await chmod(this.root, 0o711);
    })().catch((e: unknown) => {
      this.ready = null;
      throw e;
    });
    return this.ready;
  }

  /** Creates the box's (empty) directory if it is missing, keeping what is in it. */
  async ensure(boxId: string): Promise<string> {
    await this.ensureRoot();
    const dir = this.path(boxId);
    const owner = await this.ownerOf(boxId);
    await mkdir(dir, { recursive: true, mode: 0o700 });
    const st = await lstat(dir);
    if (st.uid !== owner.uid || st.gid !== owner.gid) {
      // Written before the box had its id range (secrets come before the first start): hand them over.
      for (const entry of await readdir(dir, { recursive: true })) await lchown(join(dir, entry), owner.uid, owner.gid);
    }
    await chown(dir, owner.uid, owner.gid);
    await chmod(dir, 0o700);
    return dir;
  }

  /** Replaces the box's whole set of secrets in one atomic step (a secret not in `secrets` disappears). */
  async write(boxId: string, secrets: readonly BoxSecretValue[]): Promise<void> {
    for (const s of secrets) if (!NAME.test(s.name)) throw new Error(`invalid secret name "${s.name}"`);
    // The common case, a box without secrets: an empty directory is the whole answer (no swap).
    if (secrets.length === 0 && (await readdir(this.path(boxId)).catch(() => [])).length === 0) {
      await this.ensure(boxId);
      return;
    }
    const dir = await this.ensure(boxId);
    const { uid, gid } = await this.ownerOf(boxId);
    const version = `..${Date.now().toString(36)}_${randomBytes(4).toString('hex')}`;
    const data = join(dir, version);
    await mkdir(data, { mode: 0o700 });
    for (const s of secrets) {
      const file = join(data, s.name);
      await writeFile(file, s.value, { mode: 0o400, flag: 'wx' });
      await chown(file, uid, gid);
    }
    await chown(data, uid, gid);
    await chmod(data, 0o500);
    // Swap the whole set at once: readers see the old set or the new one, never a mix.
    const tmpLink = join(dir, `..data_tmp_${randomBytes(4).toString('hex')}`);
    await symlink(version, tmpLink);
    await lchown(tmpLink, uid, gid);
    await rename(tmpLink, join(dir, DATA_LINK));
    const wanted = new Set(secrets.map((s) => s.name));
    for (const entry of await readdir(dir)) {
      if (entry.startsWith('..')) {
        if (entry !== DATA_LINK && entry !== version) await rm(join(dir, entry), { recursive: true, force: true });
      } else if (!wanted.has(entry)) await unlink(join(dir, entry)).catch(() => undefined);
    }
    for (const name of wanted) {
      const link = join(dir, name);
      if (await isSymlink(link)) continue;
      await rm(link, { force: true });
      await symlink(join(DATA_LINK, name), link);
      await lchown(link, uid, gid);
    }
  }

  /** The box's current secrets as environment variables (empty when it has none). */
  async read(boxId: string): Promise<Record<string, string>> {
    const dir = this.path(boxId);
    const out: Record<string, string> = {};
    let names: string[];
    try {
      names = await readdir(join(dir, DATA_LINK));
    } catch {
      return out;
    }
    for (const name of names.sort()) {
      if (!NAME.test(name)) continue;
      try {
        out[name] = await readFile(join(dir, DATA_LINK, name), 'utf8');
      } catch {}
    }
    return out;
  }

  /** Removes the box's secrets from the host (stop, destroy). */
  async remove(boxId: string): Promise<void> {
    await rm(this.path(boxId), { recursive: true, force: true });
  }

  /**
   * Unmounts the secrets tmpfs once no box has secrets in it (uninstall and tests) — also when an
   * earlier agent process mounted it; a tmpfs someone else mounted there is left alone.
   */
  async teardown(): Promise<void> {
    if (!existsSync(this.root)) return;
    if ((await readdir(this.root)).length > 0) return;
    const ours = readFileSync('/proc/self/mounts', 'utf8')
      .split('\n')
      .some((l) => l.split(' ')[0] === TMPFS_SOURCE && l.split(' ')[1] === this.root);
    if (!this.mounted && !ours) return;
    if (ours) await runHostCommandRaw(['umount', this.root]);
    await rmdir(this.root).catch(() => undefined);
    this.mounted = false;
    this.ready = null;
  }
}

async function isSymlink(p: string): Promise<boolean> {
  try {
    return (await lstat(p)).isSymbolicLink();
  } catch {
    return false;
  }
}
