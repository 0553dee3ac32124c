/**
 * Built-in images (`tiny`: static busybox; `base`: Debian bookworm minbase), built on the node on
 * first use and cached by content digest under `<dataDir>/images/`:
 *   store/<hex>/rootfs      an image root, read-only in use, shared by every box
 *   refs/<name>.json        name → digest of the last build
 *   tmp/<name>-<random>/    builds in progress; renamed into store/ only when complete
 *
 * Building `base` means a debootstrap from the Debian mirror (about a minute). Its cleaned, unshifted
 * result is kept once per host in `<hostCacheDir>/base-<key>-<time>/rootfs` (default
 * /var/cache/devyard/images), like the microVM assets: another data dir of the host (a second
 * agent, a fresh `devyard up`) copies it instead of bootstrapping again, until it is a week old and
 * a new bootstrap brings the mirror's updates.
 *
 * Box root runs as an unprivileged host uid range (user namespace), so every file of the stored
 * tree is owned by uid/gid + `uidShift` (chown at build time; modes re-applied afterwards because
 * chown clears setuid/setgid bits). Idmapped mounts would avoid the copy-time shift, but crun 1.8
 * cannot idmap the overlay root, so a shifted tree is what works here.
 */
import { createHash, randomBytes } from 'node:crypto';
import { copyFile, chmod, lchown, lstat, mkdir, readdir, readFile, rename, rm, symlink, writeFile } from 'node:fs/promises';
import { existsSync, readFileSync } from 'node:fs';
import { spawn } from 'node:child_process';
import { join } from 'node:path';
import { runHostCommand } from '../network/host-command-runner.js';
import { explainSpawnError } from '../network/host-program-missing.js';
import { treeDigest } from './tree-digest.js';

/** Names of the images this store can build. */
export type BuiltinImageName = 'tiny' | 'base';

/** An image ready to use. */
export interface BuiltImage {
  /** Image name. */
  name: string;
  /** Content digest (`sha256:…`). */
  digest: string;
  /** Root filesystem directory (read-only use). */
  rootfs: string;
}

/** Options of {@link BuiltinImageStore}. */
export interface BuiltinImageStoreOptions {
  /** Node data directory; images go under `<dataDir>/images`. */
  dataDir: string;
  /** Ownership offset matching the sandbox's user namespace mapping (default 100000). */
  uidShift?: number;
  /** Busybox binary copied into `tiny` (default: the host's static busybox). */
  busyboxPath?: string;
  /** Debian mirror for `base` (default: from the host's apt sources). */
  debianMirror?: string;
  /** Host-wide cache of the `base` bootstrap, shared by every data dir (default /var/cache/devyard/images). */
  hostCacheDir?: string;
  /** How old a cached bootstrap may be before a build bootstraps afresh (default 7 days). */
  bootstrapMaxAgeMs?: number;
  /** Structured log sink. */
  log?: (msg: string, fields?: object) => void;
}

/** Where a host keeps its `base` bootstrap unless told otherwise. */
export const DEFAULT_IMAGES_HOST_CACHE_DIR = '/var/cache/devyard/images';
const DEBOOTSTRAP_ARGS = ['--variant=minbase', '--include=bash,git,curl,ca-certificates,procps', 'bookworm'];

const KNOWN: BuiltinImageName[] = ['tiny', 'base'];
/** Bootstraps under way in this process, by cache directory and key. */
const bootstrapsInFlight = new Map<string, Promise<{ dir: string; builtAt: number }>>();

/** Builds and caches the built-in images. */
export class BuiltinImageStore {
  private readonly root: string;
  private readonly uidShift: number;
  private readonly log: (msg: string, fields?: object) => void;
  private readonly building = new Map<string, Promise<BuiltImage>>();

  constructor(private readonly opts: BuiltinImageStoreOptions) {
    this.root = join(opts.dataDir, 'images');
    this.uidShift = opts.uidShift ?? 100_000;
    this.log = opts.log ?? (() => {});
  }

  /** Names this store can build. */
  knownImages(): string[] {
    return [...KNOWN];
  }

  /** Returns the cached image, building it first when missing. */
  ensure(name: BuiltinImageName, onProgress?: (line: string) => void): Promise<BuiltImage> {
    if (!KNOWN.includes(name)) return Promise.reject(new Error(`unknown built-in image: ${name}`));
    const inflight = this.building.get(name);
    if (inflight) return inflight;
    const p = this.ensureUncached(name, onProgress).finally(() => this.building.delete(name));
    this.building.set(name, p);
    return p;
  }

