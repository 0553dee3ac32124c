/**
 * Recipe images against the real crun sandbox: commands run in a temporary box, whose overlay
 * upper is flattened onto a copy of the base (files, whiteouts, opaque directories), cached by
 * recipe digest, and usable as a box image; failures cache nothing; no build box is left behind.
 */
import { execFileSync } from 'node:child_process';
import { existsSync, lstatSync, readFileSync } from 'node:fs';
import { readdir, rm } from 'node:fs/promises';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { BuiltinImageStore } from '@devyard/agent/images/builtin-image-store';
import { ImageResolver } from '@devyard/agent/images/image-resolver';
import {
  RecipeBuildError,
  RecipeImageBuilder,
  recipeDigest,
  type BuildRecipe,
  type RecipeBuildDriver,
  type RecipeImage,
} from '@devyard/agent/images/recipe-image-builder';
import { treeDigest } from '@devyard/agent/images/tree-digest';
import type { BoxRuntimeSpec } from '@devyard/agent/runtime/runtime-driver';
import type { SandboxDriver } from '@devyard/agent/runtime/sandbox/sandbox-driver';
import { boxLeftovers, run, testBoxSpec, testDriver } from './sandbox-test-host.js';

let driver: SandboxDriver;
let dataDir: string;
let builtin: BuiltinImageStore;
let builder: RecipeImageBuilder;
let resolver: ImageResolver;
/** Temporary build boxes the builder created, and boxes the tests created. */
const buildBoxes: string[] = [];
const boxes = new Set<string>();

const oci = { ensure: () => Promise.reject(new Error('no registry in this test')), list: async () => [] };

const spec = (boxId: string, image: RecipeImage): BoxRuntimeSpec => {
  boxes.add(boxId);
  return testBoxSpec(boxId, image, { resources: { cpuMillis: 1000, memoryBytes: 256 << 20, pids: 256 } });
};

/** Nothing of a build is left: no box dirs, crun containers, netns, veths, cgroups, temp dirs. */
async function expectNoBuildLeftovers(): Promise<void> {
  for (const id of buildBoxes) expect(boxLeftovers(driver, dataDir, id)).toEqual([]);
  expect((await driver.list()).filter((b) => b.boxId.startsWith('rb_'))).toEqual([]);
  expect((await readdir(join(dataDir, 'recipes'))).filter((n) => n.startsWith('.'))).toEqual([]);
}

function overlayXattrsUnder(dir: string): string {
  return execFileSync('getfattr', ['-R', '-P', '-h', '-d', '-m', '^trusted\\.overlay\\.', '--absolute-names', dir], { encoding: 'utf8' });
}

beforeAll(async () => {
  ({ driver, dataDir } = await testDriver('rcp', 238));
  await driver.init();
  builtin = new BuiltinImageStore({ dataDir });
  const counting: RecipeBuildDriver = {
    create: (s) => {
      buildBoxes.push(s.boxId);
      return driver.create(s);
    },
    start: (s) => driver.start(s),
    stop: (id, o) => driver.stop(id, o),
    destroy: (id) => driver.destroy(id),
    exec: (id, o) => driver.exec(id, o),
    boxHostPaths: (id) => driver.boxHostPaths(id),
  };
  // The builder's own resolver has no recipes: a recipe's `from` is always a plain image.
  builder = new RecipeImageBuilder({ dataDir, driver: counting, base: new ImageResolver({ builtin, oci }) });
  resolver = new ImageResolver({ builtin, oci, recipes: builder });
});

afterAll(async () => {
  if (!driver) return;
  for (const id of boxes) await driver.destroy(id);
  for (const id of [...boxes, ...buildBoxes]) expect(boxLeftovers(driver, dataDir, id)).toEqual([]);
  expect(await readdir(join(dataDir, 'boxes'))).toEqual([]);
  await driver.teardownHost();
  await rm(dataDir, { recursive: true, force: true });
});

