/**
 * The microVM guest agent and its host channel, without a VM: the real agent (compiled here) runs
 * on this host in test mode (`--unix`, `--root /`) and GuestChannel drives it over a unix socket.
 * SET_IDENTITY and NET_CONFIG are not exercised: on the host they would change its hostname or
 * network; QUIESCE only empties a temporary directory (and syncs the host's disks).
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import { once } from 'node:events';
import { mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { createServer, type AddressInfo, type Server, type Socket } from 'node:net';
import { hostname, release, tmpdir } from 'node:os';
import { join } from 'node:path';
import { Duplex, type Readable } from 'node:stream';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ensureGuestAgent } from '@devyard/agent/runtime/microvm/guest-agent-binary';
import { GuestChannel, type GuestChannelOptions } from '@devyard/agent/runtime/microvm/guest-channel';
import type { ExecOptions } from '@devyard/agent/runtime/runtime-driver';
import { FakeGuest, frame, GUEST, GUEST_SANDBOX, HOST, i32, RawHost, type Frame } from './guest-frame-fixture.js';

interface Agent {
  proc: ChildProcess;
  server: Server;
  channel: GuestChannel;
}

let dir: string;
let bin: string;
let agentCount = 0;
const agents: Agent[] = [];
const servers: Server[] = [];
let main: GuestChannel;

/** Starts the agent against a fresh unix socket and opens a channel on the accepted connection. */
async function startAgent(): Promise<Agent> {
  const sock = join(dir, `agent-${++agentCount}.sock`);
  const server = createServer();
  server.listen(sock);
  await once(server, 'listening');
  const accepted = once(server, 'connection') as Promise<[Socket]>;
  // host-programs: none (the guest agent, compiled by this test)
  const proc = spawn(bin, ['--unix', sock, '--root', '/'], { stdio: ['ignore', 'ignore', 'inherit'] });
  const [conn] = await accepted;
  const agent = { proc, server, channel: await GuestChannel.open(conn) };
  agents.push(agent);
  return agent;
}

async function collect(stream: Readable): Promise<Buffer> {
  const chunks: Buffer[] = [];
  for await (const chunk of stream) chunks.push(chunk as Buffer);
  return Buffer.concat(chunks);
}

async function run(opts: ExecOptions, input?: Buffer | string, channel = main) {
  const p = await channel.exec(opts);
  const out = collect(p.stdout);
  const err = collect(p.stderr);
  if (input !== undefined) p.stdin.end(input);
  return { code: await p.exited, stdout: (await out).toString(), stderr: (await err).toString() };
}

const sha = (b: Buffer) => createHash('sha256').update(b).digest('hex');

async function listen(server: Server): Promise<number> {
  servers.push(server);
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  return (server.address() as AddressInfo).port;
}

beforeAll(async () => {
  dir = mkdtempSync(join(tmpdir(), 'devyard-guest-'));
  bin = await ensureGuestAgent(join(dir, 'cache'));
  main = (await startAgent()).channel;
});

afterAll(async () => {
  for (const a of agents) {
    await a.channel.close();
    a.proc.kill('SIGKILL');
    a.server.close();
  }
  for (const s of servers) s.close();
  rmSync(dir, { recursive: true, force: true });
});

describe('ensureGuestAgent', () => {
  it('compiles once per source version and shares concurrent builds', async () => {
    expect(bin).toMatch(/guest-agent-[0-9a-f]{16}$/);
    const again = await Promise.all([ensureGuestAgent(join(dir, 'cache')), ensureGuestAgent(join(dir, 'cache'))]);
    expect(again).toEqual([bin, bin]);
    expect(readdirSync(join(dir, 'cache'))).toEqual([bin.split('/').pop()]);
  });
});

