/**
 * Moves the ownership of a directory tree from one host id range to another: what one box wrote
 * (its root upper, its workspace) becomes a shared read-only layer (a prebuild, a recipe image),
 * which must belong to the image id range rather than to the box that built it — that box's range
 * goes to another box later.
 */
import { chmod, lchown, lstat, readdir } from 'node:fs/promises';
import { join } from 'node:path';

/** A contiguous host id range (uids and gids alike). */
export interface HostIdRange {
  /** First host id. */
  hostId: number;
  /** Number of ids. */
  size: number;
}

/**
 * Re-owns every entry under `root` (itself included) whose uid or gid lies in `from` to the same
 * offset in `to`; ids outside `from` are left as they are. Modes are re-applied after chown, which
 * clears setuid/setgid. Returns the number of entries changed.
 */
export async function shiftTreeIds(root: string, from: HostIdRange, to: HostIdRange): Promise<number> {
  if (from.hostId === to.hostId) return 0;
  const map = (id: number) => (id >= from.hostId && id < from.hostId + from.size && id - from.hostId < to.size ? id - from.hostId + to.hostId : id);
  const seen = new Set<number>();
  let changed = 0;
  const walk = async (path: string): Promise<void> => {
    const st = await lstat(path);
    // Hard links share one inode: shift it once.
    const visit = st.isDirectory() || st.nlink <= 1 || !seen.has(st.ino);
    if (st.nlink > 1 && !st.isDirectory()) seen.add(st.ino);
    const uid = map(st.uid);
    const gid = map(st.gid);
    if (visit && (uid !== st.uid || gid !== st.gid)) {
      await lchown(path, uid, gid);
      if (!st.isSymbolicLink()) await chmod(path, st.mode & 0o7777);
      changed++;
    }
    if (st.isDirectory()) for (const name of await readdir(path)) await walk(join(path, name));
  };
  await walk(root);
  return changed;
}
