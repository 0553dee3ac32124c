/**
 * Fuzzes both parsers of the guest-agent protocol (guest/PROTOCOL.md) with random and mutated
 * frames from a seeded PRNG; the seed is printed, and DEVYARD_FUZZ_SEED=<seed> replays a run.
 *
 * - The host: a real GuestChannel over a unix socket, fed by a scripted guest. Each case opens a
 *   channel with a session of every kind, then sends well-formed frames (the channel must stay
 *   open and in step), a definitely malformed frame (it must close with MALFORMED_FRAME), or
 *   mutated and random bytes (it may close, but only with a protocol error code). Nothing may
 *   throw out of the channel, nothing may hang after it closed, it never holds more than its
 *   bound, and a second box's channel keeps working throughout.
 * - The guest: the real compiled agent (and the same source under AddressSanitizer, which sees
 *   out-of-bounds reads that do not crash). A reference of PROTOCOL.md's layouts predicts, for
 *   every frame, whether the agent must refuse it as malformed; the agent must answer exactly so,
 *   stay alive and still answer HELLO and HEALTH afterwards.
 *
 * The agent runs on this host, so what it may do is fenced in: it runs in fresh network, UTS, IPC
 * and mount namespaces (its NET_CONFIG, SET_IDENTITY and TCP_CONNECT act there, not on this
 * host), with a scratch directory as --root. No well-formed EXEC or SIGNAL is ever sent: those
 * two types are sent only in variants that the reference says are malformed, and the test fails
 * if the agent ever answers STARTED. Valid QUIESCE frames (each one calls sync()) are rare.
 */
import { spawnSync } from 'node:child_process';
import { randomInt } from 'node:crypto';
import { once } from 'node:events';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { connect, type Socket } from 'node:net';
import { release, tmpdir } from 'node:os';
import { join } from 'node:path';
import { finished } from 'node:stream/promises';
import { fileURLToPath } from 'node:url';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ensureGuestAgent } from '@devyard/agent/runtime/microvm/guest-agent-binary';
import { GuestChannel, GuestChannelError } from '@devyard/agent/runtime/microvm/guest-channel';
import { FakeGuest, frame, GUEST, GUEST_SANDBOX, HOST, RawHost, type Frame } from './guest-frame-fixture.js';

const SEED = process.env.DEVYARD_FUZZ_SEED ? Number(process.env.DEVYARD_FUZZ_SEED) : randomInt(2 ** 31);
const FRAMES = 100_000;
const ASAN_FRAMES = 50_000;
const KiB = 1024;

/** xorshift128+ from a 32-bit seed (splitmix32 to spread it): small, fast and reproducible. */
class Rng {
  private s: number[];

  constructor(seed: number) {
    let x = seed >>> 0;
    this.s = [0, 0, 0, 0].map(() => {
      x = (x + 0x9e3779b9) >>> 0;
      let z = x;
      z = Math.imul(z ^ (z >>> 16), 0x85ebca6b) >>> 0;
      z = Math.imul(z ^ (z >>> 13), 0xc2b2ae35) >>> 0;
      return (z ^ (z >>> 16)) >>> 0;
    });
  }

  /** A uniform 32-bit integer (xoshiro128**). */
  u32(): number {
    const s = this.s as [number, number, number, number];
    const result = Math.imul(rotl(Math.imul(s[1], 5) >>> 0, 7), 9) >>> 0;
    const t = (s[1] << 9) >>> 0;
    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = rotl(s[3], 11);
    return result;
  }

  /** 0 ≤ n < max. */
  int(max: number): number {
    return max <= 1 ? 0 : this.u32() % max;
  }

  chance(p: number): boolean {
    return this.u32() / 2 ** 32 < p;
  }

  pick<T>(items: readonly T[]): T {
    return items[this.int(items.length)]!;
  }

  bytes(n: number): Buffer {
    const b = Buffer.alloc(n);
    for (let i = 0; i < n; i++) b[i] = this.u32() & 0xff;
    return b;
  }

  /** A length skewed towards small ones, up to max. */
  size(max: number): number {
    const r = this.int(100);
    return r < 60 ? this.int(Math.min(max, 64) + 1) : r < 95 ? this.int(Math.min(max, 2 * KiB) + 1) : this.int(max + 1);
  }
}

function rotl(x: number, k: number): number {
  return ((x << k) | (x >>> (32 - k))) >>> 0;
}

const u16 = (v: number) => Buffer.from([v & 0xff, (v >>> 8) & 0xff]);
const u32 = (v: number) => Buffer.from([v & 0xff, (v >>> 8) & 0xff, (v >>> 16) & 0xff, (v >>> 24) & 0xff]);
const i32 = (v: number) => u32(v >>> 0);
const cstr = (s: string | Buffer) => Buffer.concat([Buffer.from(s), Buffer.from([0])]);

let dir: string;
let bin: string;
let asanBin: string;
const uncaught: unknown[] = [];
const onUncaught = (err: unknown) => uncaught.push(err);

