/**
 * The host uids (and gids, the same numbers) that microVMs' QEMU processes run as: one per box,
 * from a range of the node, for the box's whole life (its disks and RAM file belong to it across
 * stop, pause and agent restarts), freed when the box is deleted.
 *
 * The registry is node-wide, not per data dir: two agents of one host (or a second node's agent
 * on the same machine, as in tests) must never hand the same uid to two VMs. Each allocation is a
 * file `<registry>/<uid>` holding the box directory it belongs to, created with O_EXCL, so
 * concurrent allocations in different processes cannot collide.
 */
import { existsSync, readdirSync, readFileSync } from 'node:fs';
import { mkdir, readdir, readFile, rm, writeFile } from 'node:fs/promises';
import { join } from 'node:path';

/** Where allocations are recorded unless told otherwise. */
export const DEFAULT_VM_UID_REGISTRY = '/var/lib/devyard/vm-uids';

/**
 * First uid of the default range: above the ranges distributions hand out to users (< 60000),
 * systemd's dynamic users and the usual subordinate-id ranges (100000 upwards in blocks of 65536),
 * below 2^31 (some tools treat larger ids as negative).
 */
export const DEFAULT_VM_UID_FIRST = 1_200_000_000;

/** Options of {@link VmUidAllocator}. */
export interface VmUidAllocatorOptions {
  /** Registry directory (default {@link DEFAULT_VM_UID_REGISTRY}). */
  registryDir?: string;
  /** First uid of the range (default {@link DEFAULT_VM_UID_FIRST}). */
  first?: number;
  /** How many uids the range has (default 1,000,000). */
  count?: number;
}

export class VmUidAllocator {
  /** The registry directory. */
  readonly dir: string;
  private readonly first: number;
  private readonly count: number;

  constructor(opts: VmUidAllocatorOptions = {}) {
    this.dir = opts.registryDir ?? DEFAULT_VM_UID_REGISTRY;
    this.first = opts.first ?? DEFAULT_VM_UID_FIRST;
    this.count = opts.count ?? 1_000_000;
    if (!Number.isInteger(this.first) || this.first < 1000 || !Number.isInteger(this.count) || this.count < 1 || this.first + this.count > 2 ** 31) {
      throw new Error(`invalid microVM uid range ${this.first} + ${this.count}`);
    }
  }

  /** Allocates the lowest free uid of the range to `owner` (a box directory). */
  async allocate(owner: string): Promise<number> {
    await mkdir(this.dir, { recursive: true, mode: 0o700 });
    const used = new Set((await readdir(this.dir)).map(Number));
    for (let uid = this.first; uid < this.first + this.count; uid++) {
      if (used.has(uid)) continue;
      try {
        await writeFile(join(this.dir, String(uid)), owner, { flag: 'wx', mode: 0o600 });
        return uid;
      } catch (e) {
        if ((e as NodeJS.ErrnoException).code !== 'EEXIST') throw e;
      }
    }
    throw new Error(`no free microVM uid left in ${this.first}..${this.first + this.count - 1} (${this.dir})`);
  }

  /** Frees `uid` if `owner` holds it (a uid handed to another box meanwhile is not touched). */
  async free(uid: number, owner: string): Promise<void> {
    if (this.holder(uid) === owner) await rm(join(this.dir, String(uid)), { force: true });
  }

  /** The box directory `uid` is allocated to, if any. */
  holder(uid: number): string | undefined {
    try {
      return readFileSync(join(this.dir, String(uid)), 'utf8');
    } catch {
      return undefined;
    }
  }

  /** The uid allocated to `owner`, if any. */
  uidHeldBy(owner: string): number | undefined {
    let names: string[];
    try {
      names = readdirSync(this.dir);
    } catch {
      return undefined;
    }
    const uid = names.find((n) => this.holder(Number(n)) === owner);
    return uid === undefined ? undefined : Number(uid);
  }

  /**
   * Frees the uids of boxes whose directory is gone (deleted while their agent was down, or a
   * data dir removed as a whole) and that no process runs as: a uid is reused only when nothing
   * of its previous box can still act under it.
   */
  async collectStale(): Promise<number[]> {
    let names: string[];
    try {
      names = await readdir(this.dir);
    } catch {
      return [];
    }
    const stale: number[] = [];
    for (const n of names) {
      const owner = await readFile(join(this.dir, n), 'utf8').catch(() => null);
      if (owner !== null && !existsSync(owner)) stale.push(Number(n));
    }
    if (stale.length === 0) return [];
    const running = runningUids();
    const freed: number[] = [];
    for (const uid of stale.filter((u) => !running.has(u))) {
      await rm(join(this.dir, String(uid)), { force: true });
      freed.push(uid);
    }
    return freed;
  }
}

/** Every uid a process of the host runs as (real, effective, saved or filesystem). */
function runningUids(): Set<number> {
  const out = new Set<number>();
  for (const p of readdirSync('/proc')) {
    if (!/^\d+$/.test(p)) continue;
    try {
      const line = /^Uid:\s*(.*)$/m.exec(readFileSync(`/proc/${p}/status`, 'utf8'))?.[1] ?? '';
      for (const u of line.split(/\s+/)) out.add(Number(u));
    } catch {
      /* gone */
    }
  }
  return out;
}
