/** The Debian `base` image: built from the host's bootstrap (the tier's set-up makes it), and that bootstrap shared by data dirs. */
import { existsSync } from 'node:fs';
import { mkdir, mkdtemp, readdir, readFile, rm, stat, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { basename, join } from 'node:path';
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { BuiltinImageStore, type BuiltImage } from '@devyard/agent/images/builtin-image-store';
import type { SandboxDriver } from '@devyard/agent/runtime/sandbox/sandbox-driver';
import { boxLeftovers, run, testDriver } from './sandbox-test-host.js';

describe('built-in base image', () => {
  let driver: SandboxDriver;
  let dataDir: string;
  let image: BuiltImage;
  const boxId = 'b_base1';

  beforeAll(async () => {
    ({ driver, dataDir } = await testDriver('base', 232));
    await driver.init();
    image = await new BuiltinImageStore({ dataDir }).ensure('base');
  }, 600_000);

  afterAll(async () => {
    if (!driver) return;
    await driver.destroy(boxId);
    expect(boxLeftovers(driver, dataDir, boxId)).toEqual([]);
    await driver.teardownHost();
    await rm(dataDir, { recursive: true, force: true });
  });

  test('is a cleaned Debian root, shifted, setuid bits kept', async () => {
    const root = image.rootfs;
    expect((await stat(join(root, 'bin/bash'))).uid).toBe(100000);
    expect(existsSync(join(root, 'etc/machine-id'))).toBe(false);
    const ssh = existsSync(join(root, 'etc/ssh')) ? await readdir(join(root, 'etc/ssh')) : [];
    expect(ssh.filter((f) => f.startsWith('ssh_host_'))).toEqual([]);
    expect(await readdir(join(root, 'var/cache/apt/archives')).then((l) => l.filter((f) => f.endsWith('.deb')))).toEqual([]);
    // chown clears setuid: the store re-applies modes.
    expect((await stat(join(root, 'usr/bin/su'))).mode & 0o4000).toBe(0o4000);
  });

  test("another data dir copies the host's bootstrap instead of bootstrapping again: the same image", async () => {
    const other = await mkdtemp(join(tmpdir(), 'dy-base2-'));
    try {
      const lines: string[] = [];
      const again = await new BuiltinImageStore({ dataDir: other }).ensure('base', (l) => lines.push(l));
      expect(again.digest).toBe(image.digest);
      expect(again.rootfs.startsWith(other)).toBe(true);
      expect(lines.filter((l) => l.includes('debootstrap'))).toEqual([]);
      expect(lines.some((l) => l.startsWith("base: copying the host's bootstrap"))).toBe(true);
    } finally {
      await rm(other, { recursive: true, force: true });
    }
  });

  test('uses the newest bootstrap younger than the maximum age, never an expired one', async () => {
    const { dir } = await new BuiltinImageStore({ dataDir }).ensureBaseBootstrap();
    const key = /^base-([0-9a-f]+)-\d+$/.exec(basename(dir))![1];
    const cache = await mkdtemp(join(tmpdir(), 'dy-bootstraps-'));
    try {
      const day = 24 * 3600_000;
      for (const [age, mark] of [[9 * day, 'expired'], [2 * day, 'older'], [1 * day, 'newest']] as const) {
        const rootfs = join(cache, `base-${key}-${Date.now() - age}`, 'rootfs');
        await mkdir(rootfs, { recursive: true });
        await writeFile(join(rootfs, 'mark'), mark);
      }
      const store = new BuiltinImageStore({ dataDir, hostCacheDir: cache, bootstrapMaxAgeMs: 7 * day });
      const picked = await store.ensureBaseBootstrap();
      expect(await readFile(join(picked.dir, 'rootfs', 'mark'), 'utf8')).toBe('newest');
    } finally {
      await rm(cache, { recursive: true, force: true });
    }
  });

  test('boots and runs bash, git, curl', async () => {
    const spec = {
      boxId,
      name: 'base1',
      imageRootfs: image.rootfs,
      imageDigest: image.digest,
      resources: { cpuMillis: 1000, memoryBytes: 256 << 20, pids: 256 },
      env: {},
    };
    await driver.create(spec);
    await driver.start(spec);
    const r = await run(driver, boxId, ['bash', '-c', 'echo $BASH_VERSION; git --version; curl --version | head -1; id -un; ls -ld /root']);
    expect(r.err).toBe('');
    expect(r.code).toBe(0);
    expect(r.out).toMatch(/^5\./);
    expect(r.out).toContain('git version');
    expect(r.out).toContain('curl ');
    expect(r.out).toContain('root');
    // apt works as box root (files owned by the mapped root).
    const apt = await run(driver, boxId, ['bash', '-c', 'touch /var/lib/dpkg/x && rm /var/lib/dpkg/x && echo ok']);
    expect(apt.out.trim()).toBe('ok');
  });
});