beforeAll(async () => {
  process.stderr.write(`guest protocol fuzz: seed ${SEED} (DEVYARD_FUZZ_SEED=${SEED} replays this run)\n`);
  dir = mkdtempSync(join(tmpdir(), 'devyard-fuzz-'));
  bin = await ensureGuestAgent(join(dir, 'cache'));
  // The same source with AddressSanitizer and UBSan: an out-of-bounds read ends it with a report.
  asanBin = join(dir, 'guest-agent-asan');
  const source = fileURLToPath(new URL('../guest/devyard-guest-agent.c', import.meta.url));
  const cc = spawnSync('gcc', ['-O1', '-g', '-fsanitize=address,undefined', '-fno-sanitize-recover=all', '-fno-omit-frame-pointer', '-Wall', '-Wextra', '-o', asanBin, source], {
    encoding: 'utf8',
  });
  if (cc.status !== 0) throw new Error(`compiling the guest agent with sanitizers failed: ${cc.stderr}`);
  process.on('uncaughtException', onUncaught);
});

afterAll(() => {
  process.off('uncaughtException', onUncaught);
  rmSync(dir, { recursive: true, force: true });
});

// ---- the host parser -----------------------------------------------------------------------

/** Guest → host types and the payload each must have (null: any size up to 64 KiB). */
const GUEST_SHAPES: [number, number | null][] = [
  [GUEST.OK, null],
  [GUEST.ERR, null],
  [GUEST.STDOUT, null],
  [GUEST.STDERR, null],
  [GUEST.STARTED, 4],
  [GUEST.EXIT, 4],
  [GUEST.CONNECTED, 0],
  [GUEST.CONNECT_FAILED, 4],
  [GUEST.TCP_DATA, null],
  [GUEST.TCP_EOF, 0],
  [GUEST.CLOSED, 0],
  [GUEST.FILE_DATA, null],
];
const GUEST_NAMES = new Map<number, string>(Object.entries(GUEST).map(([k, v]) => [v, k]));

/** A well-formed guest frame of the given type, for any channel. */
function wellFormed(rng: Rng, channel: number, type: number): Buffer {
  switch (type) {
    case GUEST.STARTED:
      return frame(channel, type, i32(1 + rng.int(1 << 22)));
    case GUEST.EXIT:
      return frame(channel, type, i32(rng.int(256)));
    case GUEST.CONNECT_FAILED:
      return frame(channel, type, i32(rng.pick([111, 113, 101, rng.u32() | 0])));
    case GUEST.CONNECTED:
    case GUEST.TCP_EOF:
    case GUEST.CLOSED:
      return frame(channel, type);
    case GUEST.OK:
      return frame(channel, type, Buffer.from('procs=1\n'));
    default:
      return frame(channel, type, rng.bytes(rng.size(64 * KiB)));
  }
}

/** The host's sessions in one case, as the guest sees them: what each may receive next. */
interface HostSessions {
  health: 'pending' | 'gone';
  file: 'pending' | 'gone';
  exec: 'running' | 'gone';
  exec2: 'pending' | 'running' | 'gone';
  sock: 'open' | 'eof' | 'gone';
  dial2: 'pending' | 'open' | 'eof' | 'gone';
}

/** A frame the host must take without closing the channel, and how it changes the sessions. */
function acceptableFrame(rng: Rng, ids: Record<keyof HostSessions, number>, s: HostSessions): Buffer {
  const key = rng.pick(Object.keys(s) as (keyof HostSessions)[]);
  const id = ids[key];
  const state = s[key];
  const some = (type: number) => wellFormed(rng, id, type);
  const r = rng.int(100);
  if (state === 'gone' || rng.chance(0.1)) {
    // A forgotten channel, or one the host never opened: any well-formed frame is dropped.
    return wellFormed(rng, state === 'gone' ? id : 1_000_000 + rng.int(1000), rng.pick(GUEST_SHAPES)[0]);
  }
  if (key === 'health') {
    s.health = 'gone';
    return r < 50 ? some(GUEST.OK) : frame(id, GUEST.ERR, Buffer.from('no'));
  }
  if (key === 'file') {
    if (r < 90) return frame(id, GUEST.FILE_DATA, rng.bytes(rng.size(64 * KiB)));
    s.file = 'gone';
    return some(r < 95 ? GUEST.OK : GUEST.ERR);
  }
  if (state === 'running') {
    if (r < 90) return some(r < 60 ? GUEST.STDOUT : GUEST.STDERR);
    s[key as 'exec'] = 'gone';
    return some(r < 97 ? GUEST.EXIT : GUEST.ERR);
  }
  if (key === 'exec2') {
    s.exec2 = r < 80 ? 'running' : 'gone';
    return some(r < 80 ? GUEST.STARTED : GUEST.ERR);
  }
  if (state === 'pending') {
    s.dial2 = r < 70 ? 'open' : 'gone';
    return some(r < 70 ? GUEST.CONNECTED : r < 90 ? GUEST.CONNECT_FAILED : GUEST.ERR);
  }
  const sock = key as 'sock' | 'dial2';
  if (state === 'open' && r < 85) return some(GUEST.TCP_DATA);
  if (state === 'open' && r < 92) {
    s[sock] = 'eof';
    return some(GUEST.TCP_EOF);
  }
  s[sock] = 'gone';
  return some(r < 97 ? GUEST.CLOSED : GUEST.ERR);
}

