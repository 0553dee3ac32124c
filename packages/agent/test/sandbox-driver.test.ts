/** Integration tests of the sandbox driver against the real crun, namespaces, cgroups and network. */
import { readFileSync, existsSync } from 'node:fs';
import { readFile, rm } from 'node:fs/promises';
import { createServer, connect, type Server } from 'node:net';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { BuiltinImageStore, type BuiltImage } from '@devyard/agent/images/builtin-image-store';
import { SandboxDriver } from '@devyard/agent/runtime/sandbox/sandbox-driver';
import type { BoxRuntimeSpec } from '@devyard/agent/runtime/runtime-driver';
import { treeDigest } from '@devyard/agent/images/tree-digest';
import { boxLeftovers, run, startBox, testBoxSpec, testDriver, TEST_RESOURCES } from './sandbox-test-host.js';

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
// Docker's default capabilities minus NET_RAW and MKNOD.
const EXPECTED_CAPS = 0xa00405fbn;

describe('sandbox driver', () => {
  let driver: SandboxDriver;
  let dataDir: string;
  let image: BuiltImage;
  const boxes = new Set<string>();

  const spec = (boxId: string, over: Partial<BoxRuntimeSpec['resources']> = {}): BoxRuntimeSpec => {
    boxes.add(boxId);
    return testBoxSpec(boxId, image, { resources: { ...TEST_RESOURCES, ...over }, env: { BOX_VAR: 'from-spec' } });
  };
  const up = (s: BoxRuntimeSpec) => startBox(driver, s);

  beforeAll(async () => {
    ({ driver, dataDir } = await testDriver('drv', 231));
    await driver.init();
    image = await new BuiltinImageStore({ dataDir }).ensure('tiny');
  });

  afterAll(async () => {
    for (const id of boxes) await driver.destroy(id);
    for (const id of boxes) expect(boxLeftovers(driver, dataDir, id)).toEqual([]);
    await driver.teardownHost();
    expect(existsSync(`/sys/class/net/${driver.network.bridge}`)).toBe(false);
    for (const dir of driver.cgroups.parentDirs()) expect(existsSync(dir)).toBe(false);
    await rm(dataDir, { recursive: true, force: true });
  });

  test('create, start and first exec are fast; exit codes pass through', async () => {
    const s = spec('b_exec1');
    const t0 = performance.now();
    await driver.create(s);
    const t1 = performance.now();
    await driver.start(s);
    const t2 = performance.now();
    const first = await run(driver, 'b_exec1', ['true']);
    const t3 = performance.now();
    console.log(`create ${(t1 - t0).toFixed(1)} ms, start ${(t2 - t1).toFixed(1)} ms, first exec ${(t3 - t2).toFixed(1)} ms`);
    expect(first.code).toBe(0);

    expect((await run(driver, 'b_exec1', ['sh', '-c', 'exit 7'])).code).toBe(7);
    expect((await run(driver, 'b_exec1', ['sh', '-c', 'kill -9 $$'])).code).toBe(137);
    expect((await run(driver, 'b_exec1', ['sh', '-c', 'kill -TERM $$'])).code).toBe(143);
    const r = await run(driver, 'b_exec1', ['sh', '-c', 'echo out; echo err >&2; pwd; echo $HOME $BOX_VAR $EXTRA; hostname'], { EXTRA: 'x1' });
    expect(r.out).toBe('out\n/workspace\n/root from-spec x1\nb-exec1\n');
    expect(r.err).toBe('err\n');
    const stdin = await driver.exec('b_exec1', { argv: ['sh', '-c', 'read l; echo got:$l'], cwd: '/tmp' });
    let out = '';
    stdin.stdout.on('data', (b: Buffer) => (out += b.toString()));
    stdin.stdin.end('hello\n');
    expect(await stdin.exited).toBe(0);
    expect(out).toBe('got:hello\n');
    // kill() reaches the process inside the box.
    const long = await driver.exec('b_exec1', { argv: ['sleep', '30'] });
    await sleep(100);
    long.kill('SIGKILL');
    expect(await long.exited).toBe(137);
    const st = await driver.inspect('b_exec1');
    expect(st.state).toBe('running');
    expect(st.ip).toMatch(/^10\.231\./);
    expect(st.pid).toBeGreaterThan(1);
  });

  test('pty exec: a terminal, output, resize', async () => {
    const p = await driver.exec('b_exec1', {
      argv: ['sh', '-c', '[ -t 0 ] && [ -t 1 ] && echo IS-A-TTY; stty size; echo $TERM; read x; stty size'],
      tty: true,
      cols: 100,
      rows: 30,
    });
    let out = '';
    p.stdout.on('data', (b: Buffer) => (out += b.toString()));
    for (let i = 0; i < 100 && !out.includes('30 100'); i++) await sleep(20);
    p.resize(132, 43);
    p.stdin.write('go\r');
    expect(await p.exited).toBe(0);
    await sleep(50);
    expect(out).toContain('IS-A-TTY');
    expect(out).toContain('30 100');
    expect(out).toContain('xterm-256color');
    expect(out).toContain('43 132');
  });

  test('no extra capabilities, no new privileges, seccomp filter on, network not configurable', async () => {
    const r = await run(driver, 'b_exec1', ['cat', '/proc/self/status']);
    const field = (k: string) => r.out.match(new RegExp(`^${k}:\\s*(\\S+)`, 'm'))?.[1];
    expect(BigInt(`0x${field('CapEff')}`)).toBe(EXPECTED_CAPS);
    expect(BigInt(`0x${field('CapBnd')}`)).toBe(EXPECTED_CAPS);
    expect(field('NoNewPrivs')).toBe('1');
    expect(field('Seccomp')).toBe('2');
    const uidMap = await run(driver, 'b_exec1', ['cat', '/proc/self/uid_map']);
    expect(uidMap.out.trim().split(/\s+/)).toEqual(['0', String(driver.boxHostPaths('b_exec1').owner.uid), '65536']);
    const ipChange = await run(driver, 'b_exec1', ['ip', 'addr', 'add', '10.231.9.9/16', 'dev', 'eth0']);
    expect(ipChange.code).not.toBe(0);
    const mnt = await run(driver, 'b_exec1', ['mount', '-t', 'tmpfs', 'x', '/mnt']);
    expect(mnt.code).not.toBe(0);
    // /sys shows the box's own network namespace.
    expect((await run(driver, 'b_exec1', ['ls', '/sys/class/net'])).out.split('\n').filter(Boolean).sort()).toEqual(['eth0', 'lo']);
  });

  test('memory over the limit is OOM-killed; pids are limited; CPU quota is set', async () => {
    const ok = await run(driver, 'b_exec1', ['sh', '-c', 'dd if=/dev/zero bs=16M count=1 2>/dev/null | wc -c']);
    expect(ok.out.trim()).toBe(String(16 * 1024 * 1024));
    const oom = await run(driver, 'b_exec1', ['dd', 'if=/dev/zero', 'of=/dev/null', 'bs=200M', 'count=1']);
    expect(oom.code).toBe(137);
    const cg = (ctrl: string, file: string) =>
      readFileSync(join(`/sys/fs/cgroup/${ctrl}`, driver.cgroups.cgroupsPath('b_exec1'), file), 'utf8').trim();
    expect(Number(cg('memory', 'memory.oom_control').match(/oom_kill (\d+)/)?.[1])).toBeGreaterThan(0);
    expect(cg('memory', 'memory.limit_in_bytes')).toBe(String(64 * 1024 * 1024));
    expect(cg('cpu', 'cpu.cfs_quota_us')).toBe('50000');
    expect(cg('cpu', 'cpu.cfs_period_us')).toBe('100000');
    expect(cg('pids', 'pids.max')).toBe('64');
    // The box sees its own limit too.
    expect((await run(driver, 'b_exec1', ['cat', '/sys/fs/cgroup/cpu/cpu.cfs_quota_us'])).out.trim()).toBe('50000');
    const bomb = await run(driver, 'b_exec1', ['sh', '-c', 'for i in $(seq 100); do sleep 10 & done; wait']);
    expect(bomb.err).toMatch(/fork|Resource temporarily unavailable/i);
    expect(Number(cg('pids', 'pids.events').split(' ')[1])).toBeGreaterThan(0);
    await run(driver, 'b_exec1', ['sh', '-c', 'killall sleep; true']);
  });

  test('pause freezes a running counter, resume continues it', async () => {
    const counter = join(dataDir, 'boxes/b_exec1/upper/tmp/counter');
    // Shell builtins only: the earlier fork-bomb test may leave the pids limit without headroom.
    const bg = await driver.exec('b_exec1', { argv: ['sh', '-c', 'i=0; while :; do i=$((i+1)); echo $i > /tmp/counter; done'] });
    // The loop truncates and rewrites the file: a read may catch it empty, so read until it is not
    // (while frozen, the content is stable, empty or not).
    const readOnce = () => readFile(counter, 'utf8').catch(() => '');
    const read = async () => {
      let v = await readOnce();
      for (let i = 0; i < 50 && !v.trim(); i++) v = await readOnce();
      return v;
    };
    // Generous waits: on a loaded machine the loop may take a while to get going.
    for (let i = 0; i < 1000 && Number((await read()) || 0) < 10; i++) await sleep(10);
    const before = Number(await read());
    expect(before).toBeGreaterThanOrEqual(10);
    const t0 = performance.now();
    await driver.pause('b_exec1');
    const pauseMs = performance.now() - t0;
    expect((await driver.inspect('b_exec1')).state).toBe('paused');
    const c1 = await readOnce();
    await sleep(300);
    expect(await readOnce()).toBe(c1);
    await expect(driver.exec('b_exec1', { argv: ['true'] })).rejects.toThrow(/paused/);
    const t1 = performance.now();
    await driver.resume('b_exec1');
    const resumeMs = performance.now() - t1;
    console.log(`pause ${pauseMs.toFixed(2)} ms, resume ${resumeMs.toFixed(2)} ms`);
    // Continues from where it was frozen (the loop kept its memory), not from 1.
    const frozenAt = Math.max(before, Number(c1 || 0));
    let c2 = '';
    for (let i = 0; i < 1000 && !(Number(c2) > frozenAt); i++) {
      await sleep(10);
      c2 = await read();
    }
    expect(Number(c2)).toBeGreaterThan(frozenAt);
    expect((await driver.inspect('b_exec1')).state).toBe('running');
    bg.kill('SIGKILL');
    expect(await bg.exited).toBe(137);
  });

  test('the image is read-only and shared: writes stay in each box', async () => {
    await up(spec('b_img_a'));
    await up(spec('b_img_b'));
    const w = await run(driver, 'b_img_a', ['sh', '-c', 'echo changed > /etc/passwd && echo new > /bin/added && rm /bin/ls && echo ok']);
    expect(w.out.trim()).toBe('ok');
    const r = await run(driver, 'b_img_b', ['sh', '-c', 'head -1 /etc/passwd; ls /bin/added; ls /bin/ls']);
    expect(r.out).toContain('root:x:0:0');
    expect(r.out).toContain('/bin/ls');
    expect(r.err).toContain('/bin/added');
    expect(await treeDigest(image.rootfs)).toBe(image.digest);
  });

  test('box A cannot reach box B, nor a host service on the bridge address', async () => {
    const ipB = (await driver.inspect('b_img_b')).ip!;
    const gw = driver.network.gateway;
    // Listener in B; proven reachable from the host.
    const listener = await driver.exec('b_img_b', { argv: ['nc', '-ll', '-p', '8080', '-e', 'echo', 'from-b'] });
    let hostSaw = '';
    for (let i = 0; i < 50 && !hostSaw.includes('from-b'); i++) {
      hostSaw = await new Promise<string>((resolve) => {
        const c = connect(8080, ipB);
        let d = '';
        c.on('data', (b) => (d += b.toString()));
        c.on('error', () => resolve(''));
        c.on('close', () => resolve(d));
      });
      if (!hostSaw) await sleep(50);
    }
    expect(hostSaw).toContain('from-b');
    // A host service on the bridge address: boxes are not its clients.
    let received = '';
    const server: Server = createServer((s) => s.on('data', (b) => (received += b.toString())).end('hi-from-host\n'));
    await new Promise<void>((r) => server.listen(0, gw, r));
    const port = (server.address() as { port: number }).port;
    try {
      const toHost = await run(driver, 'b_img_a', ['sh', '-c', `echo from-a | nc -w 2 ${gw} ${port}`]);
      expect(toHost.out).not.toContain('hi-from-host');
      expect(received).toBe('');
      const toB = await run(driver, 'b_img_a', ['sh', '-c', `nc -w 2 ${ipB} 8080 </dev/null`]);
      expect(toB.out).not.toContain('from-b');
      const wget = await run(driver, 'b_img_a', ['wget', '-T', '2', '-q', '-O', '-', `http://${ipB}:8080/`]);
      expect(wget.code).not.toBe(0);
    } finally {
      server.close();
      listener.kill('SIGKILL');
      await listener.exited;
    }
  });

  test('workspace, home and root changes survive stop/start; stop releases everything but disk', async () => {
    const s = spec('b_persist');
    await up(s);
    const w = await run(driver, 'b_persist', ['sh', '-c', 'echo ws > /workspace/w.txt && echo home > /root/h.txt && echo up > /etc/u.txt && echo ok']);
    expect(w.out.trim()).toBe('ok');
    const t0 = performance.now();
    await driver.stop('b_persist', { graceMs: 2000 });
    console.log(`stop ${(performance.now() - t0).toFixed(1)} ms`);
    expect((await driver.inspect('b_persist')).state).toBe('stopped');
    expect(boxLeftovers(driver, dataDir, 'b_persist')).toEqual(['box dir']);
    await driver.stop('b_persist'); // idempotent
    await expect(driver.exec('b_persist', { argv: ['true'] })).rejects.toThrow(/not running/);
    await driver.start(s);
    const r = await run(driver, 'b_persist', ['cat', '/workspace/w.txt', '/root/h.txt', '/etc/u.txt']);
    expect(r.out).toBe('ws\nhome\nup\n');
    await driver.start(s); // idempotent
    expect((await driver.inspect('b_persist')).state).toBe('running');
  });

  test('stop gives processes the grace period (SIGTERM) before SIGKILL', async () => {
    const s = spec('b_grace');
    await up(s);
    const trap = await driver.exec('b_grace', {
      argv: ['sh', '-c', "trap 'echo bye > /workspace/term.txt; exit 0' TERM; while :; do sleep 0.05; done"],
    });
    await sleep(200);
    await driver.stop('b_grace', { graceMs: 3000 });
    await trap.exited;
    expect(readFileSync(join(dataDir, 'boxes/b_grace/volume/workspace/term.txt'), 'utf8')).toBe('bye\n');
  });

  test('a restarted driver adopts running boxes without killing them', async () => {
    const before = await driver.inspect('b_exec1');
    const d2 = new SandboxDriver({
      dataDir,
      network: { bridge: driver.network.bridge, subnet: `10.231.0.0/16`, netnsPrefix: 'dyt-', vethPrefix: 'dyt' },
      cgroupParent: driver.cgroups.parent,
    });
    const list = await d2.list();
    const ids = list.map((b) => b.boxId);
    expect(ids).toEqual(expect.arrayContaining(['b_exec1', 'b_img_a', 'b_img_b', 'b_persist']));
    const mine = list.find((b) => b.boxId === 'b_exec1')!;
    expect(mine.state).toBe('running');
    expect(mine.pid).toBe(before.pid);
    const r = await run(d2, 'b_exec1', ['sh', '-c', 'echo $BOX_VAR']);
    expect(r.out).toBe('from-spec\n');
    expect(list.find((b) => b.boxId === 'b_grace')?.state).toBe('stopped');
  });

  test('destroy leaves nothing behind and is idempotent', async () => {
    await run(driver, 'b_img_a', ['sh', '-c', 'sleep 100 & sleep 100 & true']);
    await driver.pause('b_img_a');
    const t0 = performance.now();
    await driver.destroy('b_img_a');
    console.log(`destroy ${(performance.now() - t0).toFixed(1)} ms`);
    expect(boxLeftovers(driver, dataDir, 'b_img_a')).toEqual([]);
    expect((await driver.inspect('b_img_a')).state).toBe('absent');
    await driver.destroy('b_img_a');
    await driver.destroy('b_grace');
    expect(boxLeftovers(driver, dataDir, 'b_grace')).toEqual([]);
    expect((await driver.list()).map((b) => b.boxId)).not.toContain('b_img_a');
  });
});
