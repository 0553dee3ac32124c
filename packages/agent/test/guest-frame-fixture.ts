/**
 * Both ends of the guest-agent protocol (guest/PROTOCOL.md) as test fixtures that can send any
 * bytes, well-formed or not:
 * - FakeGuest plays a microVM's guest agent behind a unix socket (as QEMU's chardev socket), for
 *   attacks on the host's real GuestChannel;
 * - RawHost plays the node agent towards the real compiled guest agent, for attacks on its parser.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { once } from 'node:events';
import { createServer, type Server, type Socket } from 'node:net';
import { join } from 'node:path';
import { GuestChannel, type GuestChannelOptions } from '@devyard/agent/runtime/microvm/guest-channel';

/** Host → guest frame types (PROTOCOL.md). */
export const HOST = {
  HELLO: 0x01,
  EXEC: 0x02,
  STDIN: 0x03,
  STDIN_EOF: 0x04,
  SIGNAL: 0x05,
  RESIZE: 0x06,
  TCP_CONNECT: 0x07,
  TCP_DATA: 0x08,
  TCP_EOF: 0x09,
  CLOSE: 0x0a,
  PUT_FILE: 0x0b,
  GET_FILE: 0x0c,
  REPLACE_DIR: 0x0d,
  HEALTH: 0x0e,
  SET_IDENTITY: 0x0f,
  QUIESCE: 0x10,
  NET_CONFIG: 0x11,
  KEY: 0x12,
  SEALED: 0x13,
} as const;

/** Guest → host frame types (PROTOCOL.md). */
export const GUEST = {
  OK: 0x81,
  ERR: 0x82,
  STDOUT: 0x83,
  STDERR: 0x84,
  STARTED: 0x85,
  EXIT: 0x86,
  CONNECTED: 0x87,
  CONNECT_FAILED: 0x88,
  TCP_DATA: 0x89,
  TCP_EOF: 0x8a,
  CLOSED: 0x8b,
  FILE_DATA: 0x8c,
} as const;

/** One parsed frame. */
export interface Frame {
  channel: number;
  type: number;
  payload: Buffer;
}

/** Encodes a frame; `length` overrides the header's length field (to lie about the payload). */
export function frame(channel: number, type: number, payload: Buffer = Buffer.alloc(0), length = payload.length): Buffer {
  const header = Buffer.alloc(9);
  header.writeUInt32LE(length >>> 0, 0);
  header.writeUInt32LE(channel >>> 0, 4);
  header.writeUInt8(type & 0xff, 8);
  return Buffer.concat([header, payload]);
}

export function i32(v: number): Buffer {
  const b = Buffer.alloc(4);
  b.writeInt32LE(v);
  return b;
}

/** Splits a byte stream into frames, keeping a partial one for the next chunk. */
export class FrameReader {
  private buf: Buffer = Buffer.alloc(0);

  push(chunk: Buffer): Frame[] {
    this.buf = this.buf.length ? Buffer.concat([this.buf, chunk]) : chunk;
    const out: Frame[] = [];
    while (this.buf.length >= 9) {
      const len = this.buf.readUInt32LE(0);
      if (this.buf.length < 9 + len) break;
      out.push({ channel: this.buf.readUInt32LE(4), type: this.buf.readUInt8(8), payload: this.buf.subarray(9, 9 + len) });
      this.buf = this.buf.subarray(9 + len);
    }
    return out;
  }
}

let fakeGuestCount = 0;

/**
 * A guest agent that answers HELLO (with `rel\0host\0boot\0`) and HEALTH (`procs=1`) and leaves
 * every other frame to handlers a test installs, which may answer anything at all.
 */
export class FakeGuest {
  /** Every frame the host sent, in order. */
  readonly received: Frame[] = [];
  private readonly handlers = new Map<number, (f: Frame) => void>();
  private waiters: { match(f: Frame): boolean; resolve(f: Frame): void }[] = [];
  private socket?: Socket;

  private constructor(
    /** The unix socket the host connects to. */
    readonly path: string,
    private readonly server: Server,
  ) {
    this.handle(HOST.HELLO, (f) => this.send(f.channel, GUEST.OK, Buffer.from('rel\0host\0boot\0')));
    this.handle(HOST.HEALTH, (f) => this.send(f.channel, GUEST.OK, Buffer.from('procs=1\n')));
  }

  /** Listens on a fresh socket in dir; the host connects later (see {@link FakeGuest.start}). */
  static async listen(dir: string): Promise<FakeGuest> {
    const path = join(dir, `fake-guest-${process.pid}-${++fakeGuestCount}.sock`);
    const server = createServer();
    server.listen(path);
    await once(server, 'listening');
    const guest = new FakeGuest(path, server);
    server.on('connection', (socket: Socket) => {
      guest.socket = socket;
      socket.on('error', () => {});
      const reader = new FrameReader();
      socket.on('data', (chunk: Buffer) => {
        for (const f of reader.push(chunk)) guest.onFrame(f);
      });
    });
    return guest;
  }

  /** Listens and lets a real GuestChannel connect and handshake. */
  static async start(dir: string, opts?: GuestChannelOptions): Promise<{ guest: FakeGuest; channel: GuestChannel }> {
    const guest = await FakeGuest.listen(dir);
    return { guest, channel: await GuestChannel.connect(guest.path, opts) };
  }

  /** Answers frames of this type with the handler (replacing the default). */
  handle(type: number, handler: (f: Frame) => void): void {
    this.handlers.set(type, handler);
  }

