/**
 * The runtime conformance suite: the same tests against every driver (the sandbox on crun, the
 * microVM on QEMU), each on the real host components. What a box promises — exec, a terminal,
 * limits, volumes that survive stop/start, pause that keeps processes, isolation between boxes,
 * delete that leaves nothing — must not depend on the runtime it runs on.
 */
import { execFileSync } from 'node:child_process';
import { existsSync, readdirSync, readFileSync, statSync } from 'node:fs';
import { chmod, mkdtemp, rm } from 'node:fs/promises';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { BuiltinImageStore, type BuiltImage } from '@devyard/agent/images/builtin-image-store';
import type { BoxRuntimeSpec, ExecProcess, RuntimeDriver } from '@devyard/agent/runtime/runtime-driver';
import { MicrovmDriver } from '@devyard/agent/runtime/microvm/microvm-driver';
import { SandboxDriver } from '@devyard/agent/runtime/sandbox/sandbox-driver';
import { INTERNET, startOutsideWorld } from './outside-world.js';

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** One runtime under test: a driver on its own temp data dir, network and (for VMs) bridge. */
interface RuntimeUnderTest {
  driver: RuntimeDriver;
  dataDir: string;
  /** Memory each test box gets (a VM needs more to boot than a sandbox). */
  memoryBytes: number;
  /** What of a box is still on the host. */
  leftovers(boxId: string): string[];
  /**
   * The host files that hold a box's memory and disks, where the runtime keeps them as files of
   * their own (a VM's RAM file and disk images): no other box and no other user may read them.
   */
  privateFiles?(boxId: string): string[];
  teardown(): Promise<void>;
}

const suffix = Math.random().toString(36).slice(2, 6);

async function tempDir(tag: string): Promise<string> {
  const d = await mkdtemp(join(tmpdir(), `dy-conf-${tag}-`));
  await chmod(d, 0o711);
  return d;
}

const RUNTIMES: Record<string, () => Promise<RuntimeUnderTest>> = {
  sandbox: async () => {
    const dataDir = await tempDir('sb');
    const network = { bridge: `dycs${suffix}`, subnet: '10.247.0.0/16', nftTable: `devyard_conf_sb_${suffix}`, netnsPrefix: 'dyc-', vethPrefix: 'dyc' };
    const driver = new SandboxDriver({ dataDir, network, cgroupParent: `devyard-conf-${suffix}` });
    return {
      driver,
      dataDir,
      memoryBytes: 64 * 1024 ** 2,
      leftovers: (boxId) => {
        const left: string[] = [];
        if (readFileSync('/proc/mounts', 'utf8').includes(join(dataDir, 'boxes', boxId))) left.push('mounts');
        if (execFileSync('ip', ['netns', 'list'], { encoding: 'utf8' }).includes(driver.network.netnsName(boxId))) left.push('netns');
        if (existsSync(`/sys/class/net/${driver.network.vethName(boxId)}`)) left.push('veth');
        for (const dir of driver.cgroups.boxDirs(boxId)) if (existsSync(dir)) left.push(`cgroup ${dir}`);
        if (existsSync(join(dataDir, 'boxes', boxId))) left.push('box dir');
        return left;
      },
      teardown: async () => {
        await driver.teardownHost();
        await rm(dataDir, { recursive: true, force: true });
      },
    };
  },
  microvm: async () => {
    const dataDir = await tempDir('vm');
    const driver = new MicrovmDriver({
      dataDir,
      uidShift: 100_000,
      busybox: '/usr/bin/busybox',
      network: { bridge: `dycv${suffix}`, subnet: '10.248.0.0/16', nftTable: `devyard_conf_vm_${suffix}`, vethPrefix: 'dcv' },
    });
    return {
      driver,
      dataDir,
      memoryBytes: 256 * 1024 ** 2,
      privateFiles: (boxId) => ['mem', 'root.qcow2', 'volume.ext4'].map((f) => join(dataDir, 'boxes', boxId, f)),
      leftovers: (boxId) => {
        const left: string[] = [];
        if (existsSync(`/sys/class/net/${driver.network.vethName(boxId)}`)) left.push('tap');
        if (existsSync(join(dataDir, 'boxes', boxId, 'mem'))) left.push('RAM file');
        if (existsSync(join(dataDir, 'boxes', boxId))) left.push('box dir');
        const uid = driver.vmUids.uidHeldBy(join(dataDir, 'boxes', boxId));
        if (uid !== undefined) left.push(`uid ${uid} still allocated`);
        for (const pid of readdirSync('/proc').filter((p) => /^\d+$/.test(p))) {
          try {
            if (readFileSync(`/proc/${pid}/cmdline`, 'utf8').includes(join(dataDir, 'boxes', boxId))) left.push(`process ${pid}`);
          } catch {
            /* gone */
          }
        }
        return left;
      },
      teardown: async () => {
        await driver.network.teardown();
        await rm(dataDir, { recursive: true, force: true });
      },
    };
  },
};

