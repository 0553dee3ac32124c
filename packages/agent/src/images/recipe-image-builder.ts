/**
 * Images built from a template's build recipe (`{ from, packages?, run? }`): the base image plus
 * Debian packages plus shell commands, run once in a temporary sandbox box and flattened into a
 * self-contained root filesystem, cached by recipe digest under `<dataDir>/recipes/`:
 *   <hex>/rootfs         the image root, read-only in use, like a built-in or OCI image root
 *   <hex>/recipe.json    what it was built from, when, and the build log tail
 *   .tmp-<hex>-<rand>/   a build in progress; renamed to <hex>/ only when complete
 *
 * The result is flattened rather than kept as a layer over the base so that it is usable exactly
 * like any other image (one read-only lower) and does not depend on the base staying in its store.
 * The flattening replays the box's overlay upper onto a copy of the base: overlayfs whiteouts (0/0
 * character devices) delete, opaque directories (`trusted.overlay.opaque=y`) replace their lower
 * content. What the box wrote belongs to the build box's own host id range: it is moved to the image
 * range (where the base already is) before it is replayed.
 *
 * /root and /workspace are volumes in every box, not part of its root overlay: what a recipe
 * command writes there is not part of the image (as in a box, where they start from the volume).
 */
import { createHash, randomBytes } from 'node:crypto';
import { existsSync, type Stats } from 'node:fs';
import { chmod, lchown, lstat, mkdir, readdir, rename, rm, utimes, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { HostCommandError, runHostCommand, runHostCommandRaw } from '../network/host-command-runner.js';
import type { BoxRuntimeSpec, RuntimeDriver, RuntimeResources } from '../runtime/runtime-driver.js';
import { HookFailedError, OutputTail, runHook } from '../workspace/lifecycle-hooks.js';
import { shiftTreeIds, type HostIdRange } from './tree-id-shift.js';

/** A build recipe, as in a template's `build`. */
export interface BuildRecipe {
  /** The base image (built-in name or registry reference). */
  from: string;
  /** Debian packages installed with `apt-get install --no-install-recommends` (`name` or `name=version`). */
  packages?: string[];
  /** Shell commands run in order through `/bin/sh -c`, as box root, after the packages. */
  run?: string[];
}

/** A recipe image ready to use. */
export interface RecipeImage {
  /** `recipe:<first 12 hex digits of the digest>`. */
  name: string;
  /** Recipe digest (`sha256:…`): hash of the base image digest, the packages and the commands. */
  digest: string;
  /** Root filesystem directory (read-only use). */
  rootfs: string;
}

/** What the builder needs of a runtime: the box lifecycle plus host access to a stopped box's root upper. */
export interface RecipeBuildDriver extends Pick<RuntimeDriver, 'create' | 'start' | 'stop' | 'destroy' | 'exec'> {
  /** Host path of the upper directory of a box's root overlay, the box's host id range and the image range. */
  boxHostPaths(boxId: string): { rootUpper: string; idRange: HostIdRange; imageIdRange: HostIdRange };
}

/** Where base images come from (the agent's ImageResolver, without recipe support). */
export interface RecipeBaseImages {
  /** The image's root filesystem and digest, built or pulled first when missing. */
  ensure(name: string, onProgress?: (line: string) => void): Promise<{ digest: string; rootfs: string }>;
}

/** Options of {@link RecipeImageBuilder}. */
export interface RecipeImageBuilderOptions {
  /** Node data directory; recipe images go under `<dataDir>/recipes` (the boxes' filesystem, so captures are renames). */
  dataDir: string;
  /** The runtime the temporary build box runs in. */
  driver: RecipeBuildDriver;
  /** Resolver of the recipe's `from` image. */
  base: RecipeBaseImages;
  /** Limits of the temporary build box (default 2 cores, 2 GiB, 1024 pids). */
  resources?: RuntimeResources;
  /** Kills a step (the package install or one command) running longer than this (default 30 minutes). */
  stepTimeoutMs?: number;
  /** Structured log sink. */
  log?: (msg: string, fields?: object) => void;
}

/** A recipe build that failed; nothing of it is cached. */
export class RecipeBuildError extends Error {
  /** Stable error code. */
  readonly code = 'RECIPE_BUILD_FAILED';
  constructor(
    message: string,
    /** The failing step: `base`, `start`, `packages`, `run[<index>]` or `capture`. */
    readonly step: string,
    /** The last lines of the build log (about 20). */
    readonly logTail: string[],
    options?: { cause?: unknown },
  ) {
    super(message, options);
  }
}

const TAIL_LINES = 20;
const DEFAULT_RESOURCES: RuntimeResources = { cpuMillis: 2000, memoryBytes: 2 * 1024 ** 3, pids: 1024 };
/** Same rule as the API's schema: the names also reach a shell, so the builder checks them itself. */
const PACKAGE = /^[a-z0-9][a-z0-9+.-]+(=[A-Za-z0-9.+~:-]+)?$/;
const INSTALL =
  'apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "$@" && apt-get clean && rm -rf /var/lib/apt/lists/*';
const OVL = 'trusted.overlay.';

/** The recipe digest: everything that determines what the image contains. */
export function recipeDigest(baseDigest: string, recipe: BuildRecipe): string {
  const identity = {
    v: 1,
    base: baseDigest,
    // Install order does not change what apt installs; command order does.
    packages: [...new Set(recipe.packages ?? [])].sort(),
    run: recipe.run ?? [],
  };
  return `sha256:${createHash('sha256').update(JSON.stringify(identity)).digest('hex')}`;
}

/** Builds and caches recipe images. */
export class RecipeImageBuilder {
  private readonly root: string;
  private readonly log: (msg: string, fields?: object) => void;
  private readonly inflight = new Map<string, Promise<RecipeImage>>();

  constructor(private readonly opts: RecipeImageBuilderOptions) {
    this.root = join(opts.dataDir, 'recipes');
    this.log = opts.log ?? (() => {});
  }

  /**
   * The image of `recipe`: the cached one, the one another caller is building, or a new build.
   * Progress and build output lines go to `onProgress`; throws {@link RecipeBuildError}.
   */
  async ensure(recipe: BuildRecipe, onProgress?: (line: string) => void): Promise<RecipeImage> {
    const emit = onProgress ?? (() => {});
    for (const p of recipe.packages ?? []) {
      if (!PACKAGE.test(p)) throw new RecipeBuildError(`invalid Debian package name: ${JSON.stringify(p)}`, 'packages', []);
    }
    let base: { digest: string; rootfs: string };
    try {
      base = await this.opts.base.ensure(recipe.from, emit);
    } catch (err) {
      throw new RecipeBuildError(`base image ${recipe.from}: ${(err as Error).message}`, 'base', [], { cause: err });
    }
    const hex = recipeDigest(base.digest, recipe).slice('sha256:'.length);
    const cached = this.cached(hex);
    if (cached) return cached;
    const running = this.inflight.get(hex);
    if (running) return running;
    const p = this.build(hex, recipe, base, emit).finally(() => this.inflight.delete(hex));
    this.inflight.set(hex, p);
    return p;
  }

  /** Recipe images present on this node. */
  async list(): Promise<Array<{ name: string; digest: string }>> {
    let names: string[];
    try {
      names = await readdir(this.root);
    } catch {
      return [];
    }
    return names
      .filter((n) => /^[0-9a-f]{64}$/.test(n) && existsSync(join(this.root, n, 'recipe.json')))
      .sort()
      .map((hex) => ({ name: imageName(hex), digest: `sha256:${hex}` }));
  }

  /**
   * Removes builds a crashed agent left half done (`.tmp-*`); call on agent start. Temporary build
   * boxes (`rb_*`) are the driver's to list and destroy.
   */
  async sweep(): Promise<void> {
    let names: string[];
    try {
      names = await readdir(this.root);
    } catch {
      return;
    }
    for (const name of names) {
      const m = /^\.tmp-([0-9a-f]{64})-/.exec(name);
      if (m && !this.inflight.has(m[1]!)) await rm(join(this.root, name), { recursive: true, force: true });
    }
  }

  private cached(hex: string): RecipeImage | undefined {
    // recipe.json is written before the rename that publishes the directory: present means complete.
    if (!existsSync(join(this.root, hex, 'recipe.json'))) return undefined;
    return { name: imageName(hex), digest: `sha256:${hex}`, rootfs: join(this.root, hex, 'rootfs') };
  }

  private async build(
    hex: string,
    recipe: BuildRecipe,
    base: { digest: string; rootfs: string },
    emit: (line: string) => void,
  ): Promise<RecipeImage> {
    const { driver } = this.opts;
    const t0 = performance.now();
    const tail = new OutputTail(256 * 1024);
    const log = (line: string) => {
      tail.push(line);
      emit(line);
    };
    const boxId = `rb_${hex.slice(0, 12)}_${randomBytes(4).toString('hex')}`;
    const spec: BoxRuntimeSpec = {
      boxId,
      name: `recipe-${hex.slice(0, 12)}`,
      imageRootfs: base.rootfs,
      imageDigest: base.digest,
      resources: this.opts.resources ?? DEFAULT_RESOURCES,
      env: {},
    };
    await mkdir(this.root, { recursive: true, mode: 0o711 });
    const tmp = join(this.root, `.tmp-${hex}-${randomBytes(4).toString('hex')}`);
    const rootfs = join(tmp, 'rootfs');
    let step = 'start';
    let copying: Promise<unknown> | undefined;
    try {
      log(`build: recipe ${imageName(hex)} from ${recipe.from} (${base.digest})`);
      await mkdir(tmp, { mode: 0o711 });
      // The base copy does not depend on the build: it overlaps with the (network-bound) steps.
      copying = runHostCommand(['cp', '-a', '--reflink=auto', '--', base.rootfs, rootfs]);
      copying.catch(() => {});
      await driver.create(spec);
      await driver.start(spec);
      const runStep = async (name: string, argv: string[]) => {
        step = name;
        await runHook(driver, boxId, {
          name,
          command: argv,
          cwd: '/',
          env: { DEBIAN_FRONTEND: 'noninteractive' },
          timeoutMs: this.opts.stepTimeoutMs,
          onLine: (l) => log(`build: ${l.line}`),
        });
      };
      const packages = [...new Set(recipe.packages ?? [])].sort();
      if (packages.length > 0) {
        step = 'packages';
        try {
          await runStep('packages', ['/bin/sh', '-c', 'command -v apt-get >/dev/null']);
        } catch (err) {
          if (!(err instanceof HookFailedError)) throw err;
          throw new RecipeBuildError(
            `base image ${recipe.from} has no apt-get: installing packages needs a Debian-based image`,
            'packages',
            tail.lines(TAIL_LINES),
          );
        }
        log(`build: $ apt-get install ${packages.join(' ')}`);
        await runStep('packages', ['/bin/sh', '-c', INSTALL, 'sh', ...packages]);
      }
      for (const [i, command] of (recipe.run ?? []).entries()) {
        log(`build: $ ${command}`);
        await runStep(`run[${i}]`, ['/bin/sh', '-c', command]);
      }
      step = 'capture';
      await driver.stop(boxId, { graceMs: 2000 });
      log('build: capturing');
      await copying;
      const paths = driver.boxHostPaths(boxId);
      await shiftTreeIds(paths.rootUpper, paths.idRange, paths.imageIdRange);
      await applyUpper(paths.rootUpper, rootfs);
      await dropIdentity(rootfs);
      const seconds = (performance.now() - t0) / 1000;
      log(`build: ${imageName(hex)} built in ${seconds.toFixed(1)} s`);
      const meta = {
        digest: `sha256:${hex}`,
        from: recipe.from,
        baseDigest: base.digest,
        packages: recipe.packages ?? [],
        run: recipe.run ?? [],
        builtAt: new Date().toISOString(),
        logTail: tail.lines(100),
      };
      await writeFile(join(tmp, 'recipe.json'), JSON.stringify(meta, null, 2));
      try {
        await rename(tmp, join(this.root, hex));
      } catch (err) {
        const code = (err as NodeJS.ErrnoException).code;
        // Another agent process finished the same recipe first: its image is as good as ours.
        if (code !== 'ENOTEMPTY' && code !== 'EEXIST') throw err;
        await rm(tmp, { recursive: true, force: true });
      }
      this.log('recipes: built', { digest: meta.digest, from: recipe.from, ms: Math.round(performance.now() - t0) });
      return this.cached(hex)!;
    } catch (err) {
      await copying?.catch(() => {});
      await rm(tmp, { recursive: true, force: true });
      if (err instanceof RecipeBuildError) throw err;
      const what = err instanceof HookFailedError ? (err.timedOut ? 'timed out' : `exited ${err.exitCode}`) : (err as Error).message;
      log(`build: ${step} failed: ${what}`);
      throw new RecipeBuildError(`recipe build step ${step} failed: ${what}`, step, tail.lines(TAIL_LINES), { cause: err });
    } finally {
      await driver.destroy(boxId).catch((e: unknown) => this.log('recipes: temporary box not destroyed', { boxId, error: String(e) }));
    }
  }
}

function imageName(hex: string): string {
  return `recipe:${hex.slice(0, 12)}`;
}

/**
 * Replays an overlay upper onto `target` (a copy of the lower), moving entries out of the upper.
 * Directories are merged entry by entry, never moved whole, so whiteouts and opaque markers nested
 * anywhere are honoured; overlay's own xattrs are not carried into the result, where they would
 * mean something to a later overlay that used it as a lower.
 */
export async function applyUpper(upper: string, target: string): Promise<void> {
  const xattrs = await overlayXattrs(upper);
  for (const [rel, attrs] of xattrs) {
    // Both are off by default and in the sandbox's mounts; with them the upper is not self-contained.
    if (attrs.has(`${OVL}redirect`) || attrs.has(`${OVL}metacopy`)) {
      throw new Error(`overlay redirect/metacopy entries are not supported: ${rel}`);
    }
  }
  const strip = new Map<string, string[]>();
  const walk = async (rel: string): Promise<void> => {
    for (const name of await readdir(rel ? join(upper, rel) : upper)) {
      const r = rel ? `${rel}/${name}` : name;
      const src = join(upper, r);
      const dst = join(target, r);
      const st = await lstat(src);
      const attrs = xattrs.get(r);
      const existing = await lstat(dst).catch(() => undefined);
      if ((st.isCharacterDevice() && st.rdev === 0) || attrs?.has(`${OVL}whiteout`)) {
        if (existing) await rm(dst, { recursive: true, force: true });
        continue;
      }
      if (st.isDirectory()) {
        const opaque = attrs?.get(`${OVL}opaque`) === 'y';
        if (existing && (!existing.isDirectory() || opaque)) await rm(dst, { recursive: true, force: true });
        if (!existing || !existing.isDirectory() || opaque) await mkdir(dst);
        await walk(r);
        await copyMeta(st, dst);
        continue;
      }
      if (existing?.isDirectory()) await rm(dst, { recursive: true, force: true });
      await moveEntry(src, dst);
      for (const name of attrs?.keys() ?? []) {
        const list = strip.get(name) ?? [];
        list.push(dst);
        strip.set(name, list);
      }
    }
  };
  await walk('');
  await copyMeta(await lstat(upper), target);
  for (const [name, paths] of strip) {
    for (let i = 0; i < paths.length; i += 500) await runHostCommand(['setfattr', '-h', '-x', name, '--', ...paths.slice(i, i + 500)]);
  }
}

/** Owner, mode (after chown, which clears setuid/setgid) and times of a directory as the box left it. */
async function copyMeta(st: Stats, dst: string): Promise<void> {
  await lchown(dst, st.uid, st.gid);
  await chmod(dst, st.mode & 0o7777);
  await utimes(dst, st.atime, st.mtime);
}

/** A rename keeps device nodes, xattrs and ownership; across filesystems a root `cp -a` does too. */
async function moveEntry(src: string, dst: string): Promise<void> {
  try {
    await rename(src, dst);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== 'EXDEV') throw err;
    await rm(dst, { force: true });
    await runHostCommand(['cp', '-a', '--', src, dst]);
  }
}