  /** Images present in the cache. */
  async list(): Promise<Array<{ name: string; digest: string }>> {
    const out: Array<{ name: string; digest: string }> = [];
    for (const name of KNOWN) {
      const ref = await this.readRef(name);
      if (ref) out.push({ name, digest: ref.digest });
    }
    return out;
  }

  private rootfsOf(digest: string): string {
    return join(this.root, 'store', digest.replace(/^sha256:/, ''), 'rootfs');
  }

  private async readRef(name: string): Promise<BuiltImage | undefined> {
    try {
      const ref = JSON.parse(await readFile(join(this.root, 'refs', `${name}.json`), 'utf8')) as { digest: string };
      const rootfs = this.rootfsOf(ref.digest);
      // The store entry appears by rename only when complete; a ref without it is stale.
      if (!existsSync(rootfs)) return undefined;
      return { name, digest: ref.digest, rootfs };
    } catch {
      return undefined;
    }
  }

  private async ensureUncached(name: BuiltinImageName, onProgress?: (line: string) => void): Promise<BuiltImage> {
    const cached = await this.readRef(name);
    if (cached) return cached;
    const progress = onProgress ?? (() => {});
    const t0 = Date.now();
    await mkdir(join(this.root, 'tmp'), { recursive: true });
    await mkdir(join(this.root, 'store'), { recursive: true });
    await mkdir(join(this.root, 'refs'), { recursive: true });
    const tmp = join(this.root, 'tmp', `${name}-${randomBytes(6).toString('hex')}`);
    const rootfs = join(tmp, 'rootfs');
    try {
      await mkdir(rootfs, { recursive: true, mode: 0o755 });
      if (name === 'tiny') await this.buildTiny(rootfs, progress);
      else await this.buildBase(rootfs, progress);
      progress('shifting ownership for the box user namespace');
      await shiftOwnership(rootfs, this.uidShift);
      progress('computing digest');
      const digest = await treeDigest(rootfs);
      const final = join(this.root, 'store', digest.replace(/^sha256:/, ''));
      try {
        await rename(tmp, final);
      } catch (err) {
        const code = (err as NodeJS.ErrnoException).code;
        // Someone else completed the same content first: theirs is as good as ours.
        if (code !== 'ENOTEMPTY' && code !== 'EEXIST') throw err;
        await rm(tmp, { recursive: true, force: true });
      }
      const refTmp = join(this.root, 'refs', `.${name}.${randomBytes(4).toString('hex')}`);
      await writeFile(refTmp, JSON.stringify({ name, digest, builtAt: new Date().toISOString() }));
      await rename(refTmp, join(this.root, 'refs', `${name}.json`));
      this.log('images: built', { name, digest, ms: Date.now() - t0 });
      progress(`built ${name} ${digest}`);
      return { name, digest, rootfs: this.rootfsOf(digest) };
    } catch (err) {
      await rm(tmp, { recursive: true, force: true });
      throw err;
    }
  }