  /** Resolves with the first frame (already received or later) that matches. */
  waitFor(match: (f: Frame) => boolean): Promise<Frame> {
    const have = this.received.find(match);
    if (have) return Promise.resolve(have);
    return new Promise((resolve) => this.waiters.push({ match, resolve }));
  }

  /** The accepted connection (after the host connected). */
  get conn(): Socket {
    if (!this.socket) throw new Error('the host has not connected yet');
    return this.socket;
  }

  /** Sends one frame; false when the socket's buffer is over its high-water mark. */
  send(channel: number, type: number, payload?: Buffer, length?: number): boolean {
    return this.conn.write(frame(channel, type, payload, length));
  }

  /** Sends raw bytes. */
  sendRaw(bytes: Buffer): boolean {
    return this.conn.write(bytes);
  }

  close(): void {
    this.socket?.destroy();
    this.server.close();
  }

  private onFrame(f: Frame): void {
    this.received.push(f);
    // Unless a test plays a guest agent that seals, this one predates KEY: frames then go plain.
    if (f.type === HOST.KEY && !this.handlers.has(HOST.KEY)) this.send(f.channel, GUEST.ERR, Buffer.from('unknown frame type 0x12'));
    this.handlers.get(f.type)?.(f);
    const ready = this.waiters.filter((w) => w.match(f));
    this.waiters = this.waiters.filter((w) => !w.match(f));
    for (const w of ready) w.resolve(f);
  }
}

/**
 * Runs a guest agent on this host in fresh network, UTS, IPC and mount namespaces: what it does to
 * interfaces (NET_CONFIG), the hostname (SET_IDENTITY) and loopback ports (TCP_CONNECT) stays
 * there. Files are confined by the agent's --root, which the tests point at a scratch directory.
 */
export const GUEST_SANDBOX = ['unshare', '--net', '--uts', '--ipc', '--mount', '--'];

/**
 * The real guest agent binary driven frame by frame, as the node agent would (but able to send
 * anything). `wrapper` runs the agent under another program, e.g. `unshare` into fresh namespaces.
 */
export class RawHost {
  /** Every frame the agent sent, in order (a test may empty it). */
  readonly received: Frame[] = [];
  /** The end of what the agent wrote to stderr (a sanitizer's report, say). */
  stderr = '';
  private waiters: { match(f: Frame): boolean; resolve(f: Frame): void }[] = [];

  private constructor(
    /** The agent process. */
    readonly proc: ChildProcess,
    /** The connection the agent made. */
    readonly conn: Socket,
    private readonly server: Server,
  ) {
    const reader = new FrameReader();
    conn.on('error', () => {});
    conn.on('data', (chunk: Buffer) => {
      for (const f of reader.push(chunk)) this.onFrame(f);
    });
    // Read all of it, or a chatty agent would block on a full pipe.
    proc.stderr?.on('data', (chunk: Buffer) => (this.stderr = (this.stderr + chunk.toString()).slice(-16_384)));
  }

  /** Starts `bin --unix <sock> --root <root>` and accepts its connection. */
  static async start(bin: string, sockDir: string, root: string, wrapper: string[] = [], env?: NodeJS.ProcessEnv): Promise<RawHost> {
    const path = join(sockDir, `raw-host-${process.pid}-${++fakeGuestCount}.sock`);
    const server = createServer();
    server.listen(path);
    await once(server, 'listening');
    const accepted = once(server, 'connection') as Promise<[Socket]>;
    const argv = [...wrapper, bin, '--unix', path, '--root', root];
    // The wrapper when given (unshare), then the guest agent the test compiled.
    // host-programs: unshare
    const proc = spawn(argv[0]!, argv.slice(1), { stdio: ['ignore', 'ignore', 'pipe'], env: env ?? process.env });
    const failed = once(proc, 'exit').then(([code, signal]) => {
      throw new Error(`the guest agent exited before connecting (${code ?? signal})`);
    });
    failed.catch(() => {});
    const [conn] = await Promise.race([accepted, failed]);
    return new RawHost(proc, conn, server);
  }

  /** Whether the agent process is still running. */
  get alive(): boolean {
    return this.proc.exitCode === null && this.proc.signalCode === null;
  }

  send(channel: number, type: number, payload?: Buffer): boolean {
    return this.conn.write(frame(channel, type, payload));
  }

  /** Resolves with the first frame (already received or later) that matches. */
  waitFor(match: (f: Frame) => boolean): Promise<Frame> {
    const have = this.received.find(match);
    if (have) return Promise.resolve(have);
    return new Promise((resolve) => this.waiters.push({ match, resolve }));
  }

  /** Sends a request and resolves with the agent's OK or ERR to it (other frames are skipped). */
  async request(channel: number, type: number, payload?: Buffer): Promise<Frame> {
    const reply = this.waitFor((f) => f.channel === channel && (f.type === GUEST.OK || f.type === GUEST.ERR));
    this.send(channel, type, payload);
    return reply;
  }

  /** Ends the connection and the agent; resolves once the agent has exited. */
  async stop(): Promise<void> {
    const exited = this.alive ? once(this.proc, 'exit') : Promise.resolve();
    this.conn.destroy();
    this.proc.kill('SIGKILL');
    await exited;
    this.server.close();
  }

  private onFrame(f: Frame): void {
    this.received.push(f);
    const ready = this.waiters.filter((w) => w.match(f));
    this.waiters = this.waiters.filter((w) => !w.match(f));
    for (const w of ready) w.resolve(f);
  }
}