/** A frame that breaks its type's shape whatever channel it is on, and what the error must name. */
function malformedFrame(rng: Rng, channel: number): [Buffer, RegExp] {
  const r = rng.int(5);
  if (r === 0) {
    const type = rng.pick([GUEST.STARTED, GUEST.EXIT, GUEST.CONNECT_FAILED]);
    const len = rng.pick([0, 1, 2, 3, 5, 8, 64]);
    return [frame(channel, type, rng.bytes(len)), new RegExp(`malformed ${GUEST_NAMES.get(type)} frame`)];
  }
  if (r === 1) {
    const type = rng.pick([GUEST.CONNECTED, GUEST.TCP_EOF, GUEST.CLOSED]);
    return [frame(channel, type, rng.bytes(1 + rng.int(16))), new RegExp(`malformed ${GUEST_NAMES.get(type)} frame`)];
  }
  if (r === 2) {
    let type = rng.int(256);
    while (GUEST_NAMES.has(type)) type = rng.int(256);
    return [frame(channel, type, rng.bytes(rng.size(256))), /unknown frame type/];
  }
  if (r === 3) {
    const type = rng.pick(GUEST_SHAPES)[0];
    // Only the header is sent: the length alone must be refused.
    return [frame(channel, type, Buffer.alloc(0), 64 * KiB + 1 + rng.int(2 ** 31)), new RegExp(`malformed ${GUEST_NAMES.get(type)} frame.*exceed`)];
  }
  return rng.chance(0.5)
    ? [frame(channel, GUEST.STARTED, i32(-rng.int(2 ** 31))), /malformed STARTED frame.*pid/]
    : [frame(channel, GUEST.EXIT, i32(rng.chance(0.5) ? 256 + rng.int(1 << 20) : -1 - rng.int(1 << 20))), /malformed EXIT frame.*exit code/];
}

/** One mutation of a frame's bytes (header included: the stream may lose step). */
function mutate(rng: Rng, f: Buffer): Buffer {
  const b = Buffer.from(f);
  switch (rng.int(9)) {
    case 0: // truncated payload, header adjusted
      if (b.length > 9) {
        const cut = b.subarray(0, 9 + rng.int(b.length - 9));
        cut.writeUInt32LE(cut.length - 9, 0);
        return cut;
      }
      return b;
    case 1: // truncated payload, header not: the next frame's bytes complete this one
      return b.subarray(0, 9 + rng.int(Math.max(1, b.length - 9)));
    case 2: // length field off by one
      b.writeUInt32LE((b.readUInt32LE(0) + (rng.chance(0.5) ? 1 : -1)) >>> 0, 0);
      return b;
    case 3: // huge length
      b.writeUInt32LE(rng.pick([0xffffffff, 0x80000000, 64 * KiB + 1, 1 << 20, rng.u32()]), 0);
      return b;
    case 4: // another type
      b[8] = rng.int(256);
      return b;
    case 5: // another channel
      b.writeUInt32LE(rng.pick([0, 0xffffffff, rng.u32(), rng.int(16)]), 4);
      return b;
    case 6: // flipped bits
      for (let i = 0, n = 1 + rng.int(4); i < n; i++) b[rng.int(b.length)]! ^= 1 << rng.int(8);
      return b;
    case 7: // random bytes after it
      return Buffer.concat([b, rng.bytes(1 + rng.int(32))]);
    default: // only random bytes
      return rng.bytes(rng.size(512));
  }
}

/** Writes bytes in random pieces, sometimes yielding between them (reassembly is fuzzed too). */
async function deliver(rng: Rng, socket: Socket, bytes: Buffer): Promise<void> {
  // The host may close the connection halfway (that is what a malformed frame does).
  for (let off = 0; off < bytes.length && !socket.destroyed; ) {
    const n = rng.chance(0.3) ? 1 + rng.int(16) : 1 + rng.int(bytes.length);
    if (!socket.write(bytes.subarray(off, off + n))) await new Promise((r) => (socket.once('drain', r), socket.once('close', r)));
    off += n;
    if (rng.chance(0.1)) await new Promise((r) => setImmediate(r));
  }
}

/** Resolves once the host has taken everything the guest wrote (or the channel closed). */
async function settled(client: Socket, guestConn: Socket, channel: GuestChannel, reading: boolean): Promise<void> {
  const deadline = Date.now() + (reading ? 5000 : 30);
  for (;;) {
    await new Promise((r) => setImmediate(r));
    if (channel.closeReason) return;
    if (client.bytesRead === guestConn.bytesWritten && client.readableLength === 0) return;
    if (Date.now() > deadline) {
      // A consumer that does not read stalls the link on purpose; anything else is a hang.
      if (reading) throw new Error(`the host stopped taking bytes (${client.bytesRead} of ${guestConn.bytesWritten})`);
      return;
    }
  }
}

