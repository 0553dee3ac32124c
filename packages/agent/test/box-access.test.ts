/**
 * Access to a box from outside, against real crun boxes: the box tools bundle (rsync and
 * sftp-server in any image, driven by the host's rsync and scp through driver.exec), dialing the
 * box's own localhost (driver.dial), and the agent's TCP tunnel endpoint.
 */
import { execFile, spawn } from 'node:child_process';
import { existsSync, readFileSync } from 'node:fs';
import { chmod, mkdir, mkdtemp, readFile, rm, stat, writeFile } from 'node:fs/promises';
import { connect, createServer, type Server, type Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createHash, randomBytes } from 'node:crypto';
import { promisify } from 'node:util';
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { WebSocket } from 'ws';
import { signSessionToken } from '@devyard/api/session-tokens';
import { TUNNEL_CLOSE } from '@devyard/api/tunnel-protocol';
import { ExecServer } from '@devyard/agent/exec-server';
import { BuiltinImageStore } from '@devyard/agent/images/builtin-image-store';
import { ensureBoxToolsBundle } from '@devyard/agent/runtime/box-tools-bundle';
import { DIALER_SOURCE, NetnsDialer } from '@devyard/agent/runtime/sandbox/netns-dialer-process';
import { SandboxDriver } from '@devyard/agent/runtime/sandbox/sandbox-driver';
import { boxLeftovers, run, startBox, testBoxSpec, testDriver } from './sandbox-test-host.js';

const exec = promisify(execFile);
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
const KEY = 'box-access-test-key';
const BOX = 'b_acc1';

/** Whether a process exists (zombies count as gone). */
function alive(pid: number): boolean {
  try {
    return !/^\d+ \(.*\) Z/.test(readFileSync(`/proc/${pid}/stat`, 'utf8'));
  } catch {
    return false;
  }
}

async function waitGone(pid: number, ms = 5_000): Promise<boolean> {
  const deadline = Date.now() + ms;
  while (Date.now() < deadline) {
    if (!alive(pid)) return true;
    await sleep(50);
  }
  return !alive(pid);
}

/** Reads a socket to its end. */
function readAll(s: Socket): Promise<Buffer> {
  return new Promise((resolve, reject) => {
    const parts: Buffer[] = [];
    s.on('data', (d: Buffer) => parts.push(d));
    s.on('end', () => resolve(Buffer.concat(parts)));
    s.on('error', reject);
  });
}

interface TunnelResult {
  code: number;
  reason: string;
  data: Buffer;
  eof: boolean;
}

/** Opens a tunnel, sends `send` in chunks then eof, and collects everything until the close. */
function tunnel(url: string, send?: Buffer): Promise<TunnelResult> {
  return new Promise((resolve, reject) => {
    const ws = new WebSocket(url);
    const parts: Buffer[] = [];
    let eof = false;
    ws.on('message', (d: Buffer, isBinary: boolean) => {
      if (isBinary) parts.push(Buffer.from(d));
      else if (JSON.parse(d.toString()).type === 'eof') eof = true;
    });
    ws.on('open', () => {
      if (!send) return;
      for (let off = 0; off < send.length; off += 64 * 1024) ws.send(send.subarray(off, off + 64 * 1024));
      ws.send(JSON.stringify({ type: 'eof' }));
    });
    ws.on('close', (code, reason) => resolve({ code, reason: reason.toString(), data: Buffer.concat(parts), eof }));
    ws.on('unexpected-response', (_req, res) => reject(Object.assign(new Error(`HTTP ${res.statusCode}`), { status: res.statusCode })));
    ws.on('error', reject);
  });
}