describe('recipe images on tiny', () => {
  const recipe: BuildRecipe = {
    from: 'tiny',
    run: [
      'echo hello > /etc/recipe.txt && mkdir -p /opt/tool && echo v1 > /opt/tool/version && chown 1000:1000 /opt/tool/version',
      // A deleted file (whiteout), a replaced directory (opaque), a file that became a directory
      // and a directory that became a file.
      'rm /bin/vi && rm -rf /usr/sbin && mkdir /usr/sbin && touch /usr/sbin/new',
      'rm /etc/group && mkdir /etc/group && touch /etc/group/x && rm -rf /var && echo f > /var',
      'echo to-stderr >&2; echo line-out; touch /etc/machine-id',
    ],
  };
  let image: RecipeImage;
  let baseDigestBefore: string;

  test('builds the recipe: files, whiteouts, opaque dirs, ownership; the build box is gone', async () => {
    const tiny = await builtin.ensure('tiny');
    baseDigestBefore = await treeDigest(tiny.rootfs);
    const lines: string[] = [];
    const t0 = performance.now();
    image = await resolver.ensure(recipe, (l) => lines.push(l)) as RecipeImage;
    const ms = performance.now() - t0;
    console.log(`tiny recipe build ${ms.toFixed(0)} ms`);
    expect(image.digest).toBe(recipeDigest(tiny.digest, recipe));
    expect(image.name).toBe(`recipe:${image.digest.slice(7, 19)}`);
    expect(image.rootfs).toBe(join(dataDir, 'recipes', image.digest.slice(7), 'rootfs'));
    expect(lines).toContain('build: line-out');
    expect(lines).toContain('build: to-stderr');
    expect(buildBoxes).toHaveLength(1);

    const r = image.rootfs;
    expect(readFileSync(join(r, 'etc/recipe.txt'), 'utf8')).toBe('hello\n');
    expect(lstatSync(join(r, 'etc/recipe.txt')).uid).toBe(100_000);
    expect([lstatSync(join(r, 'opt/tool/version')).uid, lstatSync(join(r, 'opt/tool/version')).gid]).toEqual([101_000, 101_000]);
    expect(existsSync(join(r, 'bin/vi'))).toBe(false);
    expect(lstatSync(join(r, 'bin/busybox')).isFile()).toBe(true);
    expect(lstatSync(join(r, 'bin/sh')).isSymbolicLink()).toBe(true);
    expect(await readdir(join(r, 'usr/sbin'))).toEqual(['new']);
    expect(await readdir(join(r, 'etc/group'))).toEqual(['x']);
    expect(readFileSync(join(r, 'var'), 'utf8')).toBe('f\n');
    expect(existsSync(join(r, 'etc/machine-id'))).toBe(false);
    // No whiteout device or overlay marker survives into an image other overlays will stack on.
    expect(execFileSync('find', [r, '-type', 'c'], { encoding: 'utf8' })).toBe('');
    expect(overlayXattrsUnder(r)).toBe('');
    // Every entry belongs to the box's host id range, like the base it came from.
    expect(execFileSync('find', [r, '(', '-uid', '-100000', '-o', '-uid', '+165535', '-o', '-gid', '-100000', '-o', '-gid', '+165535', ')'], { encoding: 'utf8' })).toBe('');
    expect(lstatSync(r).uid).toBe(100_000);
    // The base image is untouched.
    expect(await treeDigest(tiny.rootfs)).toBe(baseDigestBefore);
    expect(await readdir(join(dataDir, 'recipes'))).toEqual([image.digest.slice(7)]);
    await expectNoBuildLeftovers();
    expect(await builder.list()).toEqual([{ name: image.name, digest: image.digest }]);
    expect((await resolver.list()).map((i) => i.name)).toEqual(['tiny', image.name]);
  });

  test('building again is a cache hit: no box, same image', async () => {
    const before = buildBoxes.length;
    const t0 = performance.now();
    const again = await builder.ensure({ ...recipe, run: [...recipe.run!] });
    console.log(`tiny recipe cache hit ${(performance.now() - t0).toFixed(1)} ms`);
    expect(again).toEqual(image);
    expect(buildBoxes.length).toBe(before);
  });

  test('concurrent ensures of one recipe build it once', async () => {
    const before = buildBoxes.length;
    const r2: BuildRecipe = { from: 'tiny', run: ['echo two > /etc/two'] };
    const [a, b] = await Promise.all([builder.ensure(r2), builder.ensure(r2)]);
    expect(a).toEqual(b);
    expect(buildBoxes.length).toBe(before + 1);
    expect(readFileSync(join(a.rootfs, 'etc/two'), 'utf8')).toBe('two\n');
    // Package order does not matter for identity; command order does.
    expect(recipeDigest('sha256:x', { from: 'tiny', packages: ['b', 'a'] })).toBe(recipeDigest('sha256:x', { from: 'tiny', packages: ['a', 'b'] }));
    expect(recipeDigest('sha256:x', { from: 'tiny', run: ['a', 'b'] })).not.toBe(recipeDigest('sha256:x', { from: 'tiny', run: ['b', 'a'] }));
    await expectNoBuildLeftovers();
  });

  test('a box from the recipe image sees the results', async () => {
    const s = spec('rcp_box1', image);
    await driver.create(s);
    await driver.start(s);
    const r = await run(driver, 'rcp_box1', ['/bin/sh', '-c', 'cat /etc/recipe.txt; ls /usr/sbin; ls /bin/vi 2>/dev/null || echo no-vi; stat -c %u /opt/tool/version; cat /var']);
    expect(r.code).toBe(0);
    expect(r.out).toBe('hello\nnew\nno-vi\n1000\nf\n');
    // The image stays read-only under the box.
    await run(driver, 'rcp_box1', ['/bin/sh', '-c', 'echo changed > /etc/recipe.txt']);
    expect(readFileSync(join(image.rootfs, 'etc/recipe.txt'), 'utf8')).toBe('hello\n');
    await driver.destroy('rcp_box1');
    expect(boxLeftovers(driver, dataDir, 'rcp_box1')).toEqual([]);
  });

  test('a failing command gives RecipeBuildError with the log tail and caches nothing', async () => {
    const listed = await builder.list();
    const err = await builder
      .ensure({ from: 'tiny', run: ['echo before-fail > /etc/x', 'echo about-to-fail; exit 3', 'echo never'] })
      .catch((e: unknown) => e);
    expect(err).toBeInstanceOf(RecipeBuildError);
    const e = err as RecipeBuildError;
    expect(e.step).toBe('run[1]');
    expect(e.message).toContain('exited 3');
    expect(e.logTail).toContain('build: about-to-fail');
    expect(e.logTail.join('\n')).not.toContain('never');
    expect(e.logTail.length).toBeLessThanOrEqual(20);
    expect(await builder.list()).toEqual(listed);
    await expectNoBuildLeftovers();
  });

  test('packages on an image without apt-get fail clearly', async () => {
    const err = await builder.ensure({ from: 'tiny', packages: ['jq'] }).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(RecipeBuildError);
    expect((err as RecipeBuildError).step).toBe('packages');
    expect((err as RecipeBuildError).message).toMatch(/no apt-get/);
    const bad = await builder.ensure({ from: 'tiny', packages: ['jq; rm -rf /'] }).catch((e: unknown) => e);
    expect((bad as RecipeBuildError).message).toMatch(/invalid Debian package name/);
    await expectNoBuildLeftovers();
  });
});