describe('the guest channel against the real guest agent', () => {
  it('answers HELLO with the kernel release, hostname and boot id', () => {
    expect(main.kernelRelease).toBe(release());
    expect(main.hostname).toBe(hostname());
    expect(main.bootId).toBe(readFileSync('/proc/sys/kernel/random/boot_id', 'utf8').trim());
  });

  it('runs a process with separate stdout and stderr and its exit code', async () => {
    const r = await run({ argv: ['sh', '-c', 'echo out; echo err >&2; exit 3'], cwd: '/' });
    expect(r).toEqual({ code: 3, stdout: 'out\n', stderr: 'err\n' });
  });

  it('passes the environment and searches its PATH', async () => {
    const r = await run({ argv: ['sh', '-c', 'echo "$FOO:$PATH"'], env: { FOO: 'bar', PATH: '/usr/bin:/bin' } });
    expect(r.stdout).toBe('bar:/usr/bin:/bin\n');
  });

  it('round-trips stdin through cat, including a megabyte and EOF', async () => {
    const data = randomBytes(1 << 20);
    const p = await main.exec({ argv: ['cat'] });
    const out = collect(p.stdout);
    p.stdin.write(data.subarray(0, 1000));
    p.stdin.end(data.subarray(1000));
    expect(await p.exited).toBe(0);
    expect(sha(await out)).toBe(sha(data));
  });

  it('reports 128+signal when the process is killed', async () => {
    const term = await main.exec({ argv: ['sleep', '100'] });
    term.kill();
    expect(await term.exited).toBe(143);
    const killed = await main.exec({ argv: ['sleep', '100'] });
    killed.kill('SIGKILL');
    expect(await killed.exited).toBe(137);
  });

  it('exits 127 with a message when the program does not exist', async () => {
    const r = await run({ argv: ['devyard-no-such-program'] });
    expect(r).toEqual({ code: 127, stdout: '', stderr: 'devyard: devyard-no-such-program: No such file or directory\n' });
    const abs = await run({ argv: ['/nonexistent/prog'] });
    expect([abs.code, abs.stderr]).toEqual([127, 'devyard: /nonexistent/prog: No such file or directory\n']);
  });

  it('starts in cwd, or in / when cwd does not exist', async () => {
    expect((await run({ argv: ['pwd'], cwd: dir })).stdout).toBe(`${dir}\n`);
    expect((await run({ argv: ['pwd'], cwd: join(dir, 'missing') })).stdout).toBe('/\n');
  });

  it('sends EXIT when the process ends even if a background child holds its pipes', async () => {
    const started = Date.now();
    const r = await run({ argv: ['sh', '-c', 'sleep 5 & echo hi'] });
    expect(r).toEqual({ code: 0, stdout: 'hi\n', stderr: '' });
    expect(Date.now() - started).toBeLessThan(4000);
  });

  it('gives a tty process a pty as its controlling terminal', async () => {
    const r = await run({ argv: ['tty'], tty: true });
    expect(r.code).toBe(0);
    expect(r.stdout).toMatch(/^\/dev\/pts\/\d+\r\n$/);
    expect(r.stderr).toBe('');
    const size = await run({ argv: ['stty', 'size'], tty: true, cols: 100, rows: 30 });
    expect(size.stdout).toBe('30 100\r\n');
  });

  it('resizes the terminal and forwards input to it', async () => {
    const p = await main.exec({ argv: ['sh', '-c', 'read x; echo "got $x"; stty size'], tty: true, cols: 80, rows: 24 });
    const out = collect(p.stdout);
    p.resize(120, 40);
    p.stdin.write('go\n');
    expect(await p.exited).toBe(0);
    const text = (await out).toString();
    expect(text).toContain('got go\r\n');
    expect(text).toContain('40 120\r\n');
  });

  it('runs many sessions at once', async () => {
    const results = await Promise.all(
      Array.from({ length: 20 }, (_, i) => run({ argv: ['sh', '-c', 'cat; echo " $0"; exit $(($0 % 7))', String(i)] }, `in${i}`)),
    );
    results.forEach((r, i) => expect([r.code, r.stdout]).toEqual([i % 7, `in${i} ${i}\n`]));
  });

  it('dials a TCP port in the guest with half-close both ways', async () => {
    const port = await listen(createServer({ allowHalfOpen: true }, (s) => s.pipe(s)));
    const sock = await main.dial(port);
    const back = collect(sock);
    sock.end('hello');
    expect((await back).toString()).toBe('hello');

    const big = randomBytes(5 * 1000 * 1000);
    const sock2 = await main.dial(port);
    const back2 = collect(sock2);
    sock2.end(big);
    expect(sha(await back2)).toBe(sha(big));
  });

  it('refuses a dial to a port where nothing listens', async () => {
    const server = createServer();
    const port = await listen(server);
    await new Promise((r) => server.close(r));
    await expect(main.dial(port)).rejects.toMatchObject({ code: 'PORT_REFUSED' });
  });

  it('puts and gets files, refusing .. components', async () => {
    const data = randomBytes(1_000_000);
    const path = join(dir, 'files/sub/deep/blob.bin');
    await main.putFile(path, data, 0o600);
    expect(sha(readFileSync(path))).toBe(sha(data));
    expect(statSync(path).mode & 0o777).toBe(0o600);
    expect(sha(await main.getFile(path))).toBe(sha(data));
    await main.putFile(path, 'small');
    expect((await main.getFile(path)).toString()).toBe('small');
    expect(statSync(path).mode & 0o777).toBe(0o644);
    expect(readdirSync(join(dir, 'files/sub/deep'))).toEqual(['blob.bin']);

    await expect(main.putFile(`${dir}/files/../escape`, 'x')).rejects.toThrow(/Invalid argument/);
    await expect(main.getFile(`${dir}/../etc/passwd`)).rejects.toThrow(/Invalid argument/);
    await expect(main.getFile(join(dir, 'files/missing'))).rejects.toThrow(/No such file/);
    await expect(main.getFile(join(dir, 'files'))).rejects.toThrow(/Is a directory/);
  });

  it('replaces a directory with exactly the given files', async () => {
    const target = join(dir, 'secrets');
    mkdirSync(join(target, 'old-dir'), { recursive: true });
    writeFileSync(join(target, 'STALE'), 'x');
    writeFileSync(join(target, 'KEEP'), 'old');
    await main.replaceDir(target, [
      { name: 'KEEP', data: 'new' },
      { name: 'ADDED', data: Buffer.from([0, 1, 2]) },
    ]);
    expect(readdirSync(target).sort()).toEqual(['ADDED', 'KEEP']);
    expect(readFileSync(join(target, 'KEEP'), 'utf8')).toBe('new');
    expect([...readFileSync(join(target, 'ADDED'))]).toEqual([0, 1, 2]);
    expect(statSync(join(target, 'KEEP')).mode & 0o777).toBe(0o440);
    await main.replaceDir(join(dir, 'created/here'), []);
    expect(readdirSync(join(dir, 'created/here'))).toEqual([]);
    await expect(main.replaceDir(target, [{ name: '../x', data: '' }])).rejects.toThrow(/invalid file name/);
    await expect(main.replaceDir(`${target}/..`, [])).rejects.toThrow(/Invalid argument/);
  });

  it('reports health figures', async () => {
    const h = await main.health();
    expect(Object.keys(h).sort()).toEqual(['idle_ms', 'load1', 'mem_available_kb', 'mem_total_kb', 'procs', 'uptime']);
    for (const v of Object.values(h)) expect(Number.isFinite(v)).toBe(true);
    expect(h.mem_total_kb).toBeGreaterThan(0);
    expect(h.procs).toBeGreaterThan(1);
  });

  it('refuses QUIESCE of a path with .. components', async () => {
    await expect(main.quiesce(`${dir}/../x`)).rejects.toThrow(/Invalid argument/);
  });

  it('forgets every session on a second HELLO', async () => {
    const { channel } = await startAgent();
    const cat = await channel.exec({ argv: ['cat'] });
    const out = collect(cat.stdout);
    cat.stdin.write('before\n');
    const port = await listen(createServer({ allowHalfOpen: true }, (s) => s.pipe(s)));
    const sock = await channel.dial(port);
    const sockError = once(sock, 'error');
    await channel.hello();
    expect(await cat.exited).toBe(255);
    await out; // ended
    expect((await sockError)[0]).toBeInstanceOf(Error);
    // The channel keeps working with new sessions.
    expect((await run({ argv: ['echo', 'after'] }, undefined, channel)).stdout).toBe('after\n');
  });

  it('connect() waits for the socket to appear', async () => {
    // A relay stands in for QEMU's chardev socket, created only after connect() started trying.
    const sock = join(dir, 'late.sock');
    const sockPath = join(dir, `agent-${agentCount + 1}.sock`);
    const agentServer = createServer();
    agentServer.listen(sockPath);
    await once(agentServer, 'listening');
    const accepted = once(agentServer, 'connection') as Promise<[Socket]>;
    // host-programs: none (the guest agent, compiled by this test)
    const proc = spawn(bin, ['--unix', sockPath, '--root', '/'], { stdio: ['ignore', 'ignore', 'inherit'] });
    agentCount++;
    const [agentConn] = await accepted;
    const relay = createServer((c) => c.pipe(agentConn).pipe(c));
    servers.push(relay);
    setTimeout(() => relay.listen(sock), 200);
    const channel = await GuestChannel.connect(sock, { timeoutMs: 5000 });
    agents.push({ proc, server: agentServer, channel });
    expect(channel.kernelRelease).toBe(release());
  });

  it('close() ends sessions and dials, and the agent exits with the connection', async () => {
    const agent = await startAgent();
    const sleeper = await agent.channel.exec({ argv: ['sleep', '3'] });
    const port = await listen(createServer({ allowHalfOpen: true }, (s) => s.pipe(s)));
    const sock = await agent.channel.dial(port);
    const sockError = once(sock, 'error');
    const agentExit = once(agent.proc, 'exit');
    await agent.channel.close();
    expect(await sleeper.exited).toBe(255);
    await collect(sleeper.stdout);
    expect((await sockError)[0]).toBeInstanceOf(Error);
    await agent.channel.closed;
    expect(await agentExit).toEqual([0, null]);
    await expect(agent.channel.health()).rejects.toThrow(/closed/);
  });
});