describe('box access: tools bundle, dial, tunnel', () => {
  let driver: SandboxDriver;
  let dataDir: string;
  let work: string;
  let relay: Server;
  let relaySock: string;
  let server: ExecServer;
  let base: string;
  let image: { rootfs: string; digest: string };
  const logs: Array<{ msg: string; fields?: Record<string, unknown> }> = [];
  const boxes = new Set<string>();

  beforeAll(async () => {
    ({ driver, dataDir } = await testDriver('acc', 239));
    await driver.init();
    image = await new BuiltinImageStore({ dataDir }).ensure('tiny');
    boxes.add(BOX);
    await startBox(driver, testBoxSpec(BOX, image));
    work = await mkdtemp(join(tmpdir(), 'dy-acc-work-'));

    // A stand-in for the SSH gateway's session channel: a host program connects to this socket,
    // names the command, and is piped to that command run in the box by driver.exec.
    relaySock = join(work, 'relay.sock');
    relay = createServer({ allowHalfOpen: true }, (c) => {
      let head = Buffer.alloc(0);
      const onData = (d: Buffer) => {
        head = Buffer.concat([head, d]);
        const nl = head.indexOf(10);
        if (nl < 0) return;
        c.off('data', onData);
        c.pause();
        const argv = JSON.parse(head.subarray(0, nl).toString()) as string[];
        const rest = head.subarray(nl + 1);
        void driver.exec(BOX, { argv, cwd: '/' }).then(
          (p) => {
            if (rest.length) p.stdin.write(rest);
            c.pipe(p.stdin);
            p.stdout.pipe(c);
            p.stderr.on('data', (e: Buffer) => process.stderr.write(`[box ${argv[0]}] ${e}`));
            c.on('error', () => p.kill('SIGKILL'));
          },
          () => c.destroy(),
        );
      };
      c.on('data', onData);
    });
    await new Promise<void>((r) => relay.listen(relaySock, r));
    await writeFile(
      join(work, 'relay.mjs'),
      `import net from 'node:net';
const [sock, ...argv] = process.argv.slice(2);
const c = net.connect(sock);
c.write(JSON.stringify(argv) + '\\n');
process.stdin.pipe(c);
c.pipe(process.stdout);
c.on('end', () => process.stdin.destroy());
`,
    );
    const node = process.execPath;
    // rsync runs `<rsh> <host> rsync --server …`; scp runs `<ssh> … <host> sftp` (the SFTP subsystem).
    await writeFile(join(work, 'rsh.sh'), `#!/bin/sh\nshift\nexec ${node} ${join(work, 'relay.mjs')} ${relaySock} "$@"\n`);
    await writeFile(join(work, 'scp-ssh.sh'), `#!/bin/sh\nexec ${node} ${join(work, 'relay.mjs')} ${relaySock} sftp-server\n`);
    await chmod(join(work, 'rsh.sh'), 0o755);
    await chmod(join(work, 'scp-ssh.sh'), 0o755);

    server = new ExecServer({
      host: '127.0.0.1',
      port: 0,
      driver,
      sessionKey: () => KEY,
      log: (msg, fields) => logs.push({ msg, fields }),
    });
    base = (await server.listen()).replace(/^http/, 'ws');
  });

  afterAll(async () => {
    const dialer = driver?.dialerPid(BOX);
    await server?.close();
    await new Promise((r) => (relay ? relay.close(r) : r(undefined)));
    for (const id of boxes) await driver.destroy(id);
    for (const id of boxes) expect(boxLeftovers(driver, dataDir, id)).toEqual([]);
    if (dialer) expect(await waitGone(dialer)).toBe(true);
    await driver.teardownHost();
    await rm(dataDir, { recursive: true, force: true });
    await rm(work, { recursive: true, force: true });
  });

  test('the tools bundle: rebuilt only when inputs change, a missing tool is left out, world-readable', async () => {
    const dir = join(work, 'bundle-test', 'tools');
    const warnings: string[] = [];
    const log = (msg: string) => warnings.push(msg);
    const tools = [
      { name: 'rsync', hostPath: '/usr/bin/rsync' },
      { name: 'nope', hostPath: '/nonexistent/bin/nope' },
    ];
    const first = await ensureBoxToolsBundle({ dir, tools, log });
    expect(first).toMatchObject({ tools: ['rsync'], rebuilt: true });
    expect(warnings).toContain('box tools: left out');
    expect((await ensureBoxToolsBundle({ dir, tools, log })).rebuilt).toBe(false);
    const wrapper = await readFile(join(dir, 'bin/rsync'), 'utf8');
    expect(wrapper.split('\n')[0]).toBe('#!/.devyard/busybox sh');
    expect(wrapper).toContain('exec /.devyard/tools/lib/ld-linux-x86-64.so.2 --library-path /.devyard/tools/lib /.devyard/tools/libexec/rsync "$@"');
    for (const p of ['', 'bin', 'lib', 'libexec', 'bin/rsync', 'libexec/rsync', 'lib/libc.so.6', 'lib/ld-linux-x86-64.so.2']) {
      expect((await stat(join(dir, p))).mode & 0o005, p).toBe(0o005);
    }
    // A changed input (here: the stamp no longer matching) rebuilds it.
    await writeFile(join(dir, '.stamp'), 'stale\n');
    expect((await ensureBoxToolsBundle({ dir, tools, log })).rebuilt).toBe(true);
    expect(existsSync(join(dir, 'libexec/nope'))).toBe(false);
  });

  test('rsync and sftp-server run in a busybox-only box and are on PATH', async () => {
    const v = await run(driver, BOX, ['/.devyard/tools/bin/rsync', '--version']);
    expect(v.code).toBe(0);
    expect(v.out).toMatch(/rsync\s+version/);
    const onPath = await run(driver, BOX, ['sh', '-c', 'echo $PATH; command -v rsync; command -v sftp-server; rsync --version >/dev/null && echo ok']);
    expect(onPath.out.split('\n')).toEqual([
      expect.stringMatching(/:\/\.devyard\/tools\/bin$/),
      '/.devyard/tools/bin/rsync',
      '/.devyard/tools/bin/sftp-server',
      'ok',
      '',
    ]);
    // A session's own PATH still finds them, after its own directories.
    expect((await run(driver, BOX, ['sh', '-c', 'echo $PATH; command -v sftp-server'], { PATH: '/usr/bin:/bin' })).out).toBe(
      '/usr/bin:/bin:/.devyard/tools/bin\n/.devyard/tools/bin/sftp-server\n',
    );
    // The bundle is read-only in the box.
    expect((await run(driver, BOX, ['sh', '-c', 'touch /.devyard/tools/x'])).code).not.toBe(0);
    // sftp-server answers an SFTP INIT (type 1, version 3) with a VERSION packet (type 2).
    const p = await driver.exec(BOX, { argv: ['sftp-server'], cwd: '/' });
    const reply = new Promise<Buffer>((resolve) => {
      let got = Buffer.alloc(0);
      p.stdout.on('data', (d: Buffer) => {
        got = Buffer.concat([got, d]);
        if (got.length >= 4 && got.length >= 4 + got.readUInt32BE(0)) resolve(got);
      });
    });
    p.stdin.write(Buffer.from([0, 0, 0, 5, 1, 0, 0, 0, 3]));
    const pkt = await reply;
    expect(pkt[4]).toBe(2);
    expect(pkt.readUInt32BE(5)).toBe(3);
    p.stdin.end();
    expect(await p.exited).toBe(0);
  });

  test('host rsync and scp copy files into and out of the box through an exec session', async () => {
    const src = join(work, 'src');
    await mkdir(join(src, 'sub'), { recursive: true });
    const big = randomBytes(300 * 1024);
    await writeFile(join(src, 'a.txt'), 'alpha\n');
    await writeFile(join(src, 'sub/big.bin'), big);
    await exec('rsync', ['-a', '--rsh', join(work, 'rsh.sh'), `${src}/`, 'box:/tmp/dst/'], { timeout: 60_000 });
    const inBox = await run(driver, BOX, ['sh', '-c', 'cat /tmp/dst/a.txt; md5sum /tmp/dst/sub/big.bin']);
    const md5 = (await exec('md5sum', [join(src, 'sub/big.bin')])).stdout.split(' ')[0];
    expect(inBox.out).toBe(`alpha\n${md5}  /tmp/dst/sub/big.bin\n`);
    // A second run transfers nothing new (the remote rsync compared checksums and times).
    const again = await exec('rsync', ['-a', '--stats', '--rsh', join(work, 'rsh.sh'), `${src}/`, 'box:/tmp/dst/'], { timeout: 60_000 });
    expect(again.stdout).toMatch(/Number of regular files transferred: 0/);

    // scp (SFTP protocol since OpenSSH 9.0) both ways.
    const scpOpts = ['-S', join(work, 'scp-ssh.sh'), '-o', 'BatchMode=yes'];
    await exec('scp', [...scpOpts, join(src, 'sub/big.bin'), 'box:/tmp/scp.bin'], { timeout: 60_000 });
    expect((await run(driver, BOX, ['md5sum', '/tmp/scp.bin'])).out).toBe(`${md5}  /tmp/scp.bin\n`);
    await exec('scp', [...scpOpts, 'box:/tmp/dst/a.txt', join(work, 'back.txt')], { timeout: 60_000 });
    expect(await readFile(join(work, 'back.txt'), 'utf8')).toBe('alpha\n');
  });

  test('dial reaches servers on the box localhost; refusals and box states have codes', async () => {
    await run(driver, BOX, ['sh', '-c', 'mkdir -p /tmp/www && echo hello-from-box > /tmp/www/hello.txt']);
    expect((await run(driver, BOX, ['httpd', '-p', '127.0.0.1:8080', '-h', '/tmp/www'])).code).toBe(0);
    let s: Socket | undefined;
    for (let i = 0; i < 100 && !s; i++) {
      s = await driver.dial(BOX, 8080).catch(async (e: { code?: string }) => {
        if (e.code !== 'PORT_REFUSED') throw e;
        await sleep(50);
        return undefined;
      });
    }
    s!.end('GET /hello.txt HTTP/1.0\r\nHost: box\r\n\r\n');
    const res = (await readAll(s!)).toString();
    expect(res).toMatch(/^HTTP\/1\.[01] 200/);
    expect(res).toContain('hello-from-box');
    // Bound to the box's loopback: not reachable at the box's address from the host.
    const ip = (await driver.inspect(BOX)).ip!;
    await expect(new Promise((resolve, reject) => connect(8080, ip).on('connect', resolve).on('error', reject))).rejects.toMatchObject({ code: 'ECONNREFUSED' });

    await expect(driver.dial(BOX, 8081)).rejects.toMatchObject({ code: 'PORT_REFUSED' });
    await expect(driver.dial('b_acc_none', 8080)).rejects.toMatchObject({ code: 'BOX_NOT_RUNNING' });
    await driver.pause(BOX);
    try {
      await expect(driver.dial(BOX, 8080)).rejects.toMatchObject({ code: 'BOX_PAUSED' });
    } finally {
      await driver.resume(BOX);
    }
    // One dialer serves every dial of the box.
    const pid = driver.dialerPid(BOX);
    expect(pid).toBeGreaterThan(0);
    const s2 = await driver.dial(BOX, 8080);
    s2.destroy();
    expect(driver.dialerPid(BOX)).toBe(pid);
  });

  test('a dialer exits when idle, and when its parent dies', async () => {
    const netnsPath = driver.network.netnsPath(BOX);
    const d = new NetnsDialer({ netnsPath, idleMs: 300 });
    const s = await d.dial(8080);
    s.destroy();
    const pid = d.pid!;
    await d.exited;
    expect(await waitGone(pid)).toBe(true);
    await expect(d.dial(8080)).rejects.toMatchObject({ code: 'DIALER_EXITED' });

    // A parent killed outright (no chance to clean up) still takes its dialer with it.
    const parentSrc = `
const { spawn } = require('node:child_process');
const c = spawn('nsenter', ['--net=' + process.env.DY_NS, '--', process.execPath, '-e', process.env.DY_SRC], { stdio: ['ignore', 'inherit', 'inherit', 'ipc'] });
c.on('message', () => {});
c.send({ id: 1, port: 8080 });
c.on('message', () => console.log('pid ' + c.pid));
`;
    const parent = spawn(process.execPath, ['-e', parentSrc], { env: { ...process.env, DY_NS: netnsPath, DY_SRC: DIALER_SOURCE }, stdio: ['ignore', 'pipe', 'inherit'] });
    const childPid = await new Promise<number>((resolve) => {
      let out = '';
      parent.stdout.on('data', (b: Buffer) => {
        out += b.toString();
        const m = /pid (\d+)/.exec(out);
        if (m) resolve(Number(m[1]));
      });
    });
    expect(alive(childPid)).toBe(true);
    parent.kill('SIGKILL');
    expect(await waitGone(childPid)).toBe(true);
  });

  test('the tcp tunnel endpoint: auth, close codes, a large echo round trip with half-close', async () => {
    const token = (boxId: string) => signSessionToken({ boxId, sub: 'u_test', exp: Date.now() + 60_000 }, KEY);
    const url = (boxId: string, port: number | string, tok = token(boxId)) => `${base}/v1/boxes/${boxId}/tcp?port=${port}&token=${encodeURIComponent(tok)}`;

    await expect(tunnel(url(BOX, 9000, 'bad.token'))).rejects.toMatchObject({ status: 401 });
    await expect(tunnel(url(BOX, 9000, token('b_other')))).rejects.toMatchObject({ status: 401 });
    await expect(tunnel(url(BOX, 'x'))).rejects.toMatchObject({ status: 400 });

    const refused = await tunnel(url(BOX, 8081));
    expect(refused.code).toBe(TUNNEL_CLOSE.refused);
    expect(refused.reason).toContain('8081');
    expect(Buffer.byteLength(refused.reason)).toBeLessThan(120);
    expect((await tunnel(url('b_acc_none', 8080))).code).toBe(TUNNEL_CLOSE.unavailable);

    // An echo server: each connection gets its own `cat`, which ends when it reads EOF.
    expect((await run(driver, BOX, ['sh', '-c', 'nc -ll -p 9000 -e cat </dev/null >/dev/null 2>&1 &'])).code).toBe(0);
    for (let i = 0; i < 100; i++) {
      const ok = await driver.dial(BOX, 9000).then(
        (s) => (s.destroy(), true),
        () => false,
      );
      if (ok) break;
      await sleep(50);
    }
    const payload = randomBytes(3 * 1024 * 1024 + 123);
    const echo = await tunnel(url(BOX, 9000), payload);
    expect(echo.code).toBe(1000);
    expect(echo.eof).toBe(true);
    expect(echo.data.length).toBe(payload.length);
    expect(echo.data.equals(payload)).toBe(true);

    // The HTTP server speaks after the request's half-close; the response comes back in full.
    const http = await tunnel(url(BOX, 8080), Buffer.from('GET /hello.txt HTTP/1.0\r\n\r\n'));
    expect(http.code).toBe(1000);
    expect(http.data.toString()).toContain('hello-from-box');

    const msgs = logs.map((l) => l.msg);
    expect(msgs).toContain('tcp session');
    expect(msgs).toContain('tcp session refused');
    expect(logs.find((l) => l.msg === 'tcp session ended' && l.fields?.port === 9000)?.fields).toMatchObject({ bytesIn: payload.length, bytesOut: payload.length });
  });

  test('a data dir others cannot search: the bundle reaches boxes through a bind under /run', async () => {
    // `work` is a 0700 temp dir, like /root for a default data dir.
    const suffix = Math.random().toString(36).slice(2, 7);
    const d2 = new SandboxDriver({
      dataDir: join(work, 'private-data'),
      network: { bridge: `dyt${suffix}`, subnet: '10.241.0.0/16', nftTable: `devyard_test_${suffix}`, netnsPrefix: 'dyt-', vethPrefix: 'dyt' },
      cgroupParent: `devyard-test-acc2-${suffix}`,
    });
    const exposed = `/run/devyard/tools-${createHash('sha256').update(join(work, 'private-data', 'tools')).digest('hex').slice(0, 16)}`;
    const mountsOf = () => readFileSync('/proc/self/mountinfo', 'utf8').split('\n').filter((l) => l.split(' ')[4] === exposed);
    try {
      await d2.init();
      // A second init (an agent restart) replaces the bind rather than stacking one.
      await d2.init();
      expect(mountsOf()).toHaveLength(1);
      await startBox(d2, testBoxSpec('b_acc2', image));
      const r = await run(d2, 'b_acc2', ['rsync', '--version']);
      expect(r.code).toBe(0);
      expect(r.out).toMatch(/rsync\s+version/);
    } finally {
      await d2.destroy('b_acc2');
      expect(boxLeftovers(d2, join(work, 'private-data'), 'b_acc2')).toEqual([]);
      await d2.teardownHost();
    }
    expect(mountsOf()).toEqual([]);
  });

  test('stopping the box ends its dialer', async () => {
    await driver.dial(BOX, 8080).then((s) => s.destroy());
    const pid = driver.dialerPid(BOX)!;
    expect(alive(pid)).toBe(true);
    await driver.stop(BOX, { graceMs: 0 });
    expect(await waitGone(pid)).toBe(true);
    expect(driver.dialerPid(BOX)).toBeUndefined();
    await expect(driver.dial(BOX, 8080)).rejects.toMatchObject({ code: 'BOX_NOT_RUNNING' });
  });
});