describe('recipe images on base (Debian)', () => {
  let image: RecipeImage;

  beforeAll(async () => {
    const t0 = performance.now();
    await builtin.ensure('base');
    console.log(`base image ${((performance.now() - t0) / 1000).toFixed(1)} s`);
  }, 600_000);

  test('installs a package from the Debian archive; a box from the image runs it', async () => {
    const lines: string[] = [];
    const t0 = performance.now();
    image = await builder.ensure({ from: 'base', packages: ['jq'], run: ['jq --version > /etc/jq-version'] }, (l) => lines.push(l));
    console.log(`base+jq recipe build ${((performance.now() - t0) / 1000).toFixed(1)} s`);
    expect(lines.some((l) => /Setting up jq/.test(l))).toBe(true);
    const r = image.rootfs;
    expect(lstatSync(join(r, 'usr/bin/jq')).uid).toBe(100_000);
    expect(readFileSync(join(r, 'etc/jq-version'), 'utf8')).toMatch(/^jq-1\./);
    // apt's lists and archives were cleaned; no identity was baked in.
    expect((await readdir(join(r, 'var/lib/apt/lists'))).filter((f) => f !== 'partial' && f !== 'lock')).toEqual([]);
    expect((await readdir(join(r, 'var/cache/apt/archives'))).filter((f) => f.endsWith('.deb'))).toEqual([]);
    expect(existsSync(join(r, 'etc/machine-id'))).toBe(false);
    expect(overlayXattrsUnder(r)).toBe('');
    // setuid bits of the base survive the copy.
    expect(lstatSync(join(r, 'usr/bin/su')).mode & 0o4000).toBe(0o4000);
    await expectNoBuildLeftovers();

    const s = spec('rcp_jq1', image);
    await driver.create(s);
    await driver.start(s);
    const out = await run(driver, 'rcp_jq1', ['bash', '-c', 'jq --version && echo \'{"a":41}\' | jq ".a + 1"']);
    expect(out.code).toBe(0);
    expect(out.out).toMatch(/^jq-1\.\S+\n42\n$/);
    await driver.destroy('rcp_jq1');
    expect(boxLeftovers(driver, dataDir, 'rcp_jq1')).toEqual([]);
  }, 600_000);
});