describe('sealed frames', () => {
  /** The frames of a byte stream: [type, payload] each. */
  function frames(stream: Buffer): Array<[number, Buffer]> {
    const out: Array<[number, Buffer]> = [];
    for (let off = 0; off + 9 <= stream.length; ) {
      const len = stream.readUInt32LE(off);
      out.push([stream.readUInt8(off + 8), stream.subarray(off + 9, off + 9 + len)]);
      off += 9 + len;
    }
    return out;
  }

  it('secrets cross the wire only sealed (EXEC environments, REPLACE_DIR files); QUIESCE makes the guest draw a new key', async () => {
    const sock = join(dir, 'sealed.sock');
    const server = createServer();
    server.listen(sock);
    await once(server, 'listening');
    const accepted = once(server, 'connection') as Promise<[Socket]>;
    // host-programs: none (the guest agent, compiled by this test)
    const proc = spawn(bin, ['--unix', sock, '--root', '/'], { stdio: ['ignore', 'ignore', 'inherit'] });
    const [conn] = await accepted;
    // Everything the host sends, as the guest's receive buffers would keep it.
    const sent: Buffer[] = [];
    const write = conn.write.bind(conn) as (chunk: Buffer) => boolean;
    conn.write = ((chunk: Buffer) => (sent.push(Buffer.from(chunk)), write(chunk))) as typeof conn.write;
    const channel = await GuestChannel.open(conn);
    agents.push({ proc, server, channel });
    const secret = `SECRET${randomBytes(24).toString('hex')}`;
    const secretsDir = mkdtempSync(join(dir, 'secrets-'));

    await channel.replaceDir(secretsDir, [{ name: 'TOKEN', data: secret }]);
    expect(readFileSync(join(secretsDir, 'TOKEN'), 'utf8')).toBe(secret);
    expect((await run({ argv: ['sh', '-c', 'echo "$TOKEN"'], env: { TOKEN: secret } }, undefined, channel)).stdout).toBe(`${secret}\n`);
    await channel.quiesce(secretsDir);
    expect(readdirSync(secretsDir)).toEqual([]);
    expect((await run({ argv: ['sh', '-c', 'echo "$TOKEN"'], env: { TOKEN: secret } }, undefined, channel)).stdout).toBe(`${secret}\n`);

    expect(channel.sealing).toBe(true);
    const wire = Buffer.concat(sent);
    expect(wire.includes(secret)).toBe(false);
    const types = frames(wire).map(([t]) => t);
    // REPLACE_DIR and EXEC go as SEALED (0x13), never plain (0x0d, 0x02); one KEY (0x12) per key.
    expect(types.filter((t) => t === 0x0d || t === 0x02)).toEqual([]);
    expect(types.filter((t) => t === 0x13)).toHaveLength(3);
    expect(types.filter((t) => t === 0x12)).toHaveLength(2);
  });
});

