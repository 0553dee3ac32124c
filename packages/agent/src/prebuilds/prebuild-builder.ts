/**
 * Prebuilds: an image plus a repository checkout plus the template's onCreate/updateContent hooks,
 * run once in a temporary box and captured as two read-only directories, cached by content under
 * `<dataDir>/prebuilds/`:
 *   <id>/rootfs-layer   the temporary box's root overlay upper: a layer above the image
 *   <id>/workspace      its /workspace (checkout + what the hooks wrote): a workspace base
 *   <id>/prebuild.json  what it was built from, the commit, the build log tail
 *   .tmp-<id>-<rand>/   a capture in progress; renamed to <id>/ only when complete
 * A box from a prebuild is `layers: [rootfsLayer], workspaceBase: workspace`: a copy-on-write clone.
 *
 * Both directories are moved, not copied, out of the stopped box: a rename keeps the overlay
 * whiteouts (0/0 char devices) and `trusted.overlay.*` xattrs that make an upper valid as a lower,
 * and keeps ownership, which then moves from the build box's own host id range to the image range
 * (the build box's range goes to another box later; boxes see the layers through idmapped mounts).
 * The temporary box gets only the template's env:
 * no user secrets, and the checkout's credentials stay on the host (see repository-checkout.ts).
 */
import { createHash, randomBytes } from 'node:crypto';
import { existsSync } from 'node:fs';
import { mkdir, readdir, readFile, rename, rm, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { runHostCommand } from '../network/host-command-runner.js';
import { shiftTreeIds, type HostIdRange } from '../images/tree-id-shift.js';
import type { BoxRuntimeSpec, RuntimeDriver, RuntimeResources } from '../runtime/runtime-driver.js';
import { checkoutRepository, resolveRemoteRef, repoNameFromUrl, type GitCredentials } from '../workspace/repository-checkout.js';
import { OutputTail, runHook, type LifecycleCommand } from '../workspace/lifecycle-hooks.js';

/** What the builder needs of a runtime: the box lifecycle plus host access to a stopped box's disk. */
export interface PrebuildDriver extends Pick<RuntimeDriver, 'create' | 'start' | 'stop' | 'destroy' | 'exec'> {
  /**
   * Host paths of a box's root overlay upper and workspace volume, the host id of box root, the
   * box's host id range and the range shared layers are kept in.
   */
  boxHostPaths(boxId: string): {
    rootUpper: string;
    workspace: string;
    owner: { uid: number; gid: number };
    idRange: HostIdRange;
    imageIdRange: HostIdRange;
  };
}

/** What to prebuild. */
export interface PrebuildRequest {
  /** The image the prebuild sits on. */
  image: { rootfs: string; digest: string };
  /** The repository to check out. */
  repository: { url: string; ref?: string; credentials?: GitCredentials };
  /** Hooks run in order after the checkout. */
  hooks: { onCreate?: LifecycleCommand; updateContent?: LifecycleCommand };
  /** The template's environment (never user secrets: it is part of the prebuild's identity and log). */
  env?: Record<string, string>;
  /** Limits of the temporary build box (default 2 cores, 2 GiB, 1024 pids). */
  resources?: RuntimeResources;
}

/** A prebuild ready to create boxes from. */
export interface Prebuild {
  /** Content id: hash of image digest, repository URL, commit, hooks and env. */
  id: string;
  /** The commit checked out. */
  commit: string;
  /** Directory name of the checkout under /workspace. */
  repoName: string;
  /** Read-only root layer for `BoxRuntimeSpec.layers`. */
  rootfsLayer: string;
  /** Read-only workspace base for `BoxRuntimeSpec.workspaceBase`. */
  workspaceBase: string;
  /** The last lines of the build log. */
  logTail: string[];
  /** Whether this call found the prebuild already built rather than building it. */
  reused: boolean;
}

/** Options of {@link PrebuildBuilder}. */
export interface PrebuildBuilderOptions {
  /** The runtime the temporary build box runs in. */
  driver: PrebuildDriver;
  /** Node data directory; prebuilds go under `<dataDir>/prebuilds` (same filesystem as the boxes, for renames). */
  dataDir: string;
  /** Structured log sink. */
  log?: (msg: string, fields?: object) => void;
}

/** A prebuild that failed; nothing of it is left usable. */
export class PrebuildError extends Error {
  /** Stable error code. */
  readonly code = 'PREBUILD_FAILED';
  constructor(
    message: string,
    /** The last lines of the build log. */
    readonly logTail: string[],
    options?: { cause?: unknown },
  ) {
    super(message, options);
  }
}

const LOG_TAIL_LINES = 100;
const DEFAULT_RESOURCES: RuntimeResources = { cpuMillis: 2000, memoryBytes: 2 * 1024 ** 3, pids: 1024 };

/** Builds and caches prebuilds. */
export class PrebuildBuilder {
  private readonly root: string;
  private readonly log: (msg: string, fields?: object) => void;
  private readonly inflight = new Map<string, Promise<Prebuild>>();

  constructor(private readonly opts: PrebuildBuilderOptions) {
    this.root = join(opts.dataDir, 'prebuilds');
    this.log = opts.log ?? (() => {});
  }

  /**
   * The prebuild of `req` at the repository's current commit: the cached one, the one another
   * caller is building, or a new build. Build log lines go to `onLog`.
   */
  async build(req: PrebuildRequest, onLog?: (line: string) => void): Promise<Prebuild> {
    const emit = onLog ?? (() => {});
    const { url, ref, credentials } = req.repository;
    const commit = await resolveRemoteRef(url, ref, credentials);
    const id = prebuildId(req, commit);
    const cached = await this.get(id);
    if (cached) {
      emit(`prebuild ${id} already built`);
      return cached;
    }
    const running = this.inflight.get(id);
    if (running) {
      emit(`prebuild ${id} is being built; waiting`);
      return { ...(await running), reused: true };
    }
    const p = this.buildUncached(id, commit, req, emit).finally(() => this.inflight.delete(id));
    this.inflight.set(id, p);
    return p;
  }

  /** A built prebuild by id, or undefined. */
  async get(id: string): Promise<Prebuild | undefined> {
    if (!/^[0-9a-f]{64}$/.test(id)) return undefined;
    const dir = join(this.root, id);
    try {
      const meta = JSON.parse(await readFile(join(dir, 'prebuild.json'), 'utf8')) as { commit: string; repoName: string; logTail: string[] };
      return { id, commit: meta.commit, repoName: meta.repoName, rootfsLayer: join(dir, 'rootfs-layer'), workspaceBase: join(dir, 'workspace'), logTail: meta.logTail, reused: true };
    } catch {
      return undefined;
    }
  }

  /** Deletes a prebuild; the caller makes sure no box uses it any more. */
  async remove(id: string): Promise<void> {
    if (!/^[0-9a-f]{64}$/.test(id)) return;
    // Rename first so a half-deleted tree is never mistaken for a complete prebuild.
    const doomed = join(this.root, `.rm-${id}-${randomBytes(4).toString('hex')}`);
    try {
      await rename(join(this.root, id), doomed);
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') return;
      throw err;
    }
    await rm(doomed, { recursive: true, force: true });
  }

  /**
   * Removes captures and deletions a crashed agent left half done (`.tmp-*`, `.rm-*`); call on
   * agent start. Temporary build boxes (`pb_*`) are the driver's to list and destroy.
   */
  async sweep(): Promise<void> {
    let names: string[];
    try {
      names = await readdir(this.root);
    } catch {
      return;
    }
    for (const name of names) {
      const m = /^\.(tmp|rm)-([0-9a-f]{64})-/.exec(name);
      if (m && !(m[1] === 'tmp' && this.inflight.has(m[2]!))) await rm(join(this.root, name), { recursive: true, force: true });
    }
  }

  private async buildUncached(id: string, commit: string, req: PrebuildRequest, emit: (line: string) => void): Promise<Prebuild> {
    const { driver } = this.opts;
    const t0 = performance.now();
    const tail = new OutputTail(256 * 1024);
    const log = (line: string) => {
      tail.push(line);
      emit(line);
    };
    const boxId = `pb_${id.slice(0, 12)}_${randomBytes(4).toString('hex')}`;
    const spec: BoxRuntimeSpec = {
      boxId,
      name: `prebuild-${id.slice(0, 12)}`,
      imageRootfs: req.image.rootfs,
      imageDigest: req.image.digest,
      resources: req.resources ?? DEFAULT_RESOURCES,
      env: { ...(req.env ?? {}) },
    };
    await mkdir(this.root, { recursive: true, mode: 0o700 });
    const tmp = join(this.root, `.tmp-${id}-${randomBytes(4).toString('hex')}`);
    try {
      log(`prebuild ${id}: ${req.repository.url} at ${commit}`);
      await driver.create(spec);
      const paths = driver.boxHostPaths(boxId);
      // Checked out while the box is stopped: overlayfs must not see its layers change under it.
      const checkout = await checkoutRepository({
        url: req.repository.url,
        ref: commit,
        credentials: req.repository.credentials,
        workspaceDir: paths.workspace,
        owner: paths.owner,
        onProgress: (l) => log(`git: ${l}`),
      });
      await driver.start(spec);
      for (const name of ['onCreate', 'updateContent'] as const) {
        const command = req.hooks[name];
        if (command === undefined) continue;
        log(`running ${name}`);
        await runHook(driver, boxId, {
          name,
          command,
          repoName: checkout.name,
          onLine: (l) => log(l.command ? `[${l.command}] ${l.line}` : l.line),
        });
      }
      await driver.stop(boxId, { graceMs: 5000 });
      log('capturing');
      await mkdir(tmp, { mode: 0o700 });
      await moveTree(paths.rootUpper, join(tmp, 'rootfs-layer'));
      await moveTree(paths.workspace, join(tmp, 'workspace'));
      for (const tree of ['rootfs-layer', 'workspace']) await shiftTreeIds(join(tmp, tree), paths.idRange, paths.imageIdRange);
      const seconds = (performance.now() - t0) / 1000;
      log(`prebuild ${id} built in ${seconds.toFixed(1)} s`);
      const meta = {
        id,
        imageDigest: req.image.digest,
        url: req.repository.url,
        ref: req.repository.ref ?? null,
        commit,
        repoName: checkout.name,
        hooks: req.hooks,
        builtAt: new Date().toISOString(),
        logTail: tail.lines(LOG_TAIL_LINES),
      };
      await writeFile(join(tmp, 'prebuild.json'), JSON.stringify(meta, null, 2));
      try {
        await rename(tmp, join(this.root, id));
      } catch (err) {
        const code = (err as NodeJS.ErrnoException).code;
        // Another agent process finished the same content first: its prebuild is as good as ours.
        if (code !== 'ENOTEMPTY' && code !== 'EEXIST') throw err;
        await rm(tmp, { recursive: true, force: true });
      }
      this.log('prebuilds: built', { id, commit, ms: Math.round(performance.now() - t0) });
      return {
        id,
        commit,
        repoName: checkout.name,
        rootfsLayer: join(this.root, id, 'rootfs-layer'),
        workspaceBase: join(this.root, id, 'workspace'),
        logTail: meta.logTail,
        reused: false,
      };
    } catch (err) {
      await rm(tmp, { recursive: true, force: true });
      log(`prebuild failed: ${(err as Error).message}`);
      throw new PrebuildError(`prebuild of ${req.repository.url} at ${commit} failed: ${(err as Error).message}`, tail.lines(LOG_TAIL_LINES), { cause: err });
    } finally {
      await driver.destroy(boxId).catch((e: unknown) => this.log('prebuilds: temporary box not destroyed', { boxId, error: String(e) }));
    }
  }
}

/** The content id of a prebuild: everything that determines what it contains. */
export function prebuildId(req: PrebuildRequest, commit: string): string {
  const identity = {
    imageDigest: req.image.digest,
    url: req.repository.url,
    commit,
    hooks: { onCreate: req.hooks.onCreate ?? null, updateContent: req.hooks.updateContent ?? null },
    env: Object.fromEntries(Object.entries(req.env ?? {}).sort(([a], [b]) => a.localeCompare(b))),
    repoName: repoNameFromUrl(req.repository.url),
  };
  return createHash('sha256').update(JSON.stringify(identity)).digest('hex');
}

/**
 * Moves a directory tree; across filesystems a root `cp -a` keeps what a rename keeps (device
 * nodes, `trusted.*` xattrs, ownership) before the source is removed.
 */
async function moveTree(from: string, to: string): Promise<void> {
  try {
    await rename(from, to);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== 'EXDEV') throw err;
    await runHostCommand(['cp', '-a', '--', from, to]);
    await rm(from, { recursive: true, force: true });
  }
  if (!existsSync(to)) throw new Error(`capture of ${from} failed`);
}
