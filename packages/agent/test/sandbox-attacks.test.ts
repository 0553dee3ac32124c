/**
 * The sandbox boundary under attack: each test runs, as root inside a real crun box, what an
 * attacker with arbitrary code in one box would try against the kernel, the node and the other
 * boxes, and checks that it fails — and that ordinary development work in the box still succeeds.
 */
import { execFileSync } from 'node:child_process';
import { copyFile, chown, mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { BuiltinImageStore, type BuiltImage } from '@devyard/agent/images/builtin-image-store';
import type { SandboxDriver } from '@devyard/agent/runtime/sandbox/sandbox-driver';
import type { BoxRuntimeSpec } from '@devyard/agent/runtime/runtime-driver';
import { boxLeftovers, run, startBox, testBoxSpec, testDriver, TEST_RESOURCES } from './sandbox-test-host.js';

const PROBE_SOURCE = fileURLToPath(new URL('./fixtures/syscall-probe.c', import.meta.url));

describe('sandbox boundary: attacks from box root', () => {
  let driver: SandboxDriver;
  let dataDir: string;
  let tiny: BuiltImage;
  let probeDir: string;
  const boxes = new Set<string>();

  /** Creates a box with the syscall probe at /workspace/probe, then starts it. */
  const upWithProbe = async (spec: BoxRuntimeSpec) => {
    boxes.add(spec.boxId);
    await driver.create(spec);
    const paths = driver.boxHostPaths(spec.boxId);
    await copyFile(join(probeDir, 'probe'), join(paths.workspace, 'probe'));
    await chown(join(paths.workspace, 'probe'), paths.owner.uid, paths.owner.gid);
    await driver.start(spec);
  };
  const probe = async (boxId: string, what: string) => (await run(driver, boxId, ['/workspace/probe', what])).out.trim();

  beforeAll(async () => {
    ({ driver, dataDir } = await testDriver('atk', 233));
    await driver.init();
    tiny = await new BuiltinImageStore({ dataDir }).ensure('tiny');
    probeDir = await mkdtemp(join(tmpdir(), 'dy-probe-'));
    execFileSync('gcc', ['-static', '-O2', '-o', join(probeDir, 'probe'), PROBE_SOURCE]);
    await upWithProbe(testBoxSpec('a_sec', tiny));
  });

  afterAll(async () => {
    for (const id of boxes) await driver.destroy(id);
    for (const id of boxes) expect(boxLeftovers(driver, dataDir, id)).toEqual([]);
    await driver.teardownHost();
    await rm(dataDir, { recursive: true, force: true });
    await rm(probeDir, { recursive: true, force: true });
  });

  describe('seccomp: the kernel surface a box reaches', () => {
    test.each([
      // A nested user namespace hands its creator every capability inside it.
      ['userns', 'denied 1'],
      ['clone-userns', 'denied 1'],
      // clone3 hides its flags from seccomp: ENOSYS, so libc falls back to clone.
      ['clone3', 'denied 38'],
      ['mount', 'denied 1'],
      ['setns', 'denied 1'],
      ['io_uring', 'denied 1'],
      ['keyctl', 'denied 1'],
      ['add_key', 'denied 1'],
      ['bpf', 'denied 1'],
      ['userfaultfd', 'denied 1'],
      ['personality-aslr-off', 'denied 1'],
    ])('%s is refused', async (what, expected) => {
      expect(await probe('a_sec', what)).toBe(expected);
    });

    test('what programs need stays allowed: plain clone (fork, threads), the personality query', async () => {
      expect(await probe('a_sec', 'clone-plain')).toBe('allowed');
      expect(await probe('a_sec', 'personality-query')).toBe('allowed');
    });

    test('the tools an attacker would reach for fail: unshare -U, unshare -r, nsenter, mount', async () => {
      for (const argv of [
        ['unshare', '-U', 'true'],
        ['unshare', '-r', 'true'],
        ['unshare', '-Urm', 'mount', '-t', 'tmpfs', 'x', '/mnt'],
        ['nsenter', '-t', '1', '-m', 'true'],
        ['mount', '-t', 'tmpfs', 'x', '/mnt'],
      ]) {
        const r = await run(driver, 'a_sec', argv);
        expect([argv.join(' '), r.code]).not.toEqual([argv.join(' '), 0]);
      }
      expect((await run(driver, 'a_sec', ['sh', '-c', 'grep Seccomp: /proc/self/status'])).out).toMatch(/Seccomp:\s+2/);
    });

    test('development work is unaffected in the Debian base image: bash, threads, git, dpkg and apt-get', async () => {
      const base = await new BuiltinImageStore({ dataDir }).ensure('base');
      const spec = testBoxSpec('a_dev', base, { resources: { ...TEST_RESOURCES, memoryBytes: 256 << 20, pids: 256 } });
      boxes.add(spec.boxId);
      await startBox(driver, spec);
      const script = [
        'set -e',
        'cd /workspace',
        'git init -q repo && cd repo && git config user.email a@b && git config user.name a',
        'seq 1 2000 > f && git add f && git commit -qm one && git log --oneline | wc -l',
        // git's pack code runs threads (clone without namespace flags).
        'git -c pack.threads=4 gc -q && echo gc-ok',
        'mkdir -p /tmp/pkg/DEBIAN /tmp/pkg/usr/share/probe && echo hi > /tmp/pkg/usr/share/probe/x',
        'printf "Package: dyprobe\\nVersion: 1\\nArchitecture: all\\nMaintainer: a <a@b>\\nDescription: probe\\n" > /tmp/pkg/DEBIAN/control',
        'dpkg-deb -b /tmp/pkg /tmp/dyprobe.deb >/dev/null',
        'apt-get install -y -q /tmp/dyprobe.deb >/dev/null 2>&1 && dpkg -s dyprobe | grep -q "install ok installed" && echo apt-ok',
        'apt-get remove -y -q dyprobe >/dev/null 2>&1 && echo removed',
      ].join('\n');
      const r = await run(driver, 'a_dev', ['bash', '-c', script]);
      expect(r.err).toBe('');
      expect(r.out).toBe('1\ngc-ok\napt-ok\nremoved\n');
    });
  });
});