describe('frame parsing', () => {
  /** A fake guest that answers every request with OK "<id>" and delivers its bytes as told. */
  function fakeGuest(deliver: (bytes: Buffer, push: (b: Buffer) => void) => void): Duplex {
    let pending: Buffer[] = [];
    const guest: Duplex = new Duplex({
      read() {},
      write(chunk: Buffer, _enc, cb) {
        const id = chunk.readUInt32LE(4);
        const text = Buffer.from(chunk.readUInt8(8) === 0x01 ? 'rel\0host\0boot\0' : `id=${id}\n`);
        const frame = Buffer.alloc(9);
        frame.writeUInt32LE(text.length, 0);
        frame.writeUInt32LE(id, 4);
        frame.writeUInt8(0x81, 8);
        pending.push(frame, text);
        const all = Buffer.concat(pending);
        pending = [];
        deliver(all, (b) => guest.push(b));
        cb();
      },
    });
    return guest;
  }

  it('reassembles frames delivered one byte at a time', async () => {
    const channel = await GuestChannel.open(fakeGuest((b, push) => [...b].forEach((byte) => push(Buffer.from([byte])))));
    expect([channel.kernelRelease, channel.hostname, channel.bootId]).toEqual(['rel', 'host', 'boot']);
    expect(await channel.health()).toEqual({ id: 2 });
    await channel.close();
  });

  it('splits coalesced frames', async () => {
    let held: Buffer[] = [];
    // Holds replies back until two are there, then delivers both in one chunk.
    const channel = await GuestChannel.open(
      fakeGuest((b, push) => {
        if (b.includes('rel')) return push(b);
        held.push(b);
        if (held.length === 2) {
          push(Buffer.concat(held));
          held = [];
        }
      }),
    );
    expect(await Promise.all([channel.health(), channel.health()])).toEqual([{ id: 2 }, { id: 3 }]);
    await channel.close();
  });
});

