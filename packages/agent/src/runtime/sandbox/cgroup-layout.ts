/**
 * Where a box's cgroups live and the few cgroup operations the driver does itself instead of
 * through crun: listing the box's processes (stop), the freezer (pause/resume, a raw write is ~10×
 * faster than `crun pause`) and removing leftover directories (destroy).
 */
import { existsSync, readFileSync } from 'node:fs';
import { readFile, rmdir, writeFile } from 'node:fs/promises';
import { join } from 'node:path';

/**
 * Host cgroup layout: `v2` (unified only), `v1` (legacy hierarchies only) or `hybrid` (v1
 * controllers plus an empty cgroup2 at /sys/fs/cgroup/unified, which crun 1.8 refuses: crun runs
 * in a private mount namespace with that mount removed, and then uses plain v1).
 */
export type CgroupMode = 'v1' | 'hybrid' | 'v2';

/** Reads the host layout from /proc/self/mountinfo. */
export function detectCgroupMode(root = '/sys/fs/cgroup'): CgroupMode {
  if (existsSync(join(root, 'cgroup.controllers'))) return 'v2';
  return v2MountPoints().includes(join(root, 'unified')) ? 'hybrid' : 'v1';
}

function mountInfo(): Array<{ mountPoint: string; fsType: string; superOptions: string }> {
  const out: Array<{ mountPoint: string; fsType: string; superOptions: string }> = [];
  for (const line of readFileSync('/proc/self/mountinfo', 'utf8').split('\n')) {
    const [left, right] = line.split(' - ');
    if (left === undefined || right === undefined) continue;
    const mountPoint = left.split(' ')[4];
    const [fsType, , superOptions] = right.split(' ');
    if (mountPoint && fsType) out.push({ mountPoint: unescapeMount(mountPoint), fsType, superOptions: superOptions ?? '' });
  }
  return out;
}

function unescapeMount(s: string): string {
  return s.replace(/\\([0-7]{3})/g, (_, o: string) => String.fromCharCode(parseInt(o, 8)));
}

function v2MountPoints(): string[] {
  return mountInfo().filter((m) => m.fsType === 'cgroup2').map((m) => m.mountPoint);
}

/** Mount points of every v1 hierarchy (cpu, memory, …, name=systemd). */
export function v1HierarchyMountPoints(): string[] {
  return [...new Set(mountInfo().filter((m) => m.fsType === 'cgroup').map((m) => m.mountPoint))];
}

function v1MountPointOf(controller: string): string | undefined {
  return mountInfo().find((m) => m.fsType === 'cgroup' && m.superOptions.split(',').includes(controller))?.mountPoint;
}

/** The cgroup directories of the boxes under one parent (e.g. `devyard`). */
export class CgroupLayout {
  /** Host layout. */
  readonly mode: CgroupMode;
  /** Parent cgroup of every box, relative to each hierarchy root. */
  readonly parent: string;
  private readonly v1Roots: string[];
  private readonly freezerRoot: string | undefined;
  private readonly pidsRoot: string | undefined;

  constructor(opts: { parent: string; mode?: CgroupMode }) {
    this.mode = opts.mode ?? detectCgroupMode();
    this.parent = opts.parent;
    this.v1Roots = this.mode === 'v2' ? [] : v1HierarchyMountPoints();
    this.freezerRoot = this.mode === 'v2' ? '/sys/fs/cgroup' : v1MountPointOf('freezer');
    this.pidsRoot = this.mode === 'v2' ? '/sys/fs/cgroup' : (v1MountPointOf('pids') ?? this.freezerRoot);
  }

  /** The OCI `linux.cgroupsPath` of a box. */
  cgroupsPath(boxId: string): string {
    return `/${this.parent}/${boxId}`;
  }

  /** Every directory that may hold the box's cgroup (one per v1 hierarchy, one on v2). */
  boxDirs(boxId: string): string[] {
    if (this.mode === 'v2') return [join('/sys/fs/cgroup', this.parent, boxId)];
    return this.v1Roots.map((root) => join(root, this.parent, boxId));
  }