/** Resolves with the outcome of every promise, or rejects if one is still pending after ms. */
async function allSettle(promises: Promise<unknown>[], ms: number): Promise<void> {
  let timer: NodeJS.Timeout | undefined;
  const late = new Promise((_, reject) => (timer = setTimeout(() => reject(new Error(`a request still hangs ${ms} ms after its channel closed`)), ms)));
  try {
    await Promise.race([Promise.allSettled(promises), late]);
  } finally {
    clearTimeout(timer);
  }
}

/** What a GET_FILE may accumulate in the fuzz (past it, the request fails with FILE_TOO_LARGE). */
const FILE_LIMIT = 256 * KiB;
/**
 * What a case's channel may hold: six session streams (two execs' stdout and stderr, two TCP
 * connections) of 256 KiB plus one frame each, a file up to its limit plus one frame, and one
 * frame, the socket's buffer and one read of unparsed input.
 */
const HOST_BOUND = 6 * (256 + 64) * KiB + FILE_LIMIT + 64 * KiB + 512 * KiB;

describe('guest protocol fuzz', () => {
  it(`the host parser takes ${FRAMES} random and mutated guest frames, closing only the channels that got malformed ones`, async () => {
    const rng = new Rng(SEED);
    const guest = await FakeGuest.listen(dir);
    const bystander = await FakeGuest.start(dir);
    let sent = 0;
    let cases = 0;
    const outcomes = { clean: 0, poisoned: 0, chaos: 0, closedByChaos: 0, helloRefused: 0 };
    let execs = 0;
    let dials = 0;
    guest.handle(HOST.EXEC, (f) => {
      if (++execs % 2 === 1) guest.send(f.channel, GUEST.STARTED, i32(100));
    });
    guest.handle(HOST.TCP_CONNECT, (f) => {
      if (++dials % 2 === 1) guest.send(f.channel, GUEST.CONNECTED);
    });
    try {
      while (sent < FRAMES) {
        cases++;
        const kind = rng.pick(['clean', 'clean', 'poisoned', 'chaos', 'chaos'] as const);
        const context = () => `seed ${SEED}, case ${cases} (${kind})`;
        guest.received.length = 0;
        let answerHealth = false;
        guest.handle(HOST.HEALTH, (f) => answerHealth && guest.send(f.channel, GUEST.OK, Buffer.from('procs=1\n')));
        // Some handshakes are answered with something other than a HELLO reply.
        const badHello = kind === 'chaos' && rng.chance(0.05);
        guest.handle(HOST.HELLO, (f) => {
          if (!badHello) return guest.send(f.channel, GUEST.OK, Buffer.from('rel\0host\0boot\0'));
          const reply = rng.chance(0.5) ? frame(f.channel, GUEST.OK, rng.bytes(rng.size(64))) : frame(f.channel, rng.int(256), rng.bytes(rng.int(8)));
          guest.sendRaw(reply);
        });
        const client = connect(guest.path);
        await once(client, 'connect');
        let channel: GuestChannel;
        try {
          channel = await GuestChannel.open(client, { timeoutMs: 5000, requestTimeoutMs: 30_000 });
        } catch (err) {
          // The guest answered ERR (its refusal, as text), or broke the protocol; it never hangs.
          expect(badHello, context()).toBe(true);
          expect((err as Error).message, context()).not.toMatch(/timed out/);
          if (err instanceof GuestChannelError) expect(['MALFORMED_FRAME', 'UNEXPECTED_FRAME'], context()).toContain(err.code);
          outcomes.helloRefused++;
          client.destroy();
          continue;
        }
        // A few consumers never read: their sessions stall the link, which must stay bounded.
        const reading = kind === 'poisoned' || !rng.chance(0.03);
        const drain = (s: { resume(): unknown }) => reading && s.resume();
        const pending: Promise<unknown>[] = [];
        pending.push(channel.health().catch((e: unknown) => e));
        pending.push(channel.getFile('/f', { maxBytes: FILE_LIMIT }).catch((e: unknown) => e));
        const exec = await channel.exec({ argv: ['x'] });
        drain(exec.stdout);
        drain(exec.stderr);
        pending.push(exec.exited);
        pending.push(
          channel.exec({ argv: ['y'] }).then(
            (p) => (drain(p.stdout), drain(p.stderr), p.exited),
            (e: unknown) => e,
          ),
        );
        const sock = await channel.dial(1);
        drain(sock);
        // finished() also settles for a stream that closed before it was asked.
        pending.push(finished(sock).catch((e: unknown) => e));
        pending.push(
          channel.dial(2).then(
            (s) => (drain(s), finished(s).catch((e: unknown) => e)),
            (e: unknown) => e,
          ),
        );
        await guest.waitFor(() => guest.received.filter((f) => f.type === HOST.TCP_CONNECT).length === 2);
        const byType = (type: number, nth = 0) => guest.received.filter((f) => f.type === type)[nth]!.channel;
        const ids = { health: byType(HOST.HEALTH), file: byType(HOST.GET_FILE), exec: byType(HOST.EXEC), exec2: byType(HOST.EXEC, 1), sock: byType(HOST.TCP_CONNECT), dial2: byType(HOST.TCP_CONNECT, 1) };
        const sessions: HostSessions = { health: 'pending', file: 'pending', exec: 'running', exec2: 'pending', sock: 'open', dial2: 'pending' };

        const parts: Buffer[] = [];
        const n = 10 + rng.int(40);
        // Few mutations reach deep into a case before one breaks it; many break it at once.
        const mutationRate = rng.pick([0.02, 0.1, 0.3]);
        let poison: RegExp | undefined;
        for (let i = 0; i < n; i++) {
          const ok = acceptableFrame(rng, ids, sessions);
          parts.push(kind === 'chaos' && rng.chance(mutationRate) ? mutate(rng, ok) : ok);
        }
        if (kind === 'poisoned') {
          const [bad, message] = malformedFrame(rng, rng.pick([...Object.values(ids), 1_000_000 + rng.int(1000)]));
          parts.push(bad);
          poison = message;
        }
        sent += parts.length;
        await deliver(rng, guest.conn, Buffer.concat(parts));
        await settled(client, guest.conn, channel, reading);

        expect(uncaught, context()).toEqual([]);
        if (!channel.closeReason) expect(channel.bufferedBytes, context()).toBeLessThanOrEqual(HOST_BOUND);
        if (kind === 'clean') {
          expect(channel.closeReason, context()).toBeUndefined();
          if (reading) {
            // In step: a request after everything is answered.
            answerHealth = true;
            expect(await channel.health(), context()).toEqual({ procs: 1 });
          }
          outcomes.clean++;
        } else if (kind === 'poisoned') {
          expect(channel.closeReason, context()).toBeInstanceOf(GuestChannelError);
          expect(channel.closeReason, context()).toMatchObject({ code: 'MALFORMED_FRAME', message: expect.stringMatching(poison!) });
          outcomes.poisoned++;
        } else {
          // Mutations may leave the channel open (waiting for the rest of a frame) or close it,
          // but only ever for something the guest did.
          if (channel.closeReason) {
            expect(channel.closeReason, context()).toBeInstanceOf(GuestChannelError);
            expect(['MALFORMED_FRAME', 'UNEXPECTED_FRAME'], context()).toContain((channel.closeReason as GuestChannelError).code);
            outcomes.closedByChaos++;
          }
          outcomes.chaos++;
        }
        await channel.close();
        await allSettle(pending, 2000);
        if (cases % 200 === 0) expect(await bystander.channel.health(), context()).toEqual({ procs: 1 });
      }
      // The other box's channel went through all of it untouched.
      expect(bystander.channel.closeReason).toBeUndefined();
      expect(await bystander.channel.health()).toEqual({ procs: 1 });
      expect(uncaught).toEqual([]);
      process.stderr.write(`host parser: ${sent} frames in ${cases} cases ${JSON.stringify(outcomes)}\n`);
      expect(outcomes.poisoned).toBeGreaterThan(100);
      expect(outcomes.closedByChaos).toBeGreaterThan(100);
    } finally {
      await bystander.channel.close();
      bystander.guest.close();
      guest.close();
    }
  }, 60_000);

  it(`the guest agent takes ${FRAMES} random and mutated host frames, refusing exactly the malformed ones`, async () => {
    await fuzzGuestAgent(bin, FRAMES, SEED + 1);
  }, 60_000);

  it(`the guest agent under AddressSanitizer takes ${ASAN_FRAMES} more without an out-of-bounds access`, async () => {
    await fuzzGuestAgent(asanBin, ASAN_FRAMES, SEED + 2, { ...process.env, ASAN_OPTIONS: 'detect_leaks=0:abort_on_error=1', UBSAN_OPTIONS: 'halt_on_error=1' });
  }, 60_000);
});