describe('a hostile guest', () => {
  // Every case runs against a real GuestChannel over a unix socket, as in a node agent; a second
  // box's channel (the bystander) must keep working through all of them.
  const guests: FakeGuest[] = [];
  let bystander: GuestChannel;

  async function hostile(opts?: GuestChannelOptions): Promise<{ guest: FakeGuest; channel: GuestChannel }> {
    const started = await FakeGuest.start(dir, opts);
    guests.push(started.guest);
    return started;
  }

  async function expectClosedBy(channel: GuestChannel, code: string, message: RegExp): Promise<void> {
    await channel.closed;
    expect(channel.closeReason).toMatchObject({ code, message: expect.stringMatching(message) });
    expect(await bystander.health()).toEqual({ procs: 1 });
  }

  beforeAll(async () => {
    bystander = (await hostile()).channel;
  });

  afterAll(async () => {
    await bystander.close();
    for (const g of guests) g.close();
  });

  it('a STARTED frame shorter than its 4-byte pid closes only that box’s channel', async () => {
    const { guest, channel } = await hostile();
    guest.handle(HOST.EXEC, (f) => guest.send(f.channel, GUEST.STARTED, Buffer.from([1, 2])));
    const err = await channel.exec({ argv: ['true'] }).catch((e: unknown) => e);
    expect(err).toMatchObject({ code: 'MALFORMED_FRAME', message: expect.stringMatching(/STARTED.*2 bytes.*4/) });
    await expectClosedBy(channel, 'MALFORMED_FRAME', /STARTED/);
  });

  it('an EXIT frame without its exit code ends the session with 255 and closes the channel', async () => {
    const { guest, channel } = await hostile();
    guest.handle(HOST.EXEC, (f) => {
      guest.send(f.channel, GUEST.STARTED, i32(42));
      guest.send(f.channel, GUEST.STDOUT, Buffer.from('hi'));
      guest.send(f.channel, GUEST.EXIT, Buffer.alloc(0));
    });
    const p = await channel.exec({ argv: ['true'] });
    expect(p.pid).toBe(42);
    expect(await p.exited).toBe(255);
    expect((await collect(p.stdout)).toString()).toBe('hi');
    await expectClosedBy(channel, 'MALFORMED_FRAME', /EXIT.*0 bytes/);
  });

  // Every guest → host frame type with a payload its type cannot have, on a channel of each kind.
  const malformed: [string, number, Buffer, RegExp][] = [
    ['STARTED with 3 bytes', GUEST.STARTED, Buffer.alloc(3), /STARTED/],
    ['STARTED with 5 bytes', GUEST.STARTED, Buffer.alloc(5), /STARTED/],
    ['STARTED with pid 0', GUEST.STARTED, i32(0), /STARTED.*pid/],
    ['EXIT with 3 bytes', GUEST.EXIT, Buffer.alloc(3), /EXIT/],
    ['EXIT with code -1', GUEST.EXIT, i32(-1), /EXIT.*code/],
    ['EXIT with code 256', GUEST.EXIT, i32(256), /EXIT.*code/],
    ['CONNECT_FAILED with 2 bytes', GUEST.CONNECT_FAILED, Buffer.alloc(2), /CONNECT_FAILED/],
    ['CONNECTED with a payload', GUEST.CONNECTED, Buffer.alloc(1), /CONNECTED/],
    ['TCP_EOF with a payload', GUEST.TCP_EOF, Buffer.alloc(1), /TCP_EOF/],
    ['CLOSED with a payload', GUEST.CLOSED, Buffer.alloc(4), /CLOSED/],
    ['STDOUT over 64 KiB', GUEST.STDOUT, Buffer.alloc((64 << 10) + 1), /STDOUT.*65537 bytes/],
    ['FILE_DATA over 64 KiB', GUEST.FILE_DATA, Buffer.alloc((64 << 10) + 1), /FILE_DATA/],
    ['a host → guest type', HOST.EXEC, Buffer.alloc(0), /unknown frame type 0x02/],
    ['type 0x00', 0x00, Buffer.alloc(0), /unknown frame type 0x00/],
    ['type 0x8d', 0x8d, Buffer.alloc(0), /unknown frame type 0x8d/],
    ['type 0xff', 0xff, Buffer.alloc(9), /unknown frame type 0xff/],
  ];
  it.each(malformed)('%s closes the channel', async (_name, type, payload, message) => {
    for (const target of ['request', 'exec', 'dial', 'unknown'] as const) {
      const { guest, channel } = await hostile();
      guest.handle(HOST.EXEC, (f) => guest.send(f.channel, GUEST.STARTED, i32(7)));
      guest.handle(HOST.TCP_CONNECT, () => {});
      guest.handle(HOST.HEALTH, () => {});
      const pending =
        target === 'request' ? channel.health() : target === 'exec' ? channel.exec({ argv: ['true'] }).then((p) => p.exited) : target === 'dial' ? channel.dial(80) : undefined;
      pending?.catch(() => {});
      const id = target === 'unknown' ? 1000 : (await guest.waitFor((f) => f.type !== HOST.HELLO)).channel;
      // The header is sent alone first, so a frame is judged before its payload is all there.
      guest.sendRaw(frame(id, type, payload).subarray(0, 9));
      guest.sendRaw(payload);
      await expectClosedBy(channel, 'MALFORMED_FRAME', message);
      if (pending && target !== 'exec') await expect(pending).rejects.toMatchObject({ code: expect.stringMatching(/MALFORMED_FRAME|DIAL_FAILED/) });
    }
  });

  it('a frame header announcing more than 64 KiB is refused before its payload arrives', async () => {
    const { guest, channel } = await hostile();
    guest.sendRaw(frame(1000, GUEST.STDOUT, Buffer.alloc(0), 0xffffffff));
    await expectClosedBy(channel, 'MALFORMED_FRAME', /4294967295 bytes/);
  });

  it('a HELLO reply without its three NUL-terminated strings fails the handshake', async () => {
    for (const reply of ['rel\0host\0boot', 'rel\0host\0', '', 'rel\0host\0boot\0extra\0']) {
      const guest = await FakeGuest.listen(dir);
      guests.push(guest);
      guest.handle(HOST.HELLO, (f) => guest.send(f.channel, GUEST.OK, Buffer.from(reply)));
      await expect(GuestChannel.connect(guest.path)).rejects.toMatchObject({ code: 'MALFORMED_FRAME', message: expect.stringMatching(/HELLO/) });
    }
  });

  it('frames a session cannot have in its state close the channel', async () => {
    const cases: [string, (g: FakeGuest, c: GuestChannel) => Promise<unknown>, RegExp, (outcome: unknown) => void][] = [
      [
        'STARTED twice',
        async (g, c) => {
          g.handle(HOST.EXEC, (f) => g.send(f.channel, GUEST.STARTED, i32(7)));
          const p = await c.exec({ argv: ['true'] });
          g.send((await g.waitFor((f) => f.type === HOST.EXEC)).channel, GUEST.STARTED, i32(8));
          return p.exited;
        },
        /STARTED.*exec session/,
        (code) => expect(code).toBe(255),
      ],
      [
        'TCP_DATA after TCP_EOF',
        async (g, c) => {
          g.handle(HOST.TCP_CONNECT, (f) => {
            g.send(f.channel, GUEST.CONNECTED);
            g.send(f.channel, GUEST.TCP_EOF);
            g.send(f.channel, GUEST.TCP_DATA, Buffer.from('late'));
          });
          const sock = await c.dial(80);
          return collect(sock);
        },
        /TCP_DATA after TCP_EOF/,
        // All of it arrives in one read, before the caller of dial() could listen for errors:
        // the channel's error reaches the consumer instead of crashing the process.
        (err) => expect(err).toMatchObject({ code: 'UNEXPECTED_FRAME' }),
      ],
      [
        'FILE_DATA in reply to HEALTH',
        async (g, c) => {
          g.handle(HOST.HEALTH, (f) => {
            g.send(f.channel, GUEST.FILE_DATA, Buffer.from('x'));
            g.send(f.channel, GUEST.OK, Buffer.from('procs=1\n'));
          });
          return c.health();
        },
        /FILE_DATA.*HEALTH/,
        (err) => expect(err).toMatchObject({ code: 'UNEXPECTED_FRAME' }),
      ],
      [
        'STDOUT in reply to a dial',
        async (g, c) => {
          g.handle(HOST.TCP_CONNECT, (f) => g.send(f.channel, GUEST.STDOUT, Buffer.from('x')));
          return c.dial(80);
        },
        /STDOUT.*dial/,
        (err) => expect(err).toMatchObject({ code: 'DIAL_FAILED' }),
      ],
    ];
    for (const [, attack, message, check] of cases) {
      const { guest, channel } = await hostile();
      const outcome = attack(guest, channel).catch((e: unknown) => e);
      await expectClosedBy(channel, 'UNEXPECTED_FRAME', message);
      check(await outcome);
    }
  });

  it('refuses a file over the caller’s limit and tells the guest to stop sending it', async () => {
    const { guest, channel } = await hostile();
    guest.handle(HOST.GET_FILE, (f) => {
      for (let i = 0; i < 20; i++) guest.send(f.channel, GUEST.FILE_DATA, Buffer.alloc(64 << 10, i));
      guest.send(f.channel, GUEST.OK);
    });
    const err = await channel.getFile('/big', { maxBytes: 1 << 20 }).then((b) => `resolved with ${b.length} bytes`, (e: unknown) => e);
    expect(err).toMatchObject({ code: 'FILE_TOO_LARGE', message: expect.stringMatching(/\/big.*1048576/) });
    const request = guest.received.find((f) => f.type === HOST.GET_FILE)!;
    await guest.waitFor((f) => f.type === HOST.CLOSE && f.channel === request.channel);
    // A file over the limit is the guest's content, not a protocol error: the channel stays.
    expect(await channel.health()).toEqual({ procs: 1 });
    guest.handle(HOST.GET_FILE, (f) => {
      guest.send(f.channel, GUEST.FILE_DATA, Buffer.alloc(64 << 10, 1));
      guest.send(f.channel, GUEST.OK);
    });
    expect((await channel.getFile('/small', { maxBytes: 64 << 10 })).length).toBe(64 << 10);
  });

  it('stops accumulating a file at 64 MiB by default', async () => {
    const { guest, channel } = await hostile();
    let sent = 0;
    guest.handle(HOST.GET_FILE, (f) => {
      // Like a GET_FILE of /dev/zero: the guest streams until told to stop (or 80 MiB).
      const chunk = Buffer.alloc(64 << 10);
      const pump = () => {
        while (sent < 80 << 20 && !guest.received.some((r) => r.type === HOST.CLOSE && r.channel === f.channel)) {
          sent += chunk.length;
          if (!guest.send(f.channel, GUEST.FILE_DATA, chunk)) return void guest.conn.once('drain', pump);
        }
        guest.send(f.channel, GUEST.OK);
      };
      pump();
    });
    const err = await channel.getFile('/dev/zero').then((b) => `resolved with ${b.length} bytes`, (e: unknown) => e);
    expect(err).toMatchObject({ code: 'FILE_TOO_LARGE', message: expect.stringMatching(/67108864/) });
    expect(sent).toBeLessThan(80 << 20);
  });
});

