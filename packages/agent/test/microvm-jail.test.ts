/**
 * The microVM boundary on the host, against real QEMU, the Debian cloud kernel and the compiled
 * guest agent. Untrusted code from many organizations shares a node: a guest that escapes into its
 * QEMU must find nothing of other tenants there. So each VM's QEMU runs jailed — a uid and gid of
 * its own with no groups and no capabilities, QEMU's seccomp filter, a mount namespace holding
 * only that VM's files — its RAM file and disks are readable by its own uid only, and a pause
 * leaves no secret of the box in the RAM file or the snapshot.
 */
import { execFileSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { existsSync, readdirSync, readFileSync, statSync } from 'node:fs';
import { readFile, rm } from 'node:fs/promises';
import { basename, dirname, join } from 'node:path';
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import type { BuiltImage } from '@devyard/agent/images/builtin-image-store';
import type { BoxRuntimeSpec } from '@devyard/agent/runtime/runtime-driver';
import { MicrovmDriver, type MicrovmDriverOptions } from '@devyard/agent/runtime/microvm/microvm-driver';
import { processesUnder, runInVm, startVmTestHost, vmBoxSpec } from './microvm-test-host.js';


const run = runInVm;

/** The fields of /proc/<pid>/status. */
function procStatus(pid: number): Record<string, string> {
  const out: Record<string, string> = {};
  for (const line of readFileSync(`/proc/${pid}/status`, 'utf8').split('\n')) {
    const i = line.indexOf(':');
    if (i > 0) out[line.slice(0, i)] = line.slice(i + 1).trim();
  }
  return out;
}

/**
 * Pids of the processes running as `uid` (real, effective, saved or filesystem). A zombie is not
 * one: it holds no memory or files (a QEMU that exited waits there until the host's init reaps it).
 */
function processesOfUid(uid: number): number[] {
  const out: number[] = [];
  for (const p of readdirSync('/proc').filter((x) => /^\d+$/.test(x))) {
    try {
      const st = procStatus(Number(p));
      if (!st.State!.startsWith('Z') && st.Uid!.split(/\s+/).map(Number).includes(uid)) out.push(Number(p));
    } catch {
      /* gone */
    }
  }
  return out;
}

/** Mount points of a process's mount namespace, as that process sees them. */
function mountsOf(pid: number): Array<{ at: string; options: string; fstype: string }> {
  return readFileSync(`/proc/${pid}/mountinfo`, 'utf8')
    .trim()
    .split('\n')
    .map((line) => {
      const [pre, post] = line.split(' - ');
      const f = pre!.split(' ');
      return { at: f[4]!.replace(/\\040/g, ' '), options: f[5]!, fstype: post!.split(' ')[0]! };
    });
}

/**
 * What an agent process that exits leaves behind: its VMs run on, their QMP and guest-agent
 * sockets are free again (QEMU serves one client on each).
 */
function agentExits(driver: MicrovmDriver): void {
  const live = (driver as unknown as { live: Map<string, { qmp: { close(): void }; channel: { close(): unknown } }> }).live;
  for (const vm of live.values()) {
    vm.channel.close();
    vm.qmp.close();
  }
  live.clear();
}

function count(haystack: Buffer, needle: Buffer): number {
  let n = 0;
  for (let i = haystack.indexOf(needle); i >= 0; i = haystack.indexOf(needle, i + 1)) n++;
  return n;
}

describe('microVM jail', () => {
  let dataDir: string;
  let driver: MicrovmDriver;
  let image: BuiltImage;
  let opts: MicrovmDriverOptions;
  const boxes = new Set<string>();
  const spec = (boxId: string): BoxRuntimeSpec => {
    boxes.add(boxId);
    return vmBoxSpec(boxId, image);
  };
  const up = async (s: BoxRuntimeSpec) => {
    await driver.create(s);
    await driver.start(s);
  };
  const pidOf = async (boxId: string) => {
    const pid = (await driver.inspect(boxId)).pid;
    if (!pid) throw new Error(`${boxId} has no QEMU`);
    return pid;
  };
  const uidOf = async (boxId: string) => Number(procStatus(await pidOf(boxId)).Uid!.split(/\s+/)[0]);
  const boxDir = (boxId: string) => join(dataDir, 'boxes', boxId);

  beforeAll(async () => {
    ({ dataDir, opts, driver, image } = await startVmTestHost('jl', '10.243.0.0/16', 'djl'));
    await Promise.all([up(spec('j_a')), up(spec('j_b'))]);
  });

  afterAll(async () => {
    for (const id of boxes) await driver.destroy(id).catch(() => undefined);
    const left = processesUnder(dataDir);
    expect(left).toEqual([]);
    await driver.network.teardown();
    await rm(dataDir, { recursive: true, force: true });
  });

  test("each VM's QEMU runs as a uid and gid of its own, with no groups and no capabilities", async () => {
    const seen = new Set<number>();
    for (const id of ['j_a', 'j_b']) {
      const st = procStatus(await pidOf(id));
      const uids = st.Uid!.split(/\s+/).map(Number);
      const gids = st.Gid!.split(/\s+/).map(Number);
      // Real, effective, saved and filesystem ids are all the VM's: nothing to switch back to.
      expect(new Set(uids).size, st.Uid).toBe(1);
      expect(new Set(gids).size, st.Gid).toBe(1);
      expect(uids[0]).not.toBe(0);
      expect(gids[0]).not.toBe(0);
      expect(seen.has(uids[0]!)).toBe(false);
      seen.add(uids[0]!);
      expect(st.Groups).toBe('');
      for (const set of ['CapInh', 'CapPrm', 'CapEff', 'CapBnd', 'CapAmb']) expect(BigInt(`0x${st[set]}`), `${id} ${set}`).toBe(0n);
      expect(st.NoNewPrivs).toBe('1');
      // No other process of the host runs as the VM's uid.
      expect(processesOfUid(uids[0]!)).toEqual([await pidOf(id)]);
    }
    // The VM works as before: exec, and its network (the TAP device it opened unprivileged).
    expect((await run(driver, 'j_a', `ping -c 1 -W 2 ${driver.network.gateway} >/dev/null && echo up`)).out).toBe('up\n');
  });

  test('QEMU runs under its seccomp filter, also when restored from a snapshot', async () => {
    expect(procStatus(await pidOf('j_a')).Seccomp).toBe('2');
    expect(readFileSync(`/proc/${await pidOf('j_a')}/cmdline`, 'utf8').split('\0')).toContain('on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny');
    await driver.pause('j_b', 'fast');
    await driver.resume('j_b');
    expect(procStatus(await pidOf('j_b')).Seccomp).toBe('2');
    expect((await run(driver, 'j_b', 'echo alive')).out).toBe('alive\n');
  });

  test("a VM's QEMU sees only its own files: no other VM's, nothing else of the node's data dir or of the host", async () => {
    const pid = await pidOf('j_a');
    const root = `/proc/${pid}/root`;
    // The data dir holds images, other boxes and their records: the jail has the box's own files
    // and the base disk its overlay reads, nothing else.
    expect(readdirSync(join(root, dataDir)).sort()).toEqual(['base', 'boxes']);
    expect(readdirSync(join(root, dataDir, 'boxes'))).toEqual(['j_a']);
    expect(existsSync(join(root, boxDir('j_b')))).toBe(false);
    expect(readdirSync(join(root, boxDir('j_a'))).sort()).toEqual(['mem', 'root.qcow2', 'run', 'volume.ext4']);
    expect(readdirSync(join(root, dataDir, 'base'))).toHaveLength(1);
    // Nor the data dir's neighbours (other nodes' and tests' data dirs), nor the host's own files.
    expect(readdirSync(join(root, dirname(dataDir)))).toEqual([basename(dataDir)]);
    for (const host of ['/etc/passwd', '/etc/shadow', '/root', '/home', '/var/lib', '/work', '/proc/1', '/sys/kernel', '/run']) {
      expect(existsSync(join(root, host)), host).toBe(false);
    }
    // Its mount namespace has nothing of another VM, and only the VM's own files are writable.
    const mounts = mountsOf(pid);
    expect(mounts.filter((m) => m.at.includes('j_b'))).toEqual([]);
    const writable = mounts.filter((m) => m.options.split(',').includes('rw') && !m.at.startsWith('/dev/'));
    for (const m of writable) expect(m.at.startsWith(`${boxDir('j_a')}/`), m.at).toBe(true);
    expect(mounts.find((m) => m.at === '/')).toMatchObject({ fstype: 'tmpfs' });
    expect(mounts.find((m) => m.at === '/')!.options.split(',')).toContain('ro');
  });

  test("the RAM file, disks and snapshot files are the VM's own and private (0600); delete removes them and frees the uid", async () => {
    const s = spec('j_c');
    await up(s);
    const uid = await uidOf('j_c');
    const dir = boxDir('j_c');
    const privateTo = (path: string, owner: number) => {
      const st = statSync(path);
      expect(st.mode & 0o777, `${path} mode ${(st.mode & 0o777).toString(8)}`).toBe(0o600);
      expect(st.uid, `${path} owner`).toBe(owner);
    };
    for (const f of ['mem', 'root.qcow2', 'volume.ext4']) privateTo(join(dir, f), uid);
    expect(statSync(dir).mode & 0o077).toBe(0);
    expect(statSync(dir).uid).toBe(0);
    // The records and snapshots stay root's: an escaped QEMU cannot rewrite its own box record.
    privateTo(join(dir, 'box.json'), 0);
    expect(driver.vmUids.holder(uid)).toBe(dir);

    await driver.pause('j_c', 'fast');
    for (const f of ['snapshot/state', 'snapshot/meta.json']) privateTo(join(dir, f), 0);
    privateTo(join(dir, 'mem'), uid);
    await driver.resume('j_c');
    expect(await uidOf('j_c')).toBe(uid);
    await driver.pause('j_c', 'portable');
    privateTo(join(dir, 'snapshot/mem.tar.zst'), 0);
    expect(existsSync(join(dir, 'mem'))).toBe(false);
    await driver.resume('j_c');
    privateTo(join(dir, 'mem'), uid);

    // A fork gets a uid of its own; its copies of the RAM file and disks are its own.
    await driver.fork('j_c', spec('j_cf'));
    const forkUid = await uidOf('j_cf');
    expect(forkUid).not.toBe(uid);
    for (const f of ['mem', 'root.qcow2', 'volume.ext4']) privateTo(join(boxDir('j_cf'), f), forkUid);
    await driver.destroy('j_cf');

    const tap = driver.network.vethName('j_c');
    await driver.destroy('j_c');
    expect(existsSync(dir)).toBe(false);
    expect(existsSync(`/sys/class/net/${tap}`)).toBe(false);
    expect(processesOfUid(uid)).toEqual([]);
    expect(driver.vmUids.holder(uid)).toBeUndefined();
    expect(driver.vmUids.holder(forkUid)).toBeUndefined();
  });

  test('a restarted agent adopts the jailed VM; the VM keeps its uid across pause and stop', async () => {
    const uid = await uidOf('j_a');
    agentExits(driver);
    const restarted = new MicrovmDriver(opts);
    await restarted.init();
    expect((await run(restarted, 'j_a', 'echo adopted')).out).toBe('adopted\n');
    await restarted.pause('j_a');
    await restarted.resume('j_a');
    expect(await uidOf('j_a')).toBe(uid);
    await restarted.stop('j_a');
    expect(existsSync(join(boxDir('j_a'), 'mem'))).toBe(false);
    await restarted.start(spec('j_a'));
    expect(await uidOf('j_a')).toBe(uid);
    expect(procStatus(await pidOf('j_a')).Seccomp).toBe('2');
    agentExits(restarted);
  });

  /** Copies of `needle` in the box's RAM file (live: the guest's memory as it is now) and, while paused, in its snapshot. */
  const scan = async (d: MicrovmDriver, boxId: string, needle: Buffer): Promise<{ ram: number; state?: number }> => {
    const dir = join(boxDir(boxId), 'snapshot');
    const meta = existsSync(join(dir, 'meta.json')) ? (JSON.parse(await readFile(join(dir, 'meta.json'), 'utf8')) as { ramFile?: string }) : undefined;
    const ram = meta?.ramFile
      ? execFileSync('bash', ['-c', 'set -o pipefail; zstd -dcq "$1" | tar --sparse -xOf - mem', 'bash', join(dir, meta.ramFile)], { maxBuffer: 2 * 1024 ** 3 })
      : await readFile(join(boxDir(boxId), 'mem'));
    if (!meta) return { ram: count(ram, needle) };
    return { ram: count(ram, needle), state: count(await readFile(join(dir, 'state')), needle) };
  };
  const secretValue = () => `DYSECRET${randomBytes(32).toString('hex')}`;

  test('secrets no session used leave nothing in the RAM file or the snapshot after a pause (fast and portable), nor when replaced', async () => {
    const id = 'j_a';
    const first = secretValue();
    await driver.writeSecrets(id, [{ name: 'API_TOKEN', value: first }]);
    // The guest holds it (the host reads the running guest's memory in its RAM file).
    expect((await scan(driver, id, Buffer.from(first))).ram).toBeGreaterThan(0);
    // Replaced, the old value is gone from the guest at once: its file, the frame that carried it.
    const secret = secretValue();
    await driver.writeSecrets(id, [{ name: 'API_TOKEN', value: secret }]);
    expect(await scan(driver, id, Buffer.from(first))).toEqual({ ram: 0 });
    expect((await scan(driver, id, Buffer.from(secret))).ram).toBeGreaterThan(0);
    for (const mode of ['fast', 'portable'] as const) {
      await driver.pause(id, mode);
      expect(await scan(driver, id, Buffer.from(secret)), mode).toEqual({ ram: 0, state: 0 });
      await driver.resume(id);
      // Resume writes them back.
      expect((await scan(driver, id, Buffer.from(secret))).ram, mode).toBeGreaterThan(0);
    }
    expect((await run(driver, id, 'cat /run/devyard/secrets/API_TOKEN')).out).toBe(secret);
    await driver.writeSecrets(id, []);
  });

  test('with zeroFreedMemory, neither do the sessions that used the secrets and exited; a process still running keeps them', async () => {
    // Every session has the secrets in its environment, and a process that read the file holds
    // them too: freed when it exits, their memory is zeroed only by a guest kernel that does so.
    const strict = new MicrovmDriver({ ...opts, zeroFreedMemory: true });
    await strict.init();
    const id = 'j_z';
    const s = spec(id);
    await strict.create(s);
    await strict.start(s);
    const secret = secretValue();
    const needle = Buffer.from(secret);
    await strict.writeSecrets(id, [{ name: 'API_TOKEN', value: secret }]);
    expect((await run(strict, id, 'cat /run/devyard/secrets/API_TOKEN; echo; echo "$API_TOKEN"')).out).toBe(`${secret}\n${secret}\n`);

    // The control, and the limit: pause keeps processes, and with them what they hold.
    await run(strict, id, 'setsid sleep 600 >/dev/null 2>&1 </dev/null &');
    await strict.pause(id, 'fast');
    expect((await scan(strict, id, needle)).ram).toBeGreaterThan(0);
    await strict.resume(id);
    expect((await run(strict, id, 'kill $(pidof sleep)')).code).toBe(0);

    for (const mode of ['fast', 'portable'] as const) {
      expect((await run(strict, id, 'cat /run/devyard/secrets/API_TOKEN >/dev/null; echo "$API_TOKEN" | wc -c')).out.trim()).toBe(String(secret.length + 1));
      await strict.pause(id, mode);
      expect(await scan(strict, id, needle), mode).toEqual({ ram: 0, state: 0 });
      await strict.resume(id);
      expect((await run(strict, id, 'cat /run/devyard/secrets/API_TOKEN')).out, mode).toBe(secret);
    }
    await strict.destroy(id);
  });
});