// ---- the guest agent's parser ---------------------------------------------------------------

/** Linux's NSIG: signal numbers are 1..64. */
const NSIG = 65;
const IFNAMSIZ = 16;

/** What the agent must do with a frame: refuse it as malformed, call it unknown, or take it (OK or another ERR). */
type Verdict = 'malformed' | 'unknown' | 'taken';

/** `count` NUL-terminated strings from `off` and the offset after them, or undefined when one lacks its NUL. */
function strings(p: Buffer, off: number, count: number): { list: Buffer[]; end: number } | undefined {
  const list: Buffer[] = [];
  for (let i = 0; i < count; i++) {
    const nul = p.indexOf(0, off);
    if (nul < 0) return undefined;
    list.push(p.subarray(off, nul));
    off = nul + 1;
  }
  return { list, end: off };
}

function skipStrings(p: Buffer, off: number, count: number): number | undefined {
  return strings(p, off, count)?.end;
}

/** Whether the agent's root_path() refuses a path: empty, a `..` component, or too long with the root. */
function pathRefused(rel: Buffer, rootLength: number): boolean {
  if (rel.length === 0 || rel.toString('latin1').split('/').includes('..')) return true;
  let start = 0;
  while (rel[start] === 0x2f) start++;
  return rootLength + 1 + rel.length - start >= 4096;
}