async function run(driver: RuntimeDriver, boxId: string, argv: string[], opts: { env?: Record<string, string>; input?: string } = {}): Promise<{ code: number; out: string; err: string }> {
  const p: ExecProcess = await driver.exec(boxId, { argv, ...(opts.env ? { env: opts.env } : {}) });
  let out = '';
  let err = '';
  p.stdout.on('data', (b: Buffer) => (out += b.toString()));
  p.stderr.on('data', (b: Buffer) => (err += b.toString()));
  p.stdin.end(opts.input ?? '');
  const ended = Promise.all([p.stdout, p.stderr].map((s) => new Promise((r) => s.once('close', r))));
  const code = await p.exited;
  await Promise.race([ended, sleep(200)]);
  return { code, out, err };
}

describe.each(Object.keys(RUNTIMES))('runtime conformance: %s', (runtime) => {
  let rt: RuntimeUnderTest;
  let image: BuiltImage;
  const boxes = new Set<string>();
  const spec = (boxId: string, over: Partial<BoxRuntimeSpec> = {}): BoxRuntimeSpec => {
    boxes.add(boxId);
    return {
      boxId,
      name: boxId.replace(/_/g, '-'),
      runtime,
      imageRootfs: image.rootfs,
      imageDigest: image.digest,
      resources: { cpuMillis: 1000, memoryBytes: rt.memoryBytes, pids: 256, diskBytes: 1024 ** 3 },
      env: { BOX_VAR: 'from-spec' },
      secrets: true,
      ...over,
    };
  };
  const up = async (s: BoxRuntimeSpec) => {
    await rt.driver.create(s);
    await rt.driver.start(s);
  };

  beforeAll(async () => {
    rt = await RUNTIMES[runtime]!();
    await rt.driver.init();
    image = await new BuiltinImageStore({ dataDir: rt.dataDir }).ensure('tiny');
    await up(spec('c_main'));
  });

  afterAll(async () => {
    for (const id of boxes) await rt.driver.destroy(id).catch(() => undefined);
    for (const id of boxes) expect(rt.leftovers(id)).toEqual([]);
    await rt.teardown();
  });

  test('exec: output, exit codes, signals, env, cwd, hostname, stdin', async () => {
    const d = rt.driver;
    expect((await run(d, 'c_main', ['true'])).code).toBe(0);
    expect((await run(d, 'c_main', ['sh', '-c', 'exit 7'])).code).toBe(7);
    expect((await run(d, 'c_main', ['sh', '-c', 'kill -9 $$'])).code).toBe(137);
    const r = await run(d, 'c_main', ['sh', '-c', 'echo out; echo err >&2; pwd; echo $HOME $BOX_VAR $EXTRA; hostname'], { env: { EXTRA: 'x1' } });
    expect(r.out).toBe('out\n/workspace\n/root from-spec x1\nc-main\n');
    expect(r.err).toBe('err\n');
    expect((await run(d, 'c_main', ['cat'], { input: 'round trip\n' })).out).toBe('round trip\n');
    const missing = await run(d, 'c_main', ['no-such-program']);
    // 127 in a VM (the guest agent's execve), 255 from `crun exec` in a sandbox: both say why.
    expect(missing.code).not.toBe(0);
    expect(missing.err).toContain('no-such-program');
    const p = await d.exec('c_main', { argv: ['sleep', '30'] });
    p.kill('SIGTERM');
    expect(await p.exited).toBe(143);
  });

  test('a terminal: isatty, size and resize', async () => {
    const p = await rt.driver.exec('c_main', { argv: ['sh'], tty: true, cols: 91, rows: 27 });
    let out = '';
    p.stdout.on('data', (b: Buffer) => (out += b.toString()));
    p.stdin.write('[ -t 0 ] && echo IS-A-TTY; stty size\n');
    for (let i = 0; i < 300 && !/27 91/.test(out); i++) await sleep(20);
    expect(out).toContain('IS-A-TTY');
    expect(out).toMatch(/27 91/);
    p.resize(120, 40);
    await sleep(100);
    p.stdin.write('stty size; exit 3\n');
    expect(await p.exited).toBe(3);
    expect(out).toMatch(/40 120/);
  });

  test('memory beyond the box is killed inside the box, not on the host', async () => {
    const limitMb = rt.memoryBytes / 1024 ** 2;
    expect((await run(rt.driver, 'c_main', ['sh', '-c', 'dd if=/dev/zero bs=16M count=1 2>/dev/null | wc -c'])).out.trim()).toBe(String(16 * 1024 ** 2));
    const oom = await run(rt.driver, 'c_main', ['dd', 'if=/dev/zero', 'of=/dev/null', `bs=${limitMb + 150}M`, 'count=1']);
    // A cgroup OOM-kills the process (137); a VM's kernel refuses an allocation larger than its
    // RAM outright (dd: memory exhausted, 1). Either way it fails inside the box, which runs on.
    expect([1, 137]).toContain(oom.code);
    expect((await rt.driver.inspect('c_main')).state).toBe('running');
  });

  test('TCP to a port inside the box', async () => {
    const srv = await rt.driver.exec('c_main', { argv: ['sh', '-c', 'while :; do echo hello-from-box | nc -l -p 7001 127.0.0.1; done'] });
    let got = '';
    for (let i = 0; i < 100 && !got; i++) {
      try {
        const s = await rt.driver.dial('c_main', 7001);
        got = await new Promise<string>((resolve) => {
          let b = '';
          s.on('data', (d: Buffer) => (b += d.toString()));
          s.on('end', () => resolve(b));
          s.on('error', () => resolve(b));
          s.end();
        });
      } catch (e) {
        expect((e as { code?: string }).code).toBe('PORT_REFUSED');
        await sleep(50);
      }
    }
    expect(got).toBe('hello-from-box\n');
    await expect(rt.driver.dial('c_main', 7999)).rejects.toMatchObject({ code: 'PORT_REFUSED' });
    srv.kill('SIGKILL');
    await srv.exited;
  });

  test('secrets: files and environment, replaced as a whole', async () => {
    const d = rt.driver;
    await d.writeSecrets!('c_main', [{ name: 'API_TOKEN', value: 's3cr3t-value' }]);
    expect((await run(d, 'c_main', ['sh', '-c', 'cat /run/devyard/secrets/API_TOKEN; echo; echo $API_TOKEN'])).out).toBe('s3cr3t-value\ns3cr3t-value\n');
    await d.writeSecrets!('c_main', []);
    expect((await run(d, 'c_main', ['ls', '/run/devyard/secrets'])).out).toBe('');
  });

  test('pause keeps a running process and its memory; resume continues it', async () => {
    const d = rt.driver;
    const bg = await d.exec('c_main', { argv: ['sh', '-c', 'i=0; while :; do i=$((i+1)); echo $i > /workspace/counter.tmp; mv /workspace/counter.tmp /workspace/counter; sleep 0.05; done'] });
    const read = async () => Number((await run(d, 'c_main', ['cat', '/workspace/counter'])).out.trim() || 0);
    for (let i = 0; i < 200 && (await read()) < 5; i++) await sleep(50);
    await d.pause('c_main');
    expect((await d.inspect('c_main')).state).toBe('paused');
    await expect(d.exec('c_main', { argv: ['true'] })).rejects.toThrow(/paused/);
    await d.resume('c_main');
    expect((await d.inspect('c_main')).state).toBe('running');
    const afterResume = await read();
    // Continues from where it was (the loop kept its memory), not from 1.
    expect(afterResume).toBeGreaterThanOrEqual(5);
    let later = afterResume;
    for (let i = 0; i < 200 && later <= afterResume; i++) {
      await sleep(50);
      later = await read();
    }
    expect(later).toBeGreaterThan(afterResume);
    bg.kill('SIGKILL');
    await run(d, 'c_main', ['sh', '-c', 'pkill -f counter.tmp; true']);
  });

  test('volumes survive stop and start; the root disk changes too', async () => {
    const d = rt.driver;
    await run(d, 'c_main', ['sh', '-c', 'echo ws-data > /workspace/keep; echo home-data > /root/keep; echo root-data > /etc/keep; sync']);
    await d.stop('c_main');
    expect((await d.inspect('c_main')).state).toBe('stopped');
    await d.start(spec('c_main'));
    expect((await run(d, 'c_main', ['cat', '/workspace/keep', '/root/keep', '/etc/keep'])).out).toBe('ws-data\nhome-data\nroot-data\n');
  });

  test('boxes cannot reach each other; the host can reach neither box directly from the other', async () => {
    await up(spec('c_peer'));
    const peerIp = (await rt.driver.inspect('c_peer')).ip!;
    const mainIp = (await rt.driver.inspect('c_main')).ip!;
    expect(peerIp).not.toBe(mainIp);
    const listener = await rt.driver.exec('c_peer', { argv: ['sh', '-c', 'while :; do echo peer | nc -l -p 7002; done'] });
    // The listener is up (reachable from inside its own box) …
    let own = '';
    for (let i = 0; i < 100 && !own.includes('peer'); i++) {
      own = (await run(rt.driver, 'c_peer', ['sh', '-c', 'nc -w 1 127.0.0.1 7002 </dev/null'])).out;
      if (!own.includes('peer')) await sleep(50);
    }
    expect(own).toContain('peer');
    // … but not from the other box.
    const cross = await run(rt.driver, 'c_main', ['sh', '-c', `nc -w 2 ${peerIp} 7002 </dev/null; echo rc=$?`]);
    expect(cross.out).not.toContain('peer');
    listener.kill('SIGKILL');
    await listener.exited;
  });

  test("a box's memory and disks on the host are private to it", async (ctx) => {
    if (!rt.privateFiles) ctx.skip();
    const owners = new Map<string, number>();
    for (const id of ['c_main', 'c_peer']) {
      for (const f of rt.privateFiles!(id)) {
        const st = statSync(f);
        expect(st.mode & 0o077, `${f} is mode ${(st.mode & 0o777).toString(8)}`).toBe(0);
        expect(st.uid, `${f} belongs to root`).not.toBe(0);
        owners.set(id, st.uid);
      }
    }
    expect(owners.get('c_main')).not.toBe(owners.get('c_peer'));
  });

  test('destroy leaves nothing behind', async () => {
    await rt.driver.destroy('c_peer');
    expect(rt.leftovers('c_peer')).toEqual([]);
    expect((await rt.driver.inspect('c_peer')).state).toBe('absent');
    // Destroy is idempotent.
    await rt.driver.destroy('c_peer');
  });

  test('egress reaches the internet; the host on the bridge address is not a destination', async () => {
    const gw = runtime === 'sandbox' ? (rt.driver as SandboxDriver).network.gateway : (rt.driver as MicrovmDriver).network.gateway;
    const world = await startOutsideWorld(`c${suffix}${runtime === 'sandbox' ? 's' : 'v'}`, [INTERNET], 8080);
    const server = createServer((s) => s.end('host-reached\n'));
    await new Promise<void>((r) => server.listen(0, gw, r));
    const port = (server.address() as { port: number }).port;
    try {
      expect((await run(rt.driver, 'c_main', ['sh', '-c', `nc -w 3 ${INTERNET} 8080 </dev/null`])).out).toBe(`hello ${INTERNET}\n`);
      expect((await run(rt.driver, 'c_main', ['sh', '-c', `nc -w 2 ${gw} ${port} </dev/null`])).out).toBe('');
    } finally {
      server.close();
      world.close();
    }
  });
});
