/**
 * The sandbox boundary under attack: each test runs, as root inside a real crun box, what an
 * attacker with arbitrary code in one box would try against the kernel, the node and the other
 * boxes, and checks that it fails — and that ordinary development work in the box still succeeds.
 */
import { execFileSync } from 'node:child_process';
import { spawnSync } from 'node:child_process';
import { existsSync, readFileSync, readlinkSync, statfsSync, statSync } from 'node:fs';
import { copyFile, chown, mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { BuiltinImageStore, type BuiltImage } from '@devyard/agent/images/builtin-image-store';
import { DEFAULT_ID_RANGE, SandboxDriver } from '@devyard/agent/runtime/sandbox/sandbox-driver';
import type { BridgeNetworkOptions } from '@devyard/agent/network/bridge-network';
import { shiftTreeIds } from '@devyard/agent/images/tree-id-shift';
import type { BoxRuntimeSpec } from '@devyard/agent/runtime/runtime-driver';
import { boxLeftovers, run, startBox, testBoxSpec, testDriver, TEST_RESOURCES } from './sandbox-test-host.js';

const PROBE_SOURCE = fileURLToPath(new URL('./fixtures/syscall-probe.c', import.meta.url));

describe('sandbox boundary: attacks from box root', () => {
  let driver: SandboxDriver;
  let dataDir: string;
  let network: BridgeNetworkOptions;
  let cgroupParent: string;
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
    ({ driver, dataDir, network, cgroupParent } = await testDriver('atk', 233));
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

  describe('host ids: every box has a range of its own', () => {
    const hostIds = (pid: number) => {
      const status = readFileSync(`/proc/${pid}/status`, 'utf8');
      return { uid: Number(status.match(/^Uid:\s+(\d+)/m)![1]), gid: Number(status.match(/^Gid:\s+(\d+)/m)![1]) };
    };
    /** Runs argv on the host as the given uid/gid, with no supplementary groups (what an escaped box process is). */
    const asHostUser = (id: { uid: number; gid: number }, argv: string[]) =>
      spawnSync('setpriv', [`--reuid=${id.uid}`, `--regid=${id.gid}`, '--clear-groups', '--', ...argv], { encoding: 'utf8' });

    test("two boxes' root processes are different host users, neither in the image range", async () => {
      await upWithProbe(testBoxSpec('a_ida', tiny));
      await upWithProbe(testBoxSpec('a_idb', tiny));
      const [a, b] = await Promise.all(['a_ida', 'a_idb'].map(async (id) => hostIds((await driver.inspect(id)).pid!)));
      expect(a!.uid).not.toBe(b!.uid);
      expect(a!.gid).not.toBe(b!.gid);
      for (const id of [a!, b!]) {
        expect(id.uid === DEFAULT_ID_RANGE.hostId || Math.abs(id.uid - DEFAULT_ID_RANGE.hostId) < DEFAULT_ID_RANGE.size).toBe(false);
      }
      // Inside, each is root, and the shared image is root's.
      const inside = await run(driver, 'a_ida', ['sh', '-c', 'id -u; stat -c %u /bin/busybox /etc/passwd; cat /proc/self/uid_map']);
      expect(inside.out.split('\n').slice(0, 3)).toEqual(['0', '0', '0']);
      expect(inside.out.split('\n')[3]!.trim().split(/\s+/)).toEqual(['0', String(a!.uid), '65536']);
      expect(driver.boxHostPaths('a_ida').owner).toEqual(a);
    });

    test("what a box writes (volumes, root changes) is owned by its range only", async () => {
      const { uid } = driver.boxHostPaths('a_ida').owner;
      // Nobody else's: not the image range's, not the other box's.
      expect(uid).not.toBe(DEFAULT_ID_RANGE.hostId);
      expect(uid).not.toBe(driver.boxHostPaths('a_idb').owner.uid);
      const w = await run(driver, 'a_ida', ['sh', '-c', 'echo x > /workspace/mine && echo y > /root/mine && echo z >> /etc/passwd && echo d > /tmp/dev && chown 1000:1000 /tmp/dev && echo ok']);
      expect(w.out.trim()).toBe('ok');
      const paths = driver.boxHostPaths('a_ida');
      expect(statSync(join(paths.workspace, 'mine')).uid).toBe(uid);
      expect(statSync(join(paths.dir, 'volume/home/mine')).uid).toBe(uid);
      // Copied up from the shared image: the copy is the box's.
      expect(statSync(join(paths.rootUpper, 'etc/passwd')).uid).toBe(uid);
      expect(statSync(join(paths.rootUpper, 'tmp/dev')).uid).toBe(uid + 1000);
      // The image itself still belongs to the image range, unchanged.
      expect(statSync(join(tiny.rootfs, 'etc/passwd')).uid).toBe(DEFAULT_ID_RANGE.hostId);
      expect(await readFile(join(tiny.rootfs, 'etc/passwd'), 'utf8')).not.toContain('z');
    });

    test("a process with one box's host uid can neither signal the other box's processes nor write its files", async () => {
      const a = driver.boxHostPaths('a_ida');
      const b = driver.boxHostPaths('a_idb');
      const bPid = (await driver.inspect('a_idb')).pid!;
      const kill = asHostUser(a.owner, ['kill', '-0', String(bPid)]);
      expect(kill.status).not.toBe(0);
      expect(kill.stderr).toMatch(/not permitted/i);
      const write = asHostUser(a.owner, ['sh', '-c', `echo evil > ${join(b.workspace, 'evil')}`]);
      expect(write.status).not.toBe(0);
      expect(write.stderr).toMatch(/denied/i);
      // Its own box's files, it can: the same probe is meaningful.
      expect(asHostUser(a.owner, ['kill', '-0', String((await driver.inspect('a_ida')).pid!)]).status).toBe(0);
    });

    test('the range is recorded, kept across a driver restart and stop/start, and freed on delete', async () => {
      const range = driver.boxHostPaths('a_idb').idRange;
      expect(JSON.parse(await readFile(join(driver.boxHostPaths('a_idb').dir, 'box.json'), 'utf8')).idRange).toEqual(range);
      expect(await driver.idRanges.holder(range)).toBe(driver.boxHostPaths('a_idb').dir);
      const spec = testBoxSpec('a_idb', tiny);
      await driver.stop('a_idb');
      const d2 = new SandboxDriver({ dataDir, network: { bridge: driver.network.bridge, subnet: '10.233.0.0/16', netnsPrefix: 'dyt-', vethPrefix: 'dyt' }, cgroupParent: driver.cgroups.parent });
      expect(d2.boxHostPaths('a_idb').idRange).toEqual(range);
      await driver.start(spec);
      expect(hostIds((await driver.inspect('a_idb')).pid!).uid).toBe(range.hostId);
      await driver.destroy('a_idb');
      expect(await driver.idRanges.holder(range)).toBeUndefined();
    });

    test('a box made when all boxes shared the image range moves to a range of its own at its next start', async () => {
      const spec = testBoxSpec('a_legacy', tiny);
      await startBox(driver, spec);
      await run(driver, 'a_legacy', ['sh', '-c', 'echo old > /workspace/old && echo old > /etc/old && chown 7:7 /etc/old']);
      await driver.stop('a_legacy');
      // What such a box looks like: no range in its record, its files in the image range, no claim.
      const paths = driver.boxHostPaths('a_legacy');
      for (const sub of ['upper', 'volume', 'etc']) await shiftTreeIds(join(paths.dir, sub), paths.idRange, DEFAULT_ID_RANGE);
      const { idRange: _dropped, ...legacy } = JSON.parse(await readFile(join(paths.dir, 'box.json'), 'utf8'));
      await writeFile(join(paths.dir, 'box.json'), JSON.stringify(legacy));
      await driver.idRanges.free(paths.idRange, paths.dir);
      expect(statSync(join(paths.workspace, 'old')).uid).toBe(DEFAULT_ID_RANGE.hostId);
      // A new agent process starts it.
      const d2 = new SandboxDriver({ dataDir, network, cgroupParent });
      try {
        await d2.start(spec);
        const moved = d2.boxHostPaths('a_legacy');
        expect(moved.idRange.hostId).not.toBe(DEFAULT_ID_RANGE.hostId);
        expect(statSync(join(moved.workspace, 'old')).uid).toBe(moved.owner.uid);
        expect(statSync(join(moved.rootUpper, 'etc/old')).uid).toBe(moved.owner.uid + 7);
        expect((await run(d2, 'a_legacy', ['sh', '-c', 'cat /workspace/old; stat -c %u /workspace/old /etc/old; echo new >> /workspace/old && echo ok'])).out).toBe('old\n0\n7\nok\n');
      } finally {
        await d2.destroy('a_legacy');
      }
      expect(boxLeftovers(d2, dataDir, 'a_legacy')).toEqual([]);
    });
  });

  describe('disk: a box cannot fill the node', () => {
    const DISK = 128 * 1024 ** 2;
    const hostFree = () => {
      const s = statfsSync(dataDir);
      return s.bavail * s.bsize;
    };

    test('writing past the disk size is ENOSPC inside the box (volumes and root), and the node only holds the disk image', async () => {
      const spec = testBoxSpec('a_disk', tiny, { resources: { ...TEST_RESOURCES, diskBytes: DISK } });
      boxes.add(spec.boxId);
      await startBox(driver, spec);
      const before = hostFree();
      for (const target of ['/workspace/big', '/root/big', '/big']) {
        const w = await run(driver, 'a_disk', ['sh', '-c', `dd if=/dev/zero of=${target} bs=1M count=512; rc=$?; sync; rm -f ${target}; exit $rc`]);
        expect([target, w.code]).not.toEqual([target, 0]);
        expect(w.err).toContain('No space left on device');
      }
      // 1.5 GiB attempted; the host gave at most the image's size.
      const image = `${readlinkSync(join(driver.boxHostPaths('a_disk').dir, 'disk'))}.ext4`;
      expect(statSync(image).blocks * 512).toBeLessThanOrEqual(DISK);
      expect(before - hostFree()).toBeLessThan(DISK + 256 * 1024 ** 2);
      // The box works on once it deleted what it wrote.
      const after = await run(driver, 'a_disk', ['sh', '-c', 'echo fine > /workspace/after && cat /workspace/after && df -k /workspace | tail -1']);
      expect(after.out.split('\n')[0]).toBe('fine');
      const sizeKb = Number(after.out.split('\n')[1]!.trim().split(/\s+/)[1]);
      expect(sizeKb * 1024).toBeLessThanOrEqual(DISK);
    });

    test('the disk survives stop and start; destroy leaves no mount and no loop device', async () => {
      const spec = testBoxSpec('a_disk', tiny, { resources: { ...TEST_RESOURCES, diskBytes: DISK } });
      await run(driver, 'a_disk', ['sh', '-c', 'echo ws > /workspace/keep; echo home > /root/keep; echo rootfs > /etc/keep; sync']);
      await driver.stop('a_disk');
      await driver.start(spec);
      expect((await run(driver, 'a_disk', ['cat', '/workspace/keep', '/root/keep', '/etc/keep'])).out).toBe('ws\nhome\nrootfs\n');
      const image = `${readlinkSync(join(driver.boxHostPaths('a_disk').dir, 'disk'))}.ext4`;
      expect(existsSync(image)).toBe(true);
      await driver.destroy('a_disk');
      expect(boxLeftovers(driver, dataDir, 'a_disk')).toEqual([]);
      expect(existsSync(image)).toBe(false);
      expect(execFileSync('losetup', ['-a'], { encoding: 'utf8' })).not.toContain(image);
    });

    test('create → start → first exec with and without a disk (timing)', async () => {
      const phases = { plain: [] as number[][], disk: [] as number[][] };
      const time = async (boxId: string, diskBytes?: number) => {
        const spec = testBoxSpec(boxId, tiny, { resources: { ...TEST_RESOURCES, ...(diskBytes ? { diskBytes } : {}) } });
        boxes.add(boxId);
        const t0 = performance.now();
        await driver.create(spec);
        const t1 = performance.now();
        await driver.start(spec);
        const t2 = performance.now();
        expect((await run(driver, boxId, ['true'])).code).toBe(0);
        const t3 = performance.now();
        await driver.destroy(boxId);
        return [t1 - t0, t2 - t1, t3 - t2, t3 - t0];
      };
      for (let i = 0; i < 7; i++) {
        phases.plain.push(await time(`a_tp${i}`));
        phases.disk.push(await time(`a_td${i}`, 5 * 1024 ** 3));
      }
      const median = (a: number[]) => [...a].sort((x, y) => x - y)[Math.floor(a.length / 2)]!;
      for (const [name, runs] of Object.entries(phases)) {
        const m = [0, 1, 2, 3].map((i) => median(runs.map((r) => r[i]!)).toFixed(1));
        console.log(`${name}: create ${m[0]} ms, start ${m[1]} ms, first exec ${m[2]} ms, total ${m[3]} ms (medians of 7)`);
      }
    });
  });
});
