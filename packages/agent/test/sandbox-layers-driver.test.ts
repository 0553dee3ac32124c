/**
 * Extra read-only root layers and a copy-on-write /workspace in the sandbox driver, against the real
 * crun and overlayfs: layer whiteouts and opaque directories take effect, nothing a box writes
 * reaches a layer, and the workspace overlay is mounted only inside the box's private namespace.
 */
import { execFileSync } from 'node:child_process';
import { existsSync, readFileSync } from 'node:fs';
import { mkdir, mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { BuiltinImageStore, type BuiltImage } from '@devyard/agent/images/builtin-image-store';
import { treeDigest } from '@devyard/agent/images/tree-digest';
import type { BoxRuntimeSpec } from '@devyard/agent/runtime/runtime-driver';
import type { SandboxDriver } from '@devyard/agent/runtime/sandbox/sandbox-driver';
import { boxLeftovers, run, startBox, testBoxSpec, testDriver } from './sandbox-test-host.js';

const ROOT = 100_000;

describe('sandbox driver: layers and workspace base', () => {
  let driver: SandboxDriver;
  let dataDir: string;
  let image: BuiltImage;
  let layer: string;
  let base: string;
  const boxes = new Set<string>();

  const spec = (boxId: string, over: Partial<BoxRuntimeSpec> = {}): BoxRuntimeSpec => {
    boxes.add(boxId);
    return testBoxSpec(boxId, image, over);
  };
  const up = (s: BoxRuntimeSpec) => startBox(driver, s);

  beforeAll(async () => {
    ({ driver, dataDir } = await testDriver('lay', 234));
    await driver.init();
    image = await new BuiltinImageStore({ dataDir }).ensure('tiny');
    // A layer the way an overlay upper records changes: a new file, a whiteout (char device 0/0)
    // hiding an image file, and an opaque directory hiding everything the image has there.
    layer = await mkdtemp(join(dataDir, 'layer-'));
    await mkdir(join(layer, 'etc'));
    await writeFile(join(layer, 'etc/from-layer'), 'layer\n');
    await mkdir(join(layer, 'bin'));
    execFileSync('mknod', [join(layer, 'bin/vi'), 'c', '0', '0']);
    await mkdir(join(layer, 'usr/sbin'), { recursive: true });
    await writeFile(join(layer, 'usr/sbin/only-me'), '');
    execFileSync('setfattr', ['-n', 'trusted.overlay.opaque', '-v', 'y', join(layer, 'usr/sbin')]);
    execFileSync('chown', ['-hR', `${ROOT}:${ROOT}`, layer]);
    execFileSync('chmod', ['755', layer]);
    base = await mkdtemp(join(dataDir, 'wsbase-'));
    await mkdir(join(base, 'repo'));
    await writeFile(join(base, 'repo/README'), 'from base\n');
    execFileSync('chown', ['-hR', `${ROOT}:${ROOT}`, base]);
    execFileSync('chmod', ['755', base]);
  });

  afterAll(async () => {
    for (const id of boxes) await driver.destroy(id);
    for (const id of boxes) expect(boxLeftovers(driver, dataDir, id)).toEqual([]);
    await driver.teardownHost();
    await rm(dataDir, { recursive: true, force: true });
  });

  test('a layer adds files, its whiteouts and opaque dirs hide image content; writes stay out of it', async () => {
    const layerDigest = await treeDigest(layer);
    await up(spec('l_root', { layers: [layer] }));
    const r = await run(driver, 'l_root', ['sh', '-c', 'cat /etc/from-layer; ls /usr/sbin; test -e /bin/vi && echo vi-present; head -1 /etc/passwd']);
    expect(r.out).toBe('layer\nonly-me\nroot:x:0:0:root:/root:/bin/sh\n');
    const w = await run(driver, 'l_root', ['sh', '-c', 'echo box > /etc/from-layer && rm /usr/sbin/only-me && touch /usr/sbin/new && echo ok']);
    expect(w.out).toBe('ok\n');
    expect(await readFile(join(layer, 'etc/from-layer'), 'utf8')).toBe('layer\n');
    expect(await treeDigest(layer)).toBe(layerDigest);
    expect(await treeDigest(image.rootfs)).toBe(image.digest);
    // A box without the layer sees the plain image.
    await up(spec('l_plain'));
    const p = await run(driver, 'l_plain', ['sh', '-c', 'test -e /etc/from-layer || echo no-layer; test -e /bin/vi && echo vi-present']);
    expect(p.out).toBe('no-layer\nvi-present\n');
  });

  test('workspaceBase: /workspace is a copy-on-write clone that survives stop/start', async () => {
    const baseDigest = await treeDigest(base);
    const s1 = spec('l_ws1', { workspaceBase: base });
    await up(s1);
    await up(spec('l_ws2', { workspaceBase: base }));
    const r = await run(driver, 'l_ws1', ['sh', '-c', 'cat /workspace/repo/README; echo mine >> /workspace/repo/README; echo new > /workspace/new; rm -r /workspace/repo; mkdir /workspace/repo; stat -c %u /workspace; echo ok']);
    expect(r.out).toBe('from base\n0\nok\n');
    // The base, the second box and the host mount table are untouched.
    expect(await treeDigest(base)).toBe(baseDigest);
    const other = await run(driver, 'l_ws2', ['sh', '-c', 'cat /workspace/repo/README; ls /workspace']);
    expect(other.out).toBe('from base\nrepo\n');
    expect(readFileSync('/proc/mounts', 'utf8')).not.toContain(join(dataDir, 'boxes'));
    await driver.stop('l_ws1', { graceMs: 1000 });
    await driver.start(s1);
    const again = await run(driver, 'l_ws1', ['sh', '-c', 'ls -A /workspace /workspace/repo; echo --; cat /workspace/new']);
    // The opaque directory the box made over the base's repo/ hides the base's README for good.
    expect(again.out).toBe('/workspace:\nnew\nrepo\n\n/workspace/repo:\n--\nnew\n');
    // Only the box's own changes are in its volume.
    expect(existsSync(join(dataDir, 'boxes/l_ws1/volume/workspace/new'))).toBe(true);
    await driver.destroy('l_ws1');
    await driver.destroy('l_ws2');
    expect(boxLeftovers(driver, dataDir, 'l_ws1')).toEqual([]);
    expect(await treeDigest(base)).toBe(baseDigest);
  });

  test('bad layer paths are refused before anything is created', async () => {
    await expect(driver.create(spec('l_bad', { layers: ['relative/dir'] }))).rejects.toThrow(/absolute/);
    await expect(driver.create(spec('l_bad', { layers: [`${layer},x`] }))).rejects.toThrow(/commas/);
    await expect(driver.create(spec('l_bad', { workspaceBase: join(dataDir, 'missing') }))).rejects.toThrow(/does not exist/);
    expect(existsSync(join(dataDir, 'boxes/l_bad'))).toBe(false);
  });
});