  private async buildTiny(rootfs: string, progress: (line: string) => void): Promise<void> {
    progress('tiny: installing busybox');
    for (const d of ['bin', 'sbin', 'usr/bin', 'usr/sbin', 'etc', 'root', 'workspace', 'dev', 'proc', 'sys', 'run', 'var', '.devyard']) {
      await mkdir(join(rootfs, d), { recursive: true, mode: 0o755 });
    }
    await mkdir(join(rootfs, 'tmp'));
    await chmod(join(rootfs, 'tmp'), 0o1777);
    await chmod(join(rootfs, 'root'), 0o700);
    const busybox = this.opts.busyboxPath ?? ['/usr/bin/busybox', '/bin/busybox'].find((p) => existsSync(p));
    if (!busybox) throw new Error('busybox not found on the host: install busybox-static');
    await copyFile(busybox, join(rootfs, 'bin/busybox'));
    await chmod(join(rootfs, 'bin/busybox'), 0o755);
    // `busybox --list-full` gives each applet's canonical location (bin/sh, usr/bin/wget, …).
    // host-programs: busybox
    const list = await capture(busybox, ['--list-full']);
    for (const applet of list.split('\n').filter(Boolean)) {
      if (applet === 'bin/busybox') continue;
      // Absolute links resolve inside the box's root.
      if (!existsSync(join(rootfs, applet))) await symlink('/bin/busybox', join(rootfs, applet));
    }
    await writeFile(join(rootfs, 'etc/passwd'), 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n');
    await writeFile(join(rootfs, 'etc/group'), 'root:x:0:\ntty:x:5:\nnogroup:x:65534:\n');
    // Bind-mount targets of the sandbox, present so crun never writes them into a box's upper.
    for (const f of ['etc/hosts', 'etc/hostname', 'etc/resolv.conf', '.devyard/busybox']) await writeFile(join(rootfs, f), '');
  }

  /** The `base` tree: a copy of the host's bootstrap. */
  private async buildBase(rootfs: string, progress: (line: string) => void): Promise<void> {
    const bootstrap = await this.ensureBaseBootstrap(progress);
    progress(`base: copying the host's bootstrap of ${new Date(bootstrap.builtAt).toISOString()} (${bootstrap.dir})`);
    await runHostCommand(['cp', '-a', '--reflink=auto', '--', `${join(bootstrap.dir, 'rootfs')}/.`, rootfs]);
  }

  /**
   * The host's cached `base` bootstrap, bootstrapping it first when there is none younger than
   * the maximum age. One bootstrap at a time per process and cache entry.
   */
  ensureBaseBootstrap(progress: (line: string) => void = () => {}): Promise<{ dir: string; builtAt: number }> {
    const mirror = this.opts.debianMirror ?? hostDebianMirror();
    const cacheRoot = this.opts.hostCacheDir ?? DEFAULT_IMAGES_HOST_CACHE_DIR;
    const key = createHash('sha256').update(JSON.stringify([DEBOOTSTRAP_ARGS, mirror])).digest('hex').slice(0, 16);
    const flight = `${cacheRoot}\0${key}`;
    const inflight = bootstrapsInFlight.get(flight);
    if (inflight) return inflight;
    const job = (async () => {
      const [fresh] = await cachedBootstraps(cacheRoot, key, this.opts.bootstrapMaxAgeMs ?? 7 * 24 * 3600_000);
      if (fresh) return fresh;
      await mkdir(cacheRoot, { recursive: true });
      const builtAt = Date.now();
      const tmp = join(cacheRoot, `.base-${key}-${randomBytes(6).toString('hex')}`);
      const dir = join(cacheRoot, `base-${key}-${builtAt}`);
      try {
        await mkdir(join(tmp, 'rootfs'), { recursive: true, mode: 0o755 });
        await this.bootstrapBase(join(tmp, 'rootfs'), mirror, progress);
        await rename(tmp, dir);
      } catch (err) {
        await rm(tmp, { recursive: true, force: true });
        throw err;
      }
      this.log('images: bootstrapped base for this host', { dir, ms: Date.now() - builtAt });
      // Older bootstraps of the same key go once no copy from them can still be running.
      for (const old of await cachedBootstraps(cacheRoot, key, Infinity)) {
        if (old.builtAt < builtAt - 3600_000) await rm(old.dir, { recursive: true, force: true });
      }
      return { dir, builtAt };
    })().finally(() => bootstrapsInFlight.delete(flight));
    bootstrapsInFlight.set(flight, job);
    return job;
  }

  private async bootstrapBase(rootfs: string, mirror: string, progress: (line: string) => void): Promise<void> {
    progress(`base: debootstrap bookworm from ${mirror}`);
    await streamCommand('debootstrap', [...DEBOOTSTRAP_ARGS, rootfs, mirror], progress);
    progress('base: cleaning');
    await streamCommand('chroot', [rootfs, 'apt-get', 'clean'], progress);
    await rm(join(rootfs, 'var/lib/apt/lists'), { recursive: true, force: true });
    await mkdir(join(rootfs, 'var/lib/apt/lists/partial'), { recursive: true });
    await rm(join(rootfs, 'var/log/bootstrap.log'), { force: true });
    await rm(join(rootfs, 'var/cache/debconf/templates.dat-old'), { force: true });
    // Identity must be per box, never baked into a shared image.
    const sshDir = join(rootfs, 'etc/ssh');
    if (existsSync(sshDir)) {
      for (const f of await readdir(sshDir)) if (f.startsWith('ssh_host_')) await rm(join(sshDir, f), { force: true });
    }
    await rm(join(rootfs, 'etc/machine-id'), { force: true });
    await rm(join(rootfs, 'var/lib/dbus/machine-id'), { force: true });
    await mkdir(join(rootfs, 'workspace'), { recursive: true, mode: 0o755 });
    await mkdir(join(rootfs, '.devyard'), { recursive: true, mode: 0o755 });
    for (const f of ['etc/hosts', 'etc/hostname', 'etc/resolv.conf', '.devyard/busybox']) await writeFile(join(rootfs, f), '');
  }
}

/** The host's cached bootstraps for `key` younger than `maxAgeMs`, newest first. */
async function cachedBootstraps(cacheRoot: string, key: string, maxAgeMs: number): Promise<Array<{ dir: string; builtAt: number }>> {
  const names = await readdir(cacheRoot).catch(() => [] as string[]);
  const prefix = `base-${key}-`;
  return names
    .filter((n) => n.startsWith(prefix))
    .map((n) => ({ dir: join(cacheRoot, n), builtAt: Number(n.slice(prefix.length)) }))
    .filter((b) => Number.isFinite(b.builtAt) && Date.now() - b.builtAt < maxAgeMs && existsSync(join(b.dir, 'rootfs')))
    .sort((a, b) => b.builtAt - a.builtAt);
}

/** The Debian mirror of the host's apt sources (deb822 or one-line format). */
export function hostDebianMirror(): string {
  const candidates: string[] = [];
  for (const file of ['/etc/apt/sources.list.d/debian.sources', '/etc/apt/sources.list']) {
    if (!existsSync(file)) continue;
    const text = readFileSync(file, 'utf8');
    for (const m of text.matchAll(/^URIs:\s*(\S+)/gm)) candidates.push(m[1]!);
    for (const m of text.matchAll(/^deb\s+(?:\[[^\]]*\]\s+)?(\S+)\s+bookworm\s/gm)) candidates.push(m[1]!);
  }
  return candidates.find((u) => !u.includes('security')) ?? 'http://deb.debian.org/debian';
}