/**
 * PROTOCOL.md's layouts, in the order the agent checks them: the reference the agent is held to.
 * `rootLength` is the length of the agent's --root (a path too long with it is refused early).
 */
function verdict(type: number, p: Buffer, rootLength: number): Verdict {
  const exact = (ok: boolean): Verdict => (ok ? 'taken' : 'malformed');
  switch (type) {
    case HOST.HELLO:
      return exact(p.length === 8);
    case HOST.EXEC: {
      if (p.length < 9) return 'malformed';
      const argc = p.readUInt16LE(5);
      const envc = p.readUInt16LE(7);
      if (argc === 0 || 1 + argc + envc > p.length - 9) return 'malformed';
      return exact(skipStrings(p, 9, 1 + argc + envc) === p.length);
    }
    case HOST.STDIN:
    case HOST.TCP_DATA:
      return 'taken';
    case HOST.STDIN_EOF:
    case HOST.TCP_EOF:
    case HOST.CLOSE:
    case HOST.HEALTH:
      return exact(p.length === 0);
    case HOST.SIGNAL:
      return exact(p.length === 1 && p[0]! >= 1 && p[0]! < NSIG);
    case HOST.RESIZE:
      return exact(p.length === 4);
    case HOST.TCP_CONNECT:
      return exact(p.length === 2);
    case HOST.PUT_FILE:
      return exact(p.length >= 4 && skipStrings(p, 4, 1) !== undefined);
    case HOST.GET_FILE:
    case HOST.QUIESCE:
      return exact(skipStrings(p, 0, 1) === p.length);
    case HOST.SET_IDENTITY:
      return exact(skipStrings(p, 0, 2) === p.length);
    case HOST.REPLACE_DIR: {
      const afterDir = skipStrings(p, 0, 1);
      if (afterDir === undefined || afterDir + 4 > p.length) return 'malformed';
      const count = p.readUInt32LE(afterDir);
      let off = afterDir + 4;
      if (count > Math.floor((p.length - off) / 5)) return 'malformed';
      // A dir the agent refuses is answered before the files are looked at.
      if (pathRefused(p.subarray(0, afterDir - 1), rootLength)) return 'taken';
      for (let i = 0; i < count; i++) {
        const afterName = skipStrings(p, off, 1);
        if (afterName === undefined || afterName + 4 > p.length) return 'malformed';
        const len = p.readUInt32LE(afterName);
        if (len > p.length - afterName - 4) return 'malformed';
        const name = p.subarray(off, afterName - 1).toString('latin1');
        off = afterName + 4 + len;
        if (name === '' || name.includes('/') || name === '.' || name === '..') return 'taken';
      }
      return exact(off === p.length);
    }
    case HOST.KEY:
      return exact(p.length === 0);
    case HOST.SEALED:
      // Never opened here (no KEY is ever sent): refused with its own ERR, whatever it holds.
      return 'taken';
    case HOST.NET_CONFIG: {
      const three = strings(p, 0, 3);
      if (!three) return 'malformed';
      // An optional fourth string, the MAC.
      if ((three.end < p.length ? skipStrings(p, three.end, 1) : three.end) !== p.length) return 'malformed';
      const [ifc, cidr, gw] = three.list as [Buffer, Buffer, Buffer];
      return exact(ifc.length > 0 && cidr.length > 0 && gw.length > 0 && ifc.length < IFNAMSIZ);
    }
    default:
      return 'unknown';
  }
}

const PATHS = ['a', 'dir/b', 'dir/sub/c', 'secrets', 'secrets/x', 'etc/hostname', '', '/', 'dir', '../x', 'dir/../../y', 'x/..', '/abs/path'];
const NAMES = ['A', 'B', 'KEY', '.', '..', 'x/y', ''];