  /** Every parent directory (removed only by {@link removeParent}). */
  parentDirs(): string[] {
    if (this.mode === 'v2') return [join('/sys/fs/cgroup', this.parent)];
    return this.v1Roots.map((root) => join(root, this.parent));
  }

  /** Prepares the parent on v2: children may only use the controllers enabled above them. */
  async init(): Promise<void> {
    if (this.mode !== 'v2') return;
    const { mkdir } = await import('node:fs/promises');
    await mkdir(join('/sys/fs/cgroup', this.parent), { recursive: true });
    for (const dir of ['/sys/fs/cgroup', join('/sys/fs/cgroup', this.parent)]) {
      try {
        await writeFile(join(dir, 'cgroup.subtree_control'), '+cpu +memory +pids');
      } catch {
        // The root may refuse (processes in it on some hosts); crun then reports what is missing.
      }
    }
  }

  /** Host pids of every process in the box (empty when the cgroup is gone). */
  async procs(boxId: string): Promise<number[]> {
    if (!this.pidsRoot) return [];
    try {
      const text = await readFile(join(this.pidsRoot, this.parent, boxId, 'cgroup.procs'), 'utf8');
      return text.split('\n').filter(Boolean).map(Number);
    } catch {
      return [];
    }
  }

  private freezerFile(boxId: string): string {
    if (!this.freezerRoot) throw new Error('no freezer cgroup hierarchy on this host');
    return this.mode === 'v2'
      ? join(this.freezerRoot, this.parent, boxId, 'cgroup.freeze')
      : join(this.freezerRoot, this.parent, boxId, 'freezer.state');
  }

  /** Whether the box's cgroup is frozen (or freezing). */
  async isFrozen(boxId: string): Promise<boolean> {
    try {
      if (this.mode === 'v2') return (await readFile(this.freezerFile(boxId), 'utf8')).trim() === '1';
      return (await readFile(this.freezerFile(boxId), 'utf8')).trim() !== 'THAWED';
    } catch {
      return false;
    }
  }

  /** Freezes every task of the box and waits until the kernel reports it frozen. */
  async freeze(boxId: string, timeoutMs = 5000): Promise<void> {
    const deadline = Date.now() + timeoutMs;
    if (this.mode === 'v2') {
      await writeFile(this.freezerFile(boxId), '1');
      const events = join(this.freezerRoot!, this.parent, boxId, 'cgroup.events');
      while (!/^frozen 1$/m.test(await readFile(events, 'utf8'))) {
        if (Date.now() > deadline) throw new Error(`box ${boxId} did not freeze`);
        await sleep(1);
      }
      return;
    }
    const file = this.freezerFile(boxId);
    await writeFile(file, 'FROZEN');
    for (;;) {
      const state = (await readFile(file, 'utf8')).trim();
      if (state === 'FROZEN') return;
      if (Date.now() > deadline) throw new Error(`box ${boxId} did not freeze (${state})`);
      // A task in an uninterruptible sleep delays freezing; re-writing retries it.
      await sleep(1);
      await writeFile(file, 'FROZEN');
    }
  }

  /** Thaws the box. */
  async thaw(boxId: string): Promise<void> {
    await writeFile(this.freezerFile(boxId), this.mode === 'v2' ? '0' : 'THAWED');
  }

  /** Removes the box's cgroup directories left behind (crun delete normally removes them). */
  async removeBox(boxId: string): Promise<void> {
    for (const dir of this.boxDirs(boxId)) await rmdirIfExists(dir);
  }

  /** Removes the parent directories (uninstall and tests); fails quietly while boxes exist. */
  async removeParent(): Promise<void> {
    for (const dir of this.parentDirs()) await rmdirIfExists(dir);
  }
}

async function rmdirIfExists(dir: string): Promise<void> {
  for (let i = 0; i < 50; i++) {
    try {
      await rmdir(dir);
      return;
    } catch (err) {
      const code = (err as NodeJS.ErrnoException).code;
      if (code === 'ENOENT') return;
      // EBUSY right after the last task exited: the kernel releases the cgroup asynchronously.
      if (code !== 'EBUSY') throw err;
      await sleep(10);
    }
  }
  throw new Error(`cgroup ${dir} stays busy`);
}

function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}
