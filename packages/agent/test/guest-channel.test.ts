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
import { GuestChannel } from '@devyard/agent/runtime/microvm/guest-channel';
import type { ExecOptions } from '@devyard/agent/runtime/runtime-driver';

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