/** A well-formed host frame payload of the given type (never EXEC or SIGNAL). */
function hostPayload(rng: Rng, type: number): Buffer {
  switch (type) {
    case HOST.HELLO:
      return Buffer.concat([u32(rng.u32()), u32(rng.u32())]);
    case HOST.STDIN:
    case HOST.TCP_DATA:
      return rng.bytes(rng.size(1024));
    case HOST.RESIZE:
      return Buffer.concat([u16(rng.int(65536)), u16(rng.int(65536))]);
    case HOST.TCP_CONNECT:
      return u16(rng.int(65536));
    case HOST.PUT_FILE:
      return Buffer.concat([u32(rng.pick([0o644, 0o600, rng.u32()])), cstr(rng.pick(PATHS)), rng.bytes(rng.chance(0.01) ? 64 * KiB : rng.size(1024))]);
    case HOST.GET_FILE:
      return cstr(rng.pick(PATHS));
    case HOST.REPLACE_DIR: {
      const files = Array.from({ length: rng.int(4) }, () => {
        const data = rng.bytes(rng.size(256));
        return Buffer.concat([cstr(rng.chance(0.9) ? rng.pick(NAMES.slice(0, 3)) : rng.pick(NAMES)), u32(data.length), data]);
      });
      return Buffer.concat([cstr(rng.pick(PATHS)), u32(files.length), ...files]);
    }
    case HOST.SET_IDENTITY:
      return Buffer.concat([cstr(rng.pick(['box', 'fuzz-box', '', 'a b', 'x'.repeat(70)])), cstr(rng.chance(0.8) ? rng.bytes(16).toString('hex') : 'not-hex')]);
    case HOST.QUIESCE:
      // Each QUIESCE that gets past its path check calls sync(): keep those rare.
      return cstr(rng.chance(0.002) ? 'secrets' : rng.pick(['../secrets', 'secrets/..', '']));
    case HOST.NET_CONFIG:
      return Buffer.concat([
        cstr(rng.pick(['lo', 'eth0', 'x'.repeat(20), ''])),
        cstr(rng.pick(['10.0.0.2/24', '10.0.0.2/40', 'junk', '127.0.0.1/8'])),
        cstr(rng.pick(['10.0.0.1', 'junk', '127.0.0.1'])),
        ...(rng.chance(0.5) ? [cstr(rng.pick(['02:00:00:00:00:01', 'zz']))] : []),
      ]);
    default:
      return Buffer.alloc(0);
  }
}

/**
 * The types a well-formed frame may have here: every one but EXEC and SIGNAL, and KEY: without a
 * key every SEALED frame is refused unopened, so random bytes are never decrypted into a frame.
 */
const SAFE_TYPES: number[] = Object.values(HOST).filter((t) => t !== HOST.EXEC && t !== HOST.SIGNAL && t !== HOST.KEY);

/** One mutation of a payload (the header always tells its true length: the agent stays in step). */
function mutatePayload(rng: Rng, p: Buffer): Buffer {
  const b = Buffer.from(p);
  switch (rng.int(7)) {
    case 0:
      return b.subarray(0, rng.int(b.length + 1));
    case 1:
      return Buffer.concat([b, rng.bytes(1 + rng.int(8))]);
    case 2: {
      // A NUL (or all of them) gone.
      const nuls = [...b.keys()].filter((i) => b[i] === 0);
      for (const i of rng.chance(0.5) ? nuls : nuls.slice(0, 1)) b[i] = 0x41;
      return b;
    }
    case 3:
      if (b.length) for (let i = 0, n = 1 + rng.int(3); i < n; i++) b[rng.int(b.length)]! ^= 1 << rng.int(8);
      return b;
    case 4: {
      // A count or length field off by one, or huge.
      if (b.length < 4) return b;
      const at = rng.int(b.length - 3);
      const v = b.readUInt32LE(at);
      b.writeUInt32LE(rng.pick([v + 1, v - 1, 0xffffffff, 0xffff, 0x10000]) >>> 0, at);
      return b;
    }
    case 5:
      return rng.bytes(rng.size(256));
    default:
      return Buffer.alloc(0);
  }
}

/** An EXEC or SIGNAL payload that the reference says is malformed (nothing may run). */
function refusedOnly(rng: Rng, type: number, rootLength: number): Buffer {
  for (;;) {
    let p: Buffer;
    if (type === HOST.SIGNAL) {
      p = rng.chance(0.5) ? rng.bytes(rng.pick([0, 2, 3, 8])) : Buffer.from([rng.chance(0.5) ? 0 : NSIG + rng.int(256 - NSIG)]);
    } else {
      const argv = ['devyard-fuzz-never-run', 'arg'];
      const env = ['A=1'];
      const head = Buffer.concat([Buffer.from([rng.int(2)]), u16(80), u16(24), u16(argv.length), u16(env.length)]);
      p = mutatePayload(rng, Buffer.concat([head, cstr('/'), ...argv.map(cstr), ...env.map(cstr)]));
    }
    if (verdict(type, p, rootLength) === 'malformed') return p;
  }
}

