import { lstat, mkdtemp, readdir, readFile, readlink, rm, writeFile } from 'node:fs/promises';
import { existsSync, readFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { DomainError } from '@devyard/core/domain-error';
import { RegistryClient } from '@devyard/oci/registry-client';
import { parseOciReference } from '@devyard/oci/oci-reference';
import { LAYER_EXPANSION_FLOOR_BYTES, OciImageStore } from '@devyard/agent/images/oci-image-store';
import { ImageResolver } from '@devyard/agent/images/image-resolver';
import { OciLayoutBuilder, tarLayer } from '../../oci/test/oci-layout-builder.js';
import { TestRegistry } from '../../oci/test/registry-test-host.js';

const SHIFT = 100_000;
// busybox-static, which make installs (host-packages.json).
const busybox = '/usr/bin/busybox';

describe('OciImageStore against docker-registry', () => {
  let registry: TestRegistry;
  let work: string;
  let appDigest: string;
  let corruptLayer: string;
  const dirs: string[] = [];

  const newDataDir = async () => {
    const d = await mkdtemp(join(work, 'data-'));
    dirs.push(d);
    return d;
  };
  const counting = () => {
    const calls: string[] = [];
    const client = new RegistryClient({
      insecure: () => true,
      fetch: (input, init) => {
        calls.push(String(input));
        return fetch(input, init);
      },
    });
    return { client, blobCalls: () => calls.filter((u) => u.includes('/blobs/')) };
  };
  const ref = (repoTag: string) => `${registry.host}/${repoTag}`;

  beforeAll(async () => {
    work = await mkdtemp(join(tmpdir(), 'devyard-oci-store-'));
    registry = await TestRegistry.start();
    const layout = new OciLayoutBuilder(join(work, 'layout'));
    const lower = await tarLayer([
      { path: 'bin/', type: 'directory' },
      { path: 'bin/busybox', content: readFileSync(busybox), mode: 0o755 },
      { path: 'bin/sh', type: 'symlink', linkname: 'busybox' },
      { path: 'bin/hardlinked', type: 'link', linkname: 'bin/busybox' },
      { path: 'usr/bin/su', content: '#!/bin/sh\n', mode: 0o4755 },
      { path: 'etc/', type: 'directory' },
      { path: 'etc/passwd', content: 'root:x:0:0::/root:/bin/sh\n' },
      { path: 'home/dev/', type: 'directory', uid: 1000, gid: 1000, mode: 0o750 },
      { path: 'home/dev/notes', content: 'hi', uid: 1000, gid: 1000 },
      { path: 'gone.txt', content: 'deleted by the upper layer' },
      { path: 'opq/', type: 'directory' },
      { path: 'opq/old1', content: '1' },
      { path: 'opq/sub/old2', content: '2' },
      { path: 'rootlink', type: 'symlink', linkname: '/' },
      { path: 'uplink', type: 'symlink', linkname: '../../../..' },
      { path: 'dev/null', type: 'character-device', mode: 0o666 },
      { path: 'fifo', type: 'fifo' },
    ]);
    const upper = await tarLayer([
      { path: '.wh.gone.txt' },
      { path: 'opq/', type: 'directory' },
      { path: 'opq/.wh..wh..opq' },
      { path: 'opq/new', content: 'new' },
      // Written through symlinks pointing at / and above it: must land inside the image root.
      { path: 'rootlink/etc/via-root-link', content: 'inside' },
      { path: 'uplink/etc/via-up-link', content: 'inside' },
      { path: 'big-id', content: 'x', uid: 70_000, gid: 70_000 },
    ]);
    const app = await layout.image([lower, upper]);
    appDigest = app.digest;
    await layout.tag('app', app);
    // skopeo only compresses uncompressed layers, so the zstd variant starts from plain tars.
    await layout.tag('app-raw', await layout.image([lower, upper], { compression: 'none' }));
    await layout.tag('other', await layout.image([await tarLayer([{ path: 'other.txt', content: 'other' }])], { compression: 'none' }));
    const corrupt = await layout.image([await tarLayer([{ path: 'c.txt', content: 'c'.repeat(5000) }])]);
    corruptLayer = JSON.parse(await readFile(join(layout.dir, 'blobs', 'sha256', corrupt.digest.slice(7)), 'utf8')).layers[0].digest;
    await layout.tag('corrupt', corrupt);
    await layout.tag('evil', await layout.image([await tarLayer([{ path: 'ok', content: 'ok' }, { path: '../escaped', content: 'x' }])]));
    // Decompression bombs: zeros compress about a thousand times. A 300 MiB file is a few hundred
    // KB of gzip (past the per-layer expansion bound); the 48 MiB one is only past a small image limit.
    const zeros = (mib: number) => tarLayer([{ path: 'ok', content: 'ok' }, { path: 'zeros', content: Buffer.alloc(mib * 1024 ** 2) }]);
    await layout.tag('bomb', await layout.image([await tarLayer([{ path: 'first', content: '1' }]), await zeros(300)]));
    await layout.tag('big', await layout.image([await zeros(48)], { compression: 'none' }));
    await registry.push(layout.dir, 'app', 'team/app:1');
    await registry.push(layout.dir, 'app-raw', 'team/zapp:1', { zstd: true });
    await registry.push(layout.dir, 'other', 'team/other:1');
    await registry.push(layout.dir, 'corrupt', 'team/corrupt:1');
    await registry.push(layout.dir, 'evil', 'team/evil:1');
    await registry.push(layout.dir, 'bomb', 'team/bomb:1');
    await registry.push(layout.dir, 'big', 'team/zbig:1', { zstd: true });
    // Same length, different bytes: only the digest check can notice.
    const blob = registry.blobPath(corruptLayer);
    const bytes = await readFile(blob);
    bytes[bytes.length - 10] = bytes[bytes.length - 10]! ^ 0xff;
    await writeFile(blob, bytes);
  });

  afterAll(async () => {
    await registry?.stop();
    if (work) await rm(work, { recursive: true, force: true });
  });

  it('pulls and unpacks two layers with whiteouts, links, setuid and shifted ids', async () => {
    const { client } = counting();
    const dataDir = await newDataDir();
    const store = new OciImageStore({ dataDir, registry: client, idShift: SHIFT });
    const lines: string[] = [];
    const image = await store.ensure(ref('team/app:1'), (l) => lines.push(l));
    expect(image.name).toBe(ref('team/app:1'));
    expect(image.digest).toBe(appDigest);
    expect(image.rootfs).toBe(join(dataDir, 'oci', 'rootfs', appDigest.slice(7)));
    expect(image.config.Cmd).toEqual(['/bin/sh']);
    const r = image.rootfs;

    expect(lines).toContainEqual(expect.stringMatching(new RegExp(`^pull ${registry.host}/team/app:1: layer 1/2 \\d+\\.\\d/\\d+\\.\\d MB$`)));
    expect(lines).toContain(`unpack ${registry.host}/team/app:1: layer 2/2`);

    expect((await readFile(join(r, 'bin/busybox'))).equals(readFileSync(busybox))).toBe(true);
    expect(await readlink(join(r, 'bin/sh'))).toBe('busybox');
    expect((await lstat(join(r, 'bin/hardlinked'))).ino).toBe((await lstat(join(r, 'bin/busybox'))).ino);
    const root = await lstat(r);
    expect([root.uid, root.gid]).toEqual([SHIFT, SHIFT]);
    const passwd = await lstat(join(r, 'etc/passwd'));
    expect([passwd.uid, passwd.gid, passwd.mode & 0o7777]).toEqual([SHIFT, SHIFT, 0o644]);
    const home = await lstat(join(r, 'home/dev'));
    expect([home.uid, home.gid, home.mode & 0o7777]).toEqual([SHIFT + 1000, SHIFT + 1000, 0o750]);
    expect((await lstat(join(r, 'home/dev/notes'))).uid).toBe(SHIFT + 1000);
    expect((await lstat(join(r, 'usr/bin/su'))).mode & 0o7777).toBe(0o4755);
    expect((await lstat(join(r, 'bin/sh'))).uid).toBe(SHIFT);
    expect((await lstat(join(r, 'big-id'))).uid).toBe(SHIFT + 65_534);

    expect(existsSync(join(r, 'gone.txt'))).toBe(false);
    expect((await readdir(join(r, 'opq'))).sort()).toEqual(['new']);
    expect(await readFile(join(r, 'etc/via-root-link'), 'utf8')).toBe('inside');
    expect(await readFile(join(r, 'etc/via-up-link'), 'utf8')).toBe('inside');
    expect(existsSync('/etc/via-root-link') || existsSync('/etc/via-up-link')).toBe(false);
    expect(existsSync(join(r, 'dev/null'))).toBe(false);
    expect(existsSync(join(r, 'fifo'))).toBe(false);

    expect(await store.list()).toEqual([{ name: ref('team/app:1'), digest: appDigest }]);
    expect(await readdir(join(dataDir, 'oci', 'tmp'))).toEqual([]);
  });

  it('serves a cached image without downloading blobs again, also from a new store instance', async () => {
    const dataDir = await newDataDir();
    const first = counting();
    const a = await new OciImageStore({ dataDir, registry: first.client, idShift: SHIFT }).ensure(ref('team/app:1'));
    const blobsFirst = first.blobCalls().length;
    expect(blobsFirst).toBe(3); // config + 2 layers
    const again = counting();
    const store = new OciImageStore({ dataDir, registry: again.client, idShift: SHIFT });
    const lines: string[] = [];
    const b = await store.ensure(ref('team/app:1'), (l) => lines.push(l));
    expect(b).toEqual(a);
    expect(again.blobCalls()).toEqual([expect.stringContaining('/blobs/')]); // the config only
    expect(lines.filter((l) => l.startsWith('pull ') || l.startsWith('unpack '))).toEqual([]);
    // Pinned by digest: no registry traffic at all.
    const pinned = counting();
    const c = await new OciImageStore({ dataDir, registry: pinned.client, idShift: SHIFT }).ensure(ref(`team/app:1@${appDigest}`));
    expect(c.rootfs).toBe(a.rootfs);
    expect((await new OciImageStore({ dataDir, registry: pinned.client, idShift: SHIFT }).ensure(ref(`team/app:1@${appDigest}`))).rootfs).toBe(a.rootfs);
    expect(pinned.blobCalls().length).toBe(1);
    // Registry unreachable: a tag falls back to the digest it last resolved to.
    const offline = new RegistryClient({ insecure: () => true, fetch: () => Promise.reject(new TypeError('fetch failed', { cause: { code: 'ECONNREFUSED' } })) });
    const lines2: string[] = [];
    expect((await new OciImageStore({ dataDir, registry: offline, idShift: SHIFT }).ensure(ref('team/app:1'), (l) => lines2.push(l))).rootfs).toBe(a.rootfs);
    expect(lines2).toEqual([`pull ${ref('team/app:1')}: registry unreachable, using cached ${appDigest}`]);
    await expect(new OciImageStore({ dataDir, registry: offline, idShift: SHIFT }).ensure(ref('team/other:1'))).rejects.toMatchObject({ code: 'unavailable' });
  });

  it('unpacks zstd layers to the same tree', async () => {
    const { client } = counting();
    const resolved = await client.resolve(parseOciReference(ref('team/zapp:1')));
    expect(resolved.manifest.layers.map((l) => l.mediaType)).toEqual(Array(2).fill('application/vnd.oci.image.layer.v1.tar+zstd'));
    const store = new OciImageStore({ dataDir: await newDataDir(), registry: client, idShift: SHIFT });
    const image = await store.ensure(ref('team/zapp:1'));
    expect(image.digest).toBe(resolved.digest);
    expect((await readFile(join(image.rootfs, 'bin/busybox'))).equals(readFileSync(busybox))).toBe(true);
    expect((await readdir(join(image.rootfs, 'opq'))).sort()).toEqual(['new']);
    expect((await lstat(join(image.rootfs, 'usr/bin/su'))).mode & 0o7777).toBe(0o4755);
  });

  it('rejects a layer whose bytes do not match its digest, and caches nothing', async () => {
    const dataDir = await newDataDir();
    const store = new OciImageStore({ dataDir, registry: counting().client, idShift: SHIFT });
    const err = await store.ensure(ref('team/corrupt:1')).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(DomainError);
    expect((err as DomainError).code).toBe('invalid-input');
    expect((err as DomainError).message).toMatch(/layer 1\/1 digest mismatch .*the download was discarded/);
    expect(await readdir(join(dataDir, 'oci', 'blobs', 'sha256'))).toEqual([]);
    expect(await readdir(join(dataDir, 'oci', 'rootfs'))).toEqual([]);
    expect(await readdir(join(dataDir, 'oci', 'tmp'))).toEqual([]);
    expect(await store.list()).toEqual([]);
  });

  it('refuses a layer entry that escapes the root, leaving no root filesystem behind', async () => {
    const dataDir = await newDataDir();
    const store = new OciImageStore({ dataDir, registry: counting().client, idShift: SHIFT });
    await expect(store.ensure(ref('team/evil:1'))).rejects.toThrow(/entry "\.\.\/escaped" points outside the root filesystem/);
    expect(existsSync(join(dataDir, 'oci', 'escaped'))).toBe(false);
    expect(await readdir(join(dataDir, 'oci', 'rootfs'))).toEqual([]);
    expect(await readdir(join(dataDir, 'oci', 'tmp'))).toEqual([]);
  });

  it('refuses a gzip layer that decompresses far beyond its size, keeping nothing of the image', async () => {
    const dataDir = await newDataDir();
    const { client } = counting();
    const layers = (await client.resolve(parseOciReference(ref('team/bomb:1')))).manifest.layers;
    expect(layers[1]!.size).toBeLessThan(2 * 1024 ** 2);
    const store = new OciImageStore({ dataDir, registry: client, idShift: SHIFT });
    const err = await store.ensure(ref('team/bomb:1')).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(DomainError);
    expect(err).toMatchObject({ code: 'invalid-input', details: { reason: 'decompression-bomb', limit: LAYER_EXPANSION_FLOOR_BYTES } });
    expect((err as Error).message).toMatch(/layer 2 decompresses to more than \d+ bytes \(\d+ compressed\); refused as a decompression bomb/);
    expect(await readdir(join(dataDir, 'oci', 'rootfs'))).toEqual([]);
    expect(await readdir(join(dataDir, 'oci', 'tmp'))).toEqual([]);
    expect(await readdir(join(dataDir, 'oci', 'images'))).toEqual([]);
    // The bomb's own blob is gone; the harmless first layer may stay for gc.
    expect(await readdir(join(dataDir, 'oci', 'blobs', 'sha256'))).not.toContain(layers[1]!.digest.slice(7));
    expect(await store.list()).toEqual([]);
  });

  it("refuses a zstd image over the store's unpacked size limit", async () => {
    const dataDir = await newDataDir();
    const store = new OciImageStore({ dataDir, registry: counting().client, idShift: SHIFT, maxUnpackedBytes: 32 * 1024 ** 2 });
    await expect(store.ensure(ref('team/zbig:1'))).rejects.toMatchObject({
      code: 'invalid-input',
      message: expect.stringMatching(/decompress to more than the image size limit of 33554432 bytes \(at layer 1\)/),
    });
    expect(await readdir(join(dataDir, 'oci', 'rootfs'))).toEqual([]);
    expect(await readdir(join(dataDir, 'oci', 'tmp'))).toEqual([]);
    expect(await readdir(join(dataDir, 'oci', 'blobs', 'sha256'))).toEqual([]);
    // The same image within the limit unpacks.
    const roomy = new OciImageStore({ dataDir: await newDataDir(), registry: counting().client, idShift: SHIFT });
    expect((await lstat(join((await roomy.ensure(ref('team/zbig:1'))).rootfs, 'zeros'))).size).toBe(48 * 1024 ** 2);
  });

  it('dedupes concurrent ensures in one store, and two stores racing on one directory agree', async () => {
    const dataDir = await newDataDir();
    const one = counting();
    const store = new OciImageStore({ dataDir, registry: one.client, idShift: SHIFT });
    const [a, b] = await Promise.all([store.ensure(ref('team/app:1')), store.ensure(ref('team/app:1'))]);
    expect(a).toBe(b);
    expect(one.blobCalls().length).toBe(3);

    const shared = await newDataDir();
    const s1 = new OciImageStore({ dataDir: shared, registry: counting().client, idShift: SHIFT });
    const s2 = new OciImageStore({ dataDir: shared, registry: counting().client, idShift: SHIFT });
    const [x, y] = await Promise.all([s1.ensure(ref('team/app:1')), s2.ensure(ref('team/app:1'))]);
    expect(x.rootfs).toBe(y.rootfs);
    expect(await readdir(join(shared, 'oci', 'rootfs'))).toEqual([appDigest.slice(7)]);
    expect(await readdir(join(shared, 'oci', 'tmp'))).toEqual([]);
    expect(await readFile(join(x.rootfs, 'opq/new'), 'utf8')).toBe('new');
  });

  it('gc evicts least recently used images and their blobs, never one in use', async () => {
    const dataDir = await newDataDir();
    const inUse = new Set<string>();
    const opts = { dataDir, registry: counting().client, idShift: SHIFT, inUse: () => inUse };
    const app = await new OciImageStore(opts).ensure(ref('team/app:1'));
    const other = await new OciImageStore(opts).ensure(ref('team/other:1'));
    const blobsBefore = (await readdir(join(dataDir, 'oci', 'blobs', 'sha256'))).length;
    expect(blobsBefore).toBe(3);

    // No budget: nothing referenced is removed.
    expect((await new OciImageStore(opts).gc()).removedImages).toEqual([]);

    // app is least recently used, but in use: other goes instead.
    inUse.add(app.digest);
    let result = await new OciImageStore({ ...opts, diskBudgetBytes: 1 }).gc();
    expect(result.removedImages).toEqual([other.digest]);
    expect(result.removedBlobs).toBe(1);
    expect(existsSync(other.rootfs)).toBe(false);
    expect(existsSync(app.rootfs)).toBe(true);
    expect(await new OciImageStore(opts).list()).toEqual([{ name: ref('team/app:1'), digest: app.digest }]);

    // Touch other again (re-pull), then with nothing in use the older one (app) goes first.
    inUse.clear();
    await new OciImageStore(opts).ensure(ref('team/other:1'));
    await new OciImageStore(opts).ensure(ref('team/app:1'));
    const store = new OciImageStore({ ...opts, diskBudgetBytes: (await new OciImageStore(opts).gc()).usedBytes - 1 });
    result = await store.gc();
    expect(result.removedImages).toEqual([other.digest]);
    expect(existsSync(app.rootfs)).toBe(true);
    result = await new OciImageStore({ ...opts, diskBudgetBytes: 0 }).gc();
    expect(result.removedImages).toEqual([app.digest]);
    expect(result.usedBytes).toBe(0);
    expect(await readdir(join(dataDir, 'oci', 'blobs', 'sha256'))).toEqual([]);
  });

  it('ImageResolver sends registry references to the OCI store and bare names to the built-in one', async () => {
    const calls: string[] = [];
    const resolver = new ImageResolver({
      builtin: {
        knownImages: () => ['tiny', 'base'],
        ensure: async (name) => (calls.push(`builtin ${name}`), { name, digest: 'sha256:b', rootfs: '/b' }),
        list: async () => [{ name: 'tiny', digest: 'sha256:b' }],
      },
      oci: new OciImageStore({ dataDir: await newDataDir(), registry: counting().client, idShift: SHIFT }),
    });
    expect((await resolver.ensure('tiny')).rootfs).toBe('/b');
    expect((await resolver.ensure(ref('team/other:1'))).name).toBe(ref('team/other:1'));
    expect(calls).toEqual(['builtin tiny']);
    expect(await resolver.list()).toEqual([{ name: 'tiny', digest: 'sha256:b' }, { name: ref('team/other:1'), digest: expect.stringMatching(/^sha256:/) }]);
    await expect(resolver.ensure('ubuntu')).rejects.toMatchObject({ code: 'invalid-input', message: expect.stringMatching(/unknown image "ubuntu"/) });
  });
});
