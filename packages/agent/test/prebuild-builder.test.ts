/**
 * Prebuilds against the real crun sandbox and real git servers: built once from a private
 * repository, boxes from it are copy-on-write clones (root and /workspace), the prebuild never
 * changes, and nothing of a build or a box is left behind.
 */
import { execFileSync } from 'node:child_process';
import { existsSync, lstatSync } from 'node:fs';
import { mkdir, readdir, rm } from 'node:fs/promises';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { BuiltinImageStore, type BuiltImage } from '@devyard/agent/images/builtin-image-store';
import { treeDigest } from '@devyard/agent/images/tree-digest';
import { PrebuildBuilder, PrebuildError, type Prebuild, type PrebuildRequest } from '@devyard/agent/prebuilds/prebuild-builder';
import type { BoxRuntimeSpec } from '@devyard/agent/runtime/runtime-driver';
import type { SandboxDriver } from '@devyard/agent/runtime/sandbox/sandbox-driver';
import { boxLeftovers, run, startBox, testBoxSpec, testDriver } from './sandbox-test-host.js';
import { GitFixture } from './workspace-git-fixture.js';

/** Content, ownership, device numbers and xattrs of a tree (treeDigest does not cover xattrs). */
async function fingerprint(dir: string): Promise<string> {
  const xattrs = execFileSync('getfattr', ['-R', '-P', '-d', '-m', '-', '--absolute-names', dir], { encoding: 'utf8' });
  return `${await treeDigest(dir)}\n${xattrs}`;
}

