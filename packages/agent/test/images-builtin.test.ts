import { statSync } from 'node:fs';
import { existsSync } from 'node:fs';
import { lstat, mkdtemp, readdir, rm, stat } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, test } from 'vitest';
import { BuiltinImageStore } from '@devyard/agent/images/builtin-image-store';
import { treeDigest } from '@devyard/agent/images/tree-digest';

describe('built-in tiny image', () => {
  const dirs: string[] = [];
  afterAll(async () => {
    for (const d of dirs) await rm(d, { recursive: true, force: true });
  });

  test('builds once, caches by digest, survives concurrent builds', async () => {
    const dataDir = await mkdtemp(join(tmpdir(), 'dy-img-'));
    dirs.push(dataDir);
    const a = new BuiltinImageStore({ dataDir });
    const b = new BuiltinImageStore({ dataDir });
    expect(a.knownImages()).toEqual(['tiny', 'base']);
    expect(await a.list()).toEqual([]);
    // Two stores (as two agent processes would) build at the same time.
    const [ia, ib] = await Promise.all([a.ensure('tiny'), b.ensure('tiny')]);
    expect(ia.digest).toMatch(/^sha256:[0-9a-f]{64}$/);
    expect(ib.digest).toBe(ia.digest);
    expect(ib.rootfs).toBe(ia.rootfs);
    expect(await readdir(join(dataDir, 'images/store'))).toHaveLength(1);
    expect(await readdir(join(dataDir, 'images/tmp'))).toEqual([]);
    expect(await a.list()).toEqual([{ name: 'tiny', digest: ia.digest }]);
    // The digest is the tree's content digest.
    expect(await treeDigest(ia.rootfs)).toBe(ia.digest);
    // Cached: a second ensure (even by a new store) returns the same tree, it does not rebuild.
    const before = statSync(ia.rootfs);
    const again = await new BuiltinImageStore({ dataDir }).ensure('tiny');
    expect(again).toMatchObject({ digest: ia.digest, rootfs: ia.rootfs });
    expect(statSync(again.rootfs)).toMatchObject({ ino: before.ino, mtimeMs: before.mtimeMs });

    // Layout and uid shift for the box user namespace.
    const root = ia.rootfs;
    for (const d of ['root', 'workspace', 'tmp', 'dev', 'proc', 'sys', 'etc']) expect((await stat(join(root, d))).isDirectory()).toBe(true);
    expect((await stat(join(root, 'tmp'))).mode & 0o7777).toBe(0o1777);
    expect((await lstat(join(root, 'bin/sh'))).isSymbolicLink()).toBe(true);
    expect((await stat(join(root, 'bin/busybox'))).uid).toBe(100000);
    expect((await lstat(join(root, 'bin/sh'))).uid).toBe(100000);
    expect((await stat(join(root, 'etc/passwd'))).gid).toBe(100000);
    expect(existsSync(join(root, 'usr/bin/wget'))).toBe(true);
  });

  test('rejects unknown names', async () => {
    const dataDir = await mkdtemp(join(tmpdir(), 'dy-img-'));
    dirs.push(dataDir);
    await expect(new BuiltinImageStore({ dataDir }).ensure('nope' as 'tiny')).rejects.toThrow(/unknown/);
  });
});