describe('backpressure from consumers that do not read', () => {
  const guests: FakeGuest[] = [];
  afterAll(() => guests.forEach((g) => g.close()));

  /**
   * Floods a session with 64 KiB frames as fast as the host takes them, `total` bytes in all.
   * `stalled` resolves with the bytes sent once the host has taken nothing for 300 ms.
   */
  function flood(guest: FakeGuest, channel: number, type: number, total: number) {
    let sent = 0;
    let seq = 0;
    let stopped = false;
    let idle: NodeJS.Timeout | undefined;
    let onStall!: (sent: number) => void;
    let onDone!: () => void;
    const stalled = new Promise<number>((resolve) => (onStall = resolve));
    const done = new Promise<void>((resolve) => (onDone = resolve));
    const pump = () => {
      clearTimeout(idle);
      while (sent < total && !stopped) {
        // A counter in every chunk lets the consumer check that nothing was lost or reordered.
        const chunk = Buffer.alloc(64 << 10, seq++ & 0xff);
        sent += chunk.length;
        if (!guest.send(channel, type, chunk)) {
          guest.conn.once('drain', pump);
          idle = setTimeout(() => onStall(sent), 300);
          return;
        }
      }
      onStall(sent);
      onDone();
    };
    pump();
    return { stalled, done, stop: () => (stopped = true) };
  }

  function expectSequence(data: Buffer, bytes: number): void {
    expect(data.length).toBe(bytes);
    for (let i = 0; i < bytes / (64 << 10); i++) expect(data[i * (64 << 10)]).toBe(i & 0xff);
  }

  it('bounds what an exec session holds for a consumer that does not read stdout', async () => {
    const { guest, channel } = await FakeGuest.start(dir);
    guests.push(guest);
    guest.handle(HOST.EXEC, (f) => guest.send(f.channel, GUEST.STARTED, i32(42)));
    const p = await channel.exec({ argv: ['yes'] });
    const id = guest.received.find((f) => f.type === HOST.EXEC)!.channel;
    const total = 64 << 20;
    const flow = flood(guest, id, GUEST.STDOUT, total);
    // The guest was stopped well before its 64 MiB were out ...
    expect(await flow.stalled).toBeLessThan(16 << 20);
    // ... and what the host holds for the session stays within its bound (256 KiB + one frame).
    const held = p.stdout.readableLength + ((p.stdout as Readable & { writableLength?: number }).writableLength ?? 0);
    expect(held).toBeLessThanOrEqual((256 + 64) << 10);
    // The link's share: one frame of unparsed input, the socket's buffer and one read.
    expect(channel.bufferedBytes).toBeLessThanOrEqual(512 << 10);
    // Lossless: once the consumer reads, the rest flows and arrives in order.
    const out = collect(p.stdout);
    await flow.done;
    guest.send(id, GUEST.EXIT, i32(0));
    expect(await p.exited).toBe(0);
    expectSequence(await out, total);
    await channel.close();
  });

  it('bounds what a TCP connection holds for a consumer that does not read, and only while the session lives', async () => {
    const { guest, channel } = await FakeGuest.start(dir);
    guests.push(guest);
    guest.handle(HOST.TCP_CONNECT, (f) => guest.send(f.channel, GUEST.CONNECTED));
    const sock = await channel.dial(80);
    const id = guest.received.find((f) => f.type === HOST.TCP_CONNECT)!.channel;
    const flow = flood(guest, id, GUEST.TCP_DATA, 64 << 20);
    expect(await flow.stalled).toBeLessThan(16 << 20);
    expect(sock.readableLength).toBeLessThanOrEqual((256 + 64) << 10);
    expect(channel.bufferedBytes).toBeLessThanOrEqual(512 << 10);
    // Requests wait behind the stalled link (one box's link only carries that box) ...
    const health = channel.health();
    // ... until the consumer gives the session up: the link then runs again.
    flow.stop();
    sock.destroy();
    expect(await health).toEqual({ procs: 1 });
    await channel.close();
  });
});