describe('prebuild builder', () => {
  let driver: SandboxDriver;
  let dataDir: string;
  let image: BuiltImage;
  let fx: GitFixture;
  let builder: PrebuildBuilder;
  let req: PrebuildRequest;
  let pb: Prebuild;
  let buildMs = 0;
  const boxes = new Set<string>();

  const spec = (boxId: string, from?: Prebuild): BoxRuntimeSpec => {
    boxes.add(boxId);
    return testBoxSpec(boxId, image, {
      env: { USER_SECRET: 'only-in-user-boxes' },
      ...(from ? { layers: [from.rootfsLayer], workspaceBase: from.workspaceBase } : {}),
    });
  };
  const up = (s: BoxRuntimeSpec) => startBox(driver, s);
  const grepHost = (needle: string, dir: string): string => {
    try {
      return execFileSync('grep', ['-rl', '--', needle, dir], { encoding: 'utf8' });
    } catch (e) {
      if ((e as { status?: number }).status === 1) return '';
      throw e;
    }
  };

  beforeAll(async () => {
    ({ driver, dataDir } = await testDriver('pb', 236));
    await driver.init();
    image = await new BuiltinImageStore({ dataDir }).ensure('tiny');
    fx = await GitFixture.start();
    builder = new PrebuildBuilder({ driver, dataDir });
    req = {
      image,
      repository: { url: `${fx.httpUrl}/secret-app.git`, ref: 'main', credentials: fx.credentials },
      hooks: {
        // Root-filesystem changes of every kind a layer must carry: a new file, a whiteout, an
        // opaque directory; plus workspace changes next to the checkout.
        onCreate: {
          root: 'echo installed > /etc/tool.conf && rm /bin/vi && rm -r /usr/sbin && mkdir /usr/sbin && echo x > /usr/sbin/only-tool',
          deps: './build.sh && mkdir -p node_modules/dep && echo dep > node_modules/dep/index.js && echo "$TEMPLATE_ENV" > template-env.txt',
        },
        updateContent: 'echo updated > updated.txt; echo done-updating',
      },
      env: { TEMPLATE_ENV: 'from-template' },
    };
  });

  afterAll(async () => {
    for (const id of boxes) await driver.destroy(id);
    for (const id of boxes) expect(boxLeftovers(driver, dataDir, id)).toEqual([]);
    expect(await readdir(join(dataDir, 'boxes'))).toEqual([]);
    await driver.teardownHost();
    await rm(dataDir, { recursive: true, force: true });
    await fx.close();
  });

  test('builds once: checkout, hooks, captured layer and workspace; the build box is gone', async () => {
    const lines: string[] = [];
    const t0 = performance.now();
    pb = await builder.build(req, (l) => lines.push(l));
    buildMs = performance.now() - t0;
    console.log(`prebuild build ${buildMs.toFixed(0)} ms`);
    expect(pb.commit).toBe(fx.commits.c2);
    expect(pb.reused).toBe(false);
    expect(pb.id).toMatch(/^[0-9a-f]{64}$/);
    expect(pb.rootfsLayer).toBe(join(dataDir, 'prebuilds', pb.id, 'rootfs-layer'));
    expect(lines).toContain('done-updating');
    expect(lines.some((l) => l.startsWith('git: '))).toBe(true);
    expect(pb.logTail).toContain('done-updating');
    // The layer holds exactly the root changes, with overlay's whiteout and opaque markers.
    expect(execFileSync('cat', [join(pb.rootfsLayer, 'etc/tool.conf')], { encoding: 'utf8' })).toBe('installed\n');
    const wh = lstatSync(join(pb.rootfsLayer, 'bin/vi'));
    expect([wh.isCharacterDevice(), wh.rdev]).toEqual([true, 0]);
    expect(execFileSync('getfattr', ['--absolute-names', '-n', 'trusted.overlay.opaque', '--only-values', join(pb.rootfsLayer, 'usr/sbin')], { encoding: 'utf8' })).toBe('y');
    expect(lstatSync(join(pb.rootfsLayer, 'etc/tool.conf')).uid).toBe(100_000);
    expect(existsSync(join(pb.workspaceBase, 'secret-app/.git'))).toBe(true);
    expect((await readdir(join(pb.workspaceBase, 'secret-app'))).sort()).toEqual(['.git', 'README', 'build.sh', 'built.txt', 'node_modules', 'template-env.txt', 'updated.txt']);
    // Only the finished prebuild remains: no build box, no temp dir; no credential anywhere in it.
    expect(await readdir(join(dataDir, 'boxes'))).toEqual([]);
    expect(await readdir(join(dataDir, 'prebuilds'))).toEqual([pb.id]);
    const b64 = Buffer.from(`${fx.credentials.username}:${fx.credentials.password}`).toString('base64');
    expect(grepHost(fx.credentials.password, join(dataDir, 'prebuilds'))).toBe('');
    expect(grepHost(b64, join(dataDir, 'prebuilds'))).toBe('');
  });

  test('boxes from the prebuild are copy-on-write clones that never change it', async () => {
    const before = [await fingerprint(pb.rootfsLayer), await fingerprint(pb.workspaceBase)];
    const t0 = performance.now();
    await up(spec('p_one', pb));
    const fromPrebuildMs = performance.now() - t0;
    const t1 = performance.now();
    await up(spec('p_plain'));
    const plainMs = performance.now() - t1;
    console.log(`create+start from prebuild ${fromPrebuildMs.toFixed(0)} ms, plain ${plainMs.toFixed(0)} ms`);

    const seen = await run(driver, 'p_one', [
      'sh',
      '-c',
      'cat /etc/tool.conf; test -e /bin/vi || echo no-vi; ls /usr/sbin; cd /workspace/secret-app && cat README built.txt updated.txt template-env.txt node_modules/dep/index.js',
    ]);
    expect(seen.out).toBe('installed\nno-vi\nonly-tool\nv2\nbuilt\nupdated\nfrom-template\ndep\n');
    const w = await run(driver, 'p_one', ['sh', '-c', 'echo mine > /etc/tool.conf && echo mine >> /workspace/secret-app/README && rm -r /workspace/secret-app/node_modules && echo new > /workspace/new.txt && touch /usr/sbin/extra && echo ok']);
    expect(w.out).toBe('ok\n');
    expect([await fingerprint(pb.rootfsLayer), await fingerprint(pb.workspaceBase)]).toEqual(before);

    await up(spec('p_two', pb));
    const other = await run(driver, 'p_two', ['sh', '-c', 'cat /etc/tool.conf /workspace/secret-app/README; ls /workspace; ls /usr/sbin; ls /workspace/secret-app/node_modules']);
    expect(other.out).toBe('installed\nv2\nsecret-app\nonly-tool\ndep\n');

    await driver.stop('p_one', { graceMs: 1000 });
    await driver.start(spec('p_one', pb));
    const again = await run(driver, 'p_one', ['sh', '-c', 'cat /etc/tool.conf /workspace/secret-app/README /workspace/new.txt; ls /workspace/secret-app/node_modules 2>&1 >/dev/null | wc -l']);
    expect(again.out).toBe('mine\nv2\nmine\nnew\n1\n');
    // A user box's env (its secrets) never reaches the prebuild.
    expect(grepHost('only-in-user-boxes', join(dataDir, 'prebuilds'))).toBe('');

    for (const id of ['p_one', 'p_two', 'p_plain']) {
      await driver.destroy(id);
      expect(boxLeftovers(driver, dataDir, id)).toEqual([]);
      boxes.delete(id);
    }
    expect([await fingerprint(pb.rootfsLayer), await fingerprint(pb.workspaceBase)]).toEqual(before);
    expect(await readdir(join(dataDir, 'boxes'))).toEqual([]);
  });

  test('the same prebuild again is reused; a new commit makes a new one; concurrent builds dedupe', async () => {
    const t0 = performance.now();
    const again = await builder.build(req);
    console.log(`prebuild reuse ${(performance.now() - t0).toFixed(0)} ms`);
    expect(again).toMatchObject({ id: pb.id, commit: pb.commit, reused: true });
    expect(await new PrebuildBuilder({ driver, dataDir }).get(pb.id)).toMatchObject({ id: pb.id, reused: true });

    const c4 = await fx.pushCommit('README', 'v3\n');
    const light: PrebuildRequest = { ...req, hooks: { onCreate: 'echo light > light.txt' } };
    const logs: string[][] = [[], []];
    const [a, b] = await Promise.all([builder.build(light, (l) => logs[0]!.push(l)), builder.build(light, (l) => logs[1]!.push(l))]);
    expect(a.id).toBe(b.id);
    expect(a.id).not.toBe(pb.id);
    expect(a.commit).toBe(c4);
    expect([a.reused, b.reused].sort()).toEqual([false, true]);
    expect([...logs[0]!, ...logs[1]!].filter((l) => l === 'running onCreate')).toHaveLength(1);
    expect((await readdir(join(dataDir, 'prebuilds'))).sort()).toEqual([pb.id, a.id].sort());
    expect(execFileSync('cat', [join(a.workspaceBase, 'secret-app/README')], { encoding: 'utf8' })).toBe('v3\n');
    await builder.remove(a.id);
    expect(await readdir(join(dataDir, 'prebuilds'))).toEqual([pb.id]);
  });

  test('a failed build leaves nothing usable and nothing behind', async () => {
    const bad: PrebuildRequest = { ...req, hooks: { onCreate: 'echo partial > /etc/partial; echo about-to-fail; exit 4' } };
    const err = await builder.build(bad).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(PrebuildError);
    expect((err as PrebuildError).message).toMatch(/onCreate exited 4/);
    expect((err as PrebuildError).logTail).toContain('about-to-fail');
    expect(await readdir(join(dataDir, 'prebuilds'))).toEqual([pb.id]);
    expect(await readdir(join(dataDir, 'boxes'))).toEqual([]);
    const badRef = await builder.build({ ...req, repository: { ...req.repository, ref: 'no-such-branch' } }).catch((e: unknown) => e);
    expect((badRef as { code?: string }).code).toBe('UNKNOWN_REF');
    const noAuth = await builder.build({ ...req, repository: { ...req.repository, credentials: { username: 'x', password: 'wrong' } } }).catch((e: unknown) => e);
    expect((noAuth as { code?: string }).code).toBe('AUTH_FAILED');
    expect(await readdir(join(dataDir, 'prebuilds'))).toEqual([pb.id]);
    // What a crash mid-capture leaves is not a prebuild, and sweep removes it.
    await mkdir(join(dataDir, 'prebuilds', `.tmp-${'a'.repeat(64)}-0000`, 'workspace'), { recursive: true });
    expect(await builder.get('a'.repeat(64))).toBeUndefined();
    await builder.sweep();
    expect(await readdir(join(dataDir, 'prebuilds'))).toEqual([pb.id]);
  });
});
