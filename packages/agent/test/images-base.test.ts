/** Builds the Debian `base` image (~1–2 min, needs the Debian mirror); skip with DEVYARD_SKIP_BASE_IMAGE=1. */
import { existsSync } from 'node:fs';
import { readdir, rm, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { BuiltinImageStore, type BuiltImage } from '@devyard/agent/images/builtin-image-store';
import type { SandboxDriver } from '@devyard/agent/runtime/sandbox/sandbox-driver';
import { boxLeftovers, run, testDriver } from './sandbox-test-host.js';

describe.skipIf(process.env.DEVYARD_SKIP_BASE_IMAGE === '1')('built-in base image', () => {
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
