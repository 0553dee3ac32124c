/**
 * Content digest of a directory tree: sha256 over a sorted walk recording, per entry, its path,
 * type and mode, owner, size and content hash (files) or target (symlinks). Two trees with the
 * same digest are interchangeable as a box root.
 */
import { createHash } from 'node:crypto';
import { createReadStream } from 'node:fs';
import { lstat, readdir, readlink } from 'node:fs/promises';
import { join } from 'node:path';

async function fileHash(path: string): Promise<string> {
  const h = createHash('sha256');
  for await (const chunk of createReadStream(path)) h.update(chunk as Buffer);
  return h.digest('hex');
}

/** `sha256:<hex>` of the tree rooted at `root`. */
export async function treeDigest(root: string): Promise<string> {
  const h = createHash('sha256');
  const walk = async (rel: string): Promise<void> => {
    const abs = rel ? join(root, rel) : root;
    const st = await lstat(abs);
    let body = '';
    if (st.isSymbolicLink()) body = `-> ${await readlink(abs)}`;
    else if (st.isFile()) body = `${st.size} ${await fileHash(abs)}`;
    else if (st.isCharacterDevice() || st.isBlockDevice()) body = `dev ${st.rdev}`;
    h.update(`${rel || '.'}\0${st.mode.toString(8)}\0${st.uid}:${st.gid}\0${body}\n`);
    if (st.isDirectory()) {
      const names = (await readdir(abs)).sort();
      for (const name of names) await walk(rel ? `${rel}/${name}` : name);
    }
  };
  await walk('');
  return `sha256:${h.digest('hex')}`;
}