/** chown every entry by +shift (keeping relative ids) and re-apply modes cleared by chown. */
async function shiftOwnership(root: string, shift: number): Promise<void> {
  const seen = new Set<number>();
  const walk = async (path: string): Promise<void> => {
    const st = await lstat(path);
    // Hard links share one inode: shift it once.
    if (st.nlink > 1 && !st.isDirectory()) {
      if (seen.has(st.ino)) return;
      seen.add(st.ino);
    }
    if (st.uid >= shift) throw new Error(`already shifted: ${path}`);
    await lchown(path, st.uid + shift, st.gid + shift);
    if (!st.isSymbolicLink()) await chmod(path, st.mode & 0o7777);
    if (st.isDirectory()) for (const name of await readdir(path)) await walk(join(path, name));
  };
  await walk(root);
}

function capture(cmd: string, args: string[]): Promise<string> {
  return new Promise((resolve, reject) => {
    const child = spawn(cmd, args, { stdio: ['ignore', 'pipe', 'inherit'] });
    let out = '';
    child.stdout.on('data', (d: Buffer) => (out += d.toString()));
    child.on('error', (e) => reject(explainSpawnError(cmd, e)));
    child.on('close', (code) => (code === 0 ? resolve(out) : reject(new Error(`${cmd} exited ${code}`))));
  });
}

function streamCommand(cmd: string, args: string[], progress: (line: string) => void): Promise<void> {
  return new Promise((resolve, reject) => {
    const child = spawn(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, DEBIAN_FRONTEND: 'noninteractive' } });
    const tail: string[] = [];
    const onData = (d: Buffer) => {
      for (const line of d.toString().split('\n')) {
        if (!line.trim()) continue;
        progress(line);
        tail.push(line);
        if (tail.length > 20) tail.shift();
      }
    };
    child.stdout.on('data', onData);
    child.stderr.on('data', onData);
    child.on('error', (e) => reject(explainSpawnError(cmd, e)));
    child.on('close', (code) =>
      code === 0 ? resolve() : reject(new Error(`${cmd} exited ${code}: ${tail.slice(-5).join(' | ')}`)),
    );
  });
}
