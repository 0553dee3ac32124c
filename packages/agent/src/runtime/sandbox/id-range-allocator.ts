/**
 * Host uid/gid ranges of sandbox boxes: each box's root maps to its own 65536 host ids, so a process
 * that gets out of one box's user namespace is not the owner of another box's files and cannot
 * signal or ptrace another box's processes (the model of Kubernetes pod user namespaces and LXD's
 * per-container isolated idmaps).
 *
 * Ranges come from one pool per host, whatever data directory an agent uses: a claim is a file
 * `<registryDir>/<first host id>` naming the box directory that holds it, created with O_EXCL. A
 * box's record keeps its range (it survives agent restarts and reboots: the registry is on disk);
 * destroy frees it. A claim whose box directory no longer exists (a data directory removed without
 * destroying its boxes) is stale and taken over. The pool skips ranges that /etc/subuid or
 * /etc/subgid give to users, and the image id range.
 */
import { readFileSync } from 'node:fs';
import { mkdir, readdir, readFile, rename, rm, stat, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import type { IdRange } from './oci-spec-builder.js';

/** Where a host keeps its claims unless told otherwise. */
export const DEFAULT_ID_RANGE_REGISTRY = '/var/lib/devyard/id-ranges';
/** Ids per box: a full 16-bit range, so images' ids up to 65535 all map. */
export const BOX_ID_RANGE_SIZE = 65_536;

/** Options of {@link IdRangeAllocator}. */
export interface IdRangeAllocatorOptions {
  /** Directory of the claims (default /var/lib/devyard/id-ranges). */
  registryDir?: string;
  /** First host id of the pool (default 1048576 = 16 × 65536, above the usual /etc/subuid ranges). */
  firstHostId?: number;
  /** Ranges in the pool (default 16384: host ids up to 1,074,790,399, below 2^31). */
  slots?: number;
  /** Ranges no box may get (the image id range); /etc/subuid and /etc/subgid are added. */
  reserved?: IdRange[];
}

/** No range is free: the node has as many boxes as the pool has ranges. */
export class IdRangeExhaustedError extends Error {
  /** Stable error code. */
  readonly code = 'ID_RANGES_EXHAUSTED';
}

/** Hands out and frees per-box host id ranges. */
export class IdRangeAllocator {
  /** Directory of the claims. */
  readonly registryDir: string;
  private readonly first: number;
  private readonly slots: number;
  private readonly reserved: IdRange[];
  private lock: Promise<unknown> = Promise.resolve();

  constructor(opts: IdRangeAllocatorOptions = {}) {
    this.registryDir = opts.registryDir ?? DEFAULT_ID_RANGE_REGISTRY;
    this.first = opts.firstHostId ?? 16 * BOX_ID_RANGE_SIZE;
    this.slots = opts.slots ?? 16_384;
    this.reserved = [...(opts.reserved ?? []), ...subordinateRanges('/etc/subuid'), ...subordinateRanges('/etc/subgid')];
  }

  /** Claims the lowest free range for the box whose directory is `owner`. */
  allocate(owner: string): Promise<IdRange> {
    return this.serialized(async () => {
      await mkdir(this.registryDir, { recursive: true, mode: 0o700 });
      const taken = new Set(await readdir(this.registryDir));
      for (let slot = 0; slot < this.slots; slot++) {
        const range = { hostId: this.first + slot * BOX_ID_RANGE_SIZE, size: BOX_ID_RANGE_SIZE };
        if (this.reserved.some((r) => overlaps(r, range))) continue;
        if (taken.has(String(range.hostId)) && !(await this.releaseIfStale(range))) continue;
        if (await this.tryClaim(range, owner)) return range;
      }
      throw new IdRangeExhaustedError(`no free host id range left for a box (${this.slots} ranges from ${this.first})`);
    });
  }

  /**
   * Makes sure `range` is claimed by `owner` (a box record read after the registry was lost);
   * false when another live box holds it.
   */
  confirm(range: IdRange, owner: string): Promise<boolean> {
    return this.serialized(async () => {
      await mkdir(this.registryDir, { recursive: true, mode: 0o700 });
      const holder = await this.holder(range);
      if (holder === owner) return true;
      if (holder !== undefined && !(await this.releaseIfStale(range))) return false;
      return this.tryClaim(range, owner);
    });
  }

  /** Frees the range if `owner` holds it; idempotent. */
  free(range: IdRange, owner: string): Promise<void> {
    return this.serialized(async () => {
      if ((await this.holder(range)) === owner) await rm(this.claimPath(range), { force: true });
    });
  }

  /** The box directory holding `range`, or undefined. */
  async holder(range: IdRange): Promise<string | undefined> {
    try {
      return (JSON.parse(await readFile(this.claimPath(range), 'utf8')) as { owner: string }).owner;
    } catch {
      return undefined;
    }
  }

  private claimPath(range: IdRange): string {
    return join(this.registryDir, String(range.hostId));
  }

  private async tryClaim(range: IdRange, owner: string): Promise<boolean> {
    try {
      await writeFile(this.claimPath(range), JSON.stringify({ owner, claimedAt: new Date().toISOString() }), { flag: 'wx', mode: 0o600 });
      return true;
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'EEXIST') return false;
      throw err;
    }
  }

  /** Removes a claim whose box directory is gone; true when the range is free afterwards. */
  private async releaseIfStale(range: IdRange): Promise<boolean> {
    const owner = await this.holder(range);
    if (owner !== undefined && (await stat(owner).then(() => true, () => false))) return false;
    // Renamed away first: a claim is never half-removed.
    const doomed = `${this.claimPath(range)}.stale-${process.pid}`;
    await rename(this.claimPath(range), doomed).catch(() => undefined);
    await rm(doomed, { force: true });
    return true;
  }

  private serialized<T>(fn: () => Promise<T>): Promise<T> {
    const next = this.lock.then(fn, fn);
    this.lock = next.catch(() => undefined);
    return next;
  }
}

/** The ranges an /etc/subuid-style file gives out (`name:first:count` lines). */
function subordinateRanges(file: string): IdRange[] {
  let text = '';
  try {
    text = readFileSync(file, 'utf8');
  } catch {
    return [];
  }
  const out: IdRange[] = [];
  for (const line of text.split('\n')) {
    const [, first, count] = line.trim().split(':');
    if (first && count && /^\d+$/.test(first) && /^\d+$/.test(count)) out.push({ hostId: Number(first), size: Number(count) });
  }
  return out;
}

function overlaps(a: IdRange, b: IdRange): boolean {
  return a.hostId < b.hostId + b.size && b.hostId < a.hostId + a.size;
}