describe('the guest agent against malformed host frames', () => {
  // The real agent, rooted in a scratch directory and in its own network, UTS and IPC
  // namespaces: a frame it wrongly accepted could otherwise set this host's hostname or take its
  // loopback interface down (SET_IDENTITY, NET_CONFIG). No EXEC here is well-formed.
  let host: RawHost;
  let root: string;
  let nextId = 1;

  beforeAll(async () => {
    root = mkdtempSync(join(dir, 'root-'));
    host = await RawHost.start(bin, dir, root, GUEST_SANDBOX);
  });

  afterAll(async () => {
    await host.stop();
  });

  const cstrs = (...s: string[]) => Buffer.from(s.map((x) => `${x}\0`).join(''));
  const u16 = (...v: number[]) => Buffer.concat(v.map((x) => Buffer.from([x & 0xff, (x >> 8) & 0xff])));
  const u32 = (v: number) => Buffer.from([v & 0xff, (v >>> 8) & 0xff, (v >>> 16) & 0xff, (v >>> 24) & 0xff]);
  /** EXEC's fixed head: flags, cols, rows, argc, envc. */
  const execHead = (argc: number, envc: number) => Buffer.concat([Buffer.from([0]), u16(80, 24, argc, envc)]);

  const cases: [string, number, Buffer][] = [
    ['HELLO with 7 bytes', HOST.HELLO, Buffer.alloc(7)],
    ['HELLO with 9 bytes', HOST.HELLO, Buffer.alloc(9)],
    ['EXEC shorter than its head', HOST.EXEC, Buffer.alloc(8)],
    ['EXEC without a program', HOST.EXEC, Buffer.concat([execHead(0, 0), cstrs('/')])],
    ['EXEC with more argv than strings', HOST.EXEC, Buffer.concat([execHead(3, 0), cstrs('/', 'true')])],
    ['EXEC with a count larger than the payload', HOST.EXEC, Buffer.concat([execHead(65535, 65535), cstrs('/', 'true')])],
    ['EXEC whose last string lacks its NUL', HOST.EXEC, Buffer.concat([execHead(1, 1), cstrs('/', 'true'), Buffer.from('A=1')])],
    ['EXEC with bytes after its strings', HOST.EXEC, Buffer.concat([execHead(1, 0), cstrs('/', 'devyard-no-such-program'), Buffer.from('x')])],
    ['STDIN_EOF with a payload', HOST.STDIN_EOF, Buffer.alloc(1)],
    ['SIGNAL without a signal', HOST.SIGNAL, Buffer.alloc(0)],
    ['SIGNAL with 2 bytes', HOST.SIGNAL, Buffer.from([15, 0])],
    ['SIGNAL 0', HOST.SIGNAL, Buffer.from([0])],
    ['SIGNAL 200', HOST.SIGNAL, Buffer.from([200])],
    ['RESIZE with 3 bytes', HOST.RESIZE, Buffer.alloc(3)],
    ['RESIZE with 5 bytes', HOST.RESIZE, Buffer.alloc(5)],
    ['TCP_CONNECT with 1 byte', HOST.TCP_CONNECT, Buffer.alloc(1)],
    ['TCP_CONNECT with 3 bytes', HOST.TCP_CONNECT, Buffer.alloc(3)],
    ['TCP_EOF with a payload', HOST.TCP_EOF, Buffer.alloc(1)],
    ['CLOSE with a payload', HOST.CLOSE, Buffer.alloc(1)],
    ['PUT_FILE shorter than its mode', HOST.PUT_FILE, Buffer.alloc(3)],
    ['PUT_FILE whose path lacks its NUL', HOST.PUT_FILE, Buffer.concat([u32(0o644), Buffer.from('a')])],
    ['GET_FILE without a payload', HOST.GET_FILE, Buffer.alloc(0)],
    ['GET_FILE whose path lacks its NUL', HOST.GET_FILE, Buffer.from('etc/passwd')],
    ['GET_FILE with bytes after its path', HOST.GET_FILE, Buffer.concat([cstrs('f'), Buffer.from('x')])],
    ['REPLACE_DIR whose dir lacks its NUL', HOST.REPLACE_DIR, Buffer.from('d')],
    ['REPLACE_DIR without its count', HOST.REPLACE_DIR, Buffer.concat([cstrs('d'), Buffer.alloc(3)])],
    ['REPLACE_DIR with a count of 2^32-1', HOST.REPLACE_DIR, Buffer.concat([cstrs('d'), u32(0xffffffff)])],
    ['REPLACE_DIR with fewer files than its count', HOST.REPLACE_DIR, Buffer.concat([cstrs('d'), u32(2), cstrs('a'), u32(1), Buffer.from('x')])],
    ['REPLACE_DIR with a file longer than the payload', HOST.REPLACE_DIR, Buffer.concat([cstrs('d'), u32(1), cstrs('a'), u32(100), Buffer.from('x')])],
    ['REPLACE_DIR whose file name lacks its NUL', HOST.REPLACE_DIR, Buffer.concat([cstrs('d'), u32(1), Buffer.from('a')])],
    ['REPLACE_DIR with bytes after its files', HOST.REPLACE_DIR, Buffer.concat([cstrs('d'), u32(1), cstrs('a'), u32(1), Buffer.from('xy')])],
    ['HEALTH with a payload', HOST.HEALTH, Buffer.alloc(1)],
    ['SET_IDENTITY with one string', HOST.SET_IDENTITY, cstrs('box')],
    ['SET_IDENTITY whose machine id lacks its NUL', HOST.SET_IDENTITY, Buffer.concat([cstrs('box'), Buffer.from('0'.repeat(32))])],
    ['SET_IDENTITY with bytes after its strings', HOST.SET_IDENTITY, Buffer.concat([cstrs('box', '0'.repeat(32)), Buffer.from('x')])],
    ['QUIESCE whose dir lacks its NUL', HOST.QUIESCE, Buffer.from('secrets')],
    ['QUIESCE with bytes after its dir', HOST.QUIESCE, Buffer.concat([cstrs('secrets'), Buffer.from('x')])],
    ['NET_CONFIG with two strings', HOST.NET_CONFIG, cstrs('lo', '10.0.0.2/24')],
    ['NET_CONFIG with five strings', HOST.NET_CONFIG, cstrs('lo', '10.0.0.2/24', '10.0.0.1', '02:00:00:00:00:01', 'x')],
    ['NET_CONFIG whose MAC lacks its NUL', HOST.NET_CONFIG, Buffer.concat([cstrs('lo', '10.0.0.2/24', '10.0.0.1'), Buffer.from('02:00')])],
    ['type 0x00', 0x00, Buffer.alloc(0)],
    ['KEY with a payload', HOST.KEY, Buffer.alloc(4)],
    ['SEALED shorter than a nonce and a type', HOST.SEALED, Buffer.alloc(4)],
    ['type 0x14', 0x14, Buffer.alloc(4)],
    ['a guest → host type', GUEST.OK, Buffer.alloc(0)],
    ['type 0xff', 0xff, Buffer.alloc(1)],
  ];

  it.each(cases)('answers %s with ERR and acts on nothing', async (_name, type, payload) => {
    mkdirSync(join(root, 'secrets'), { recursive: true });
    writeFileSync(join(root, 'secrets', 'KEEP'), 'x');
    const id = nextId++;
    const reply = await Promise.race([host.request(id, type, payload), new Promise<string>((r) => setTimeout(() => r('no reply within 1 s'), 1000))]);
    expect(reply).toMatchObject({ type: GUEST.ERR, payload: expect.any(Buffer) });
    // SEALED without a key is refused before its layout is looked at.
    const want = type === HOST.SEALED ? /^sealed frame without a key/ : type >= 0x01 && type <= 0x13 ? /^malformed [A-Z_]+ frame/ : /^unknown frame type/;
    expect((reply as Frame).payload.toString()).toMatch(want);
    // Nothing was started, written or removed.
    expect(host.received.filter((f) => f.channel === id).map((f) => f.type)).toEqual([GUEST.ERR]);
    expect(readdirSync(join(root, 'secrets'))).toEqual(['KEEP']);
    expect(readdirSync(root).sort()).toEqual(['secrets']);
  });

  it('still answers HELLO and HEALTH afterwards', async () => {
    expect(host.alive).toBe(true);
    const hello = await host.request(nextId++, HOST.HELLO, Buffer.alloc(8));
    expect(hello.type).toBe(GUEST.OK);
    expect(hello.payload.toString().split('\0')[0]).toBe(release());
    const health = await host.request(nextId++, HOST.HEALTH);
    expect(health.type).toBe(GUEST.OK);
    expect(health.payload.toString()).toMatch(/^uptime=.*\nprocs=\d+\nidle_ms=\d+\n$/s);
  });
});