async function fuzzGuestAgent(agentBin: string, frames: number, seed: number, env?: NodeJS.ProcessEnv): Promise<void> {
  const rng = new Rng(seed);
  const root = mkdtempSync(join(dir, 'root-'));
  const host = await RawHost.start(agentBin, dir, root, GUEST_SANDBOX, env);
  const expected = new Map<number, Verdict>();
  const problems: string[] = [];
  const stats = { malformed: 0, unknown: 0, taken: 0, mutated: 0, syncs: 0 };
  let nextId = 1;
  let sent = 0;
  const died = once(host.proc, 'exit').then(([code, signal]) => `the agent exited (${code ?? signal})`);
  const check = (f: Frame) => {
    const want = expected.get(f.channel);
    const text = f.type === GUEST.ERR ? f.payload.toString('latin1') : '';
    if (f.type === GUEST.STARTED) problems.push(`channel ${f.channel}: the agent started a process`);
    if (want === 'malformed' && !/^malformed [A-Z_]+ frame: /.test(text)) problems.push(`channel ${f.channel}: want ERR malformed, got 0x${f.type.toString(16)} ${text}`);
    if (want === 'unknown' && !text.startsWith('unknown frame type')) problems.push(`channel ${f.channel}: want ERR unknown, got 0x${f.type.toString(16)} ${text}`);
    if (want === 'taken' && text.startsWith('malformed')) problems.push(`channel ${f.channel}: a well-formed frame refused: ${text}`);
  };
  const context = () => `seed ${seed}, ${sent} frames sent; problems: ${problems.slice(0, 5).join('; ')}; agent stderr: ${host.stderr.slice(-2000)}`;
  try {
    while (sent < frames) {
      const batch: Buffer[] = [];
      const refusedIds: number[] = [];
      for (let i = 0; i < 1000; i++) {
        const id = nextId++;
        let type = rng.pick(SAFE_TYPES);
        // QUIESCE that gets past its checks calls sync(), which costs the whole machine a flush.
        if (type === HOST.QUIESCE && rng.chance(0.9)) type = rng.pick(SAFE_TYPES);
        let payload = hostPayload(rng, type);
        const r = rng.int(100);
        if (r < 35) {
          payload = mutatePayload(rng, payload);
          stats.mutated++;
        } else if (r < 40) {
          // Another type (unknown ones included) on the payload.
          type = rng.chance(0.5) ? rng.int(256) : rng.pick(SAFE_TYPES);
          if (type === HOST.KEY) type = HOST.SEALED;
        } else if (r < 46) {
          type = rng.pick([HOST.EXEC, HOST.SIGNAL]);
        }
        if (type === HOST.EXEC || type === HOST.SIGNAL) {
          if (verdict(type, payload, root.length) !== 'malformed') payload = refusedOnly(rng, type, root.length);
        }
        const v = verdict(type, payload, root.length);
        expected.set(id, v);
        stats[v]++;
        if (type === HOST.QUIESCE && v === 'taken' && !pathRefused(payload.subarray(0, -1), root.length)) stats.syncs++;
        if (v !== 'taken') refusedIds.push(id);
        batch.push(frame(id, type, payload));
      }
      sent += batch.length;
      const sync = nextId++;
      const synced = host.waitFor((f) => f.channel === sync);
      if (!host.conn.write(Buffer.concat([...batch, frame(sync, HOST.HEALTH)]))) await once(host.conn, 'drain');
      const outcome = await Promise.race([synced, died]);
      expect(typeof outcome === 'string' ? outcome : 'alive', context()).toBe('alive');
      // Every frame before the sync has been handled: each refused one has its single ERR.
      for (const f of host.received) check(f);
      const answered = new Map<number, number>();
      for (const f of host.received) answered.set(f.channel, (answered.get(f.channel) ?? 0) + 1);
      for (const id of refusedIds) if (answered.get(id) !== 1) problems.push(`channel ${id}: ${answered.get(id) ?? 0} replies to a refused frame`);
      expect(problems, context()).toEqual([]);
      host.received.length = 0;
    }
    // Late replies (files still streaming) are checked too, then the agent must still be itself.
    const hello = await host.request(nextId++, HOST.HELLO, Buffer.alloc(8));
    for (const f of host.received) check(f);
    expect(problems, context()).toEqual([]);
    expect(host.alive, context()).toBe(true);
    expect(hello.type).toBe(GUEST.OK);
    const [rel, , boot, rest] = hello.payload.toString().split('\0');
    expect([rel, boot, rest]).toEqual([release(), readFileSync('/proc/sys/kernel/random/boot_id', 'utf8').trim(), '']);
    const health = await host.request(nextId++, HOST.HEALTH);
    expect(health.type).toBe(GUEST.OK);
    expect(health.payload.toString()).toMatch(/^uptime=[\d.]+\nload1=[\d.]+\nmem_total_kb=\d+\nmem_available_kb=\d+\nprocs=\d+\nidle_ms=\d+\n$/);
    // And the real host side still works on the same connection.
    host.conn.removeAllListeners('data');
    const channel = await GuestChannel.open(host.conn);
    expect(Object.keys(await channel.health()).sort()).toEqual(['idle_ms', 'load1', 'mem_available_kb', 'mem_total_kb', 'procs', 'uptime']);
    await channel.putFile('after/fuzz.txt', 'still here');
    expect((await channel.getFile('after/fuzz.txt')).toString()).toBe('still here');
    process.stderr.write(`guest agent ${agentBin.endsWith('asan') ? '(sanitized) ' : ''}: ${sent} frames ${JSON.stringify(stats)}\n`);
    expect(stats.malformed).toBeGreaterThan(frames / 10);
    await channel.close();
  } finally {
    await host.stop();
    rmSync(root, { recursive: true, force: true });
  }
}