/** `trusted.overlay.*` xattrs of every entry under `dir`, by path relative to it (one getfattr run). */
async function overlayXattrs(dir: string): Promise<Map<string, Map<string, string>>> {
  const out = new Map<string, Map<string, string>>();
  const argv = ['getfattr', '-R', '-P', '-h', '-d', '-e', 'hex', '-m', '^trusted\\.overlay\\.', '--absolute-names', '--', dir];
  const res = await runHostCommandRaw(argv);
  // Some getfattr versions exit 1 when nothing matched; only a complaint on stderr is a failure.
  if (res.code !== 0 && res.stderr.trim()) throw new HostCommandError(argv, res);
  const text = res.stdout;
  let current: Map<string, string> | undefined;
  for (const line of text.split('\n')) {
    if (line.startsWith('# file: ')) {
      const abs = unescapeGetfattr(line.slice('# file: '.length));
      const rel = abs === dir ? '' : abs.slice(dir.length + 1);
      current = new Map();
      out.set(rel, current);
      continue;
    }
    const m = /^([^=]+)=0x([0-9a-f]*)$/.exec(line);
    if (m && current) current.set(m[1]!, Buffer.from(m[2]!, 'hex').toString('latin1'));
  }
  return out;
}

/** getfattr writes names with `\ooo` octal escapes for bytes it will not print, and `\\`. */
function unescapeGetfattr(s: string): string {
  const bytes = Buffer.from(s, 'utf8').toString('latin1');
  const raw = bytes.replace(/\\(\\|[0-7]{3})/g, (_, e: string) => (e === '\\' ? '\\' : String.fromCharCode(parseInt(e, 8))));
  return Buffer.from(raw, 'latin1').toString('utf8');
}

/** Identity must be per box, never baked into a shared image (as for the built-in base). */
async function dropIdentity(rootfs: string): Promise<void> {
  // A recipe may have replaced any ancestor with a file: ENOTDIR means absent, like ENOENT.
  const absent = (err: unknown) => ['ENOENT', 'ENOTDIR'].includes((err as NodeJS.ErrnoException).code ?? '');
  const sshDir = join(rootfs, 'etc/ssh');
  const names = await readdir(sshDir).catch((err: unknown) => {
    if (absent(err)) return [];
    throw err;
  });
  const doomed = [...names.filter((f) => f.startsWith('ssh_host_')).map((f) => join(sshDir, f)), join(rootfs, 'etc/machine-id'), join(rootfs, 'var/lib/dbus/machine-id')];
  for (const path of doomed) {
    await rm(path, { force: true }).catch((err: unknown) => {
      if (!absent(err)) throw err;
    });
  }
}
