/**
 * The host side of the guest-agent protocol (guest/PROTOCOL.md): one byte stream to a microVM's
 * guest agent (the QEMU virtio-serial chardev socket), multiplexing exec sessions, TCP
 * connections into the VM and file requests as frames on host-chosen channel ids.
 *
 * Everything that arrives on the stream is written by code in the VM, which may be hostile: a
 * frame is checked against its type's shape (length, values) and against the state of the
 * channel it names before anything uses it, and a frame that fails either check closes this one
 * channel (GuestChannelError) instead of throwing out of the stream's data handler, which would
 * end the node agent and every other box's channel with it.
 *
 * Memory held for the guest is bounded. A guest → host frame carries at most 64 KiB (refused at
 * its header, before the payload is buffered). Session output waits in a per-session stream of
 * SESSION_HIGH_WATER bytes; the protocol has no per-session credit (as virtio-vsock has), so when
 * any session's consumer falls behind, the whole link stops reading until that consumer catches
 * up or goes away. The guest agent then stops reading its processes' output (its own high-water
 * mark), and the processes block on their pipes: lossless, bounded on this side by
 * SESSION_HIGH_WATER + 64 KiB per open session plus one frame and one read of unparsed input.
 * The cost is head-of-line blocking within one box: while one of its consumers is behind, the
 * box's other sessions wait and its requests may time out; other boxes have links of their own.
 * GET_FILE replies accumulate up to a per-call limit (64 MiB by default).
 *
 * Frames that carry the box's secrets (EXEC: its environment; REPLACE_DIR: the secret files) go
 * SEALED under a key the guest agent draws: the guest's virtio receive buffers keep every frame's
 * bytes long after it was read, and a RAM snapshot must not hold secrets once the guest forgot
 * the key on QUIESCE (PROTOCOL.md, "Secrets and RAM snapshots").
 */
import { createCipheriv } from 'node:crypto';
import { connect as netConnect, type Socket } from 'node:net';
import { constants } from 'node:os';
import { Duplex, Readable, Writable } from 'node:stream';
import type { ExecOptions, ExecProcess } from '../runtime-driver.js';

const HEADER_LEN = 9;
/** Host → guest frames: EXEC and PUT_FILE carry up to 1 MiB in one frame. */
const MAX_PAYLOAD = 1 << 20;
const CHUNK = 64 << 10;
/**
 * Guest → host frames: the guest agent sends data in CHUNK-sized pieces and every other frame is
 * far smaller, so a header announcing more is refused before its payload is buffered.
 */
const MAX_GUEST_PAYLOAD = CHUNK;
/** Unread output a session holds for its consumer before the link stops reading the guest. */
const SESSION_HIGH_WATER = 256 << 10;
/** Guest error texts end up in errors, logs and API responses: they are cut to this many bytes. */
const MAX_GUEST_TEXT = 1024;
const DEFAULT_TIMEOUT_MS = 10_000;
const CONNECT_RETRY_MS = 20;
const ECONNREFUSED = 111;
/** A SEALED frame's own bytes: the nonce and the inner frame's type. */
const SEAL_OVERHEAD = 13;

/** How many bytes {@link GuestChannel.getFile} accepts unless the caller says otherwise (64 MiB). */
export const DEFAULT_MAX_FILE_BYTES = 64 << 20;

/** Host → guest frame types. */
const T = {
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

/** Guest → host frame types. */
const G = {
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

const HOST_NAMES = new Map<number, string>(Object.entries(T).map(([name, type]) => [type, name]));
const GUEST_NAMES = new Map<number, string>(Object.entries(G).map(([name, type]) => [type, name]));

/** Guest → host types whose payload has one fixed size (the others carry 0..MAX_GUEST_PAYLOAD bytes). */
const FIXED_SIZE = new Map<number, number>([
  [G.STARTED, 4],
  [G.EXIT, 4],
  [G.CONNECTED, 0],
  [G.CONNECT_FAILED, 4],
  [G.TCP_EOF, 0],
  [G.CLOSED, 0],
]);

/** Why a guest channel closed, or a request on it failed. */
export class GuestChannelError extends Error {
  constructor(
    /**
     * Stable error code: `MALFORMED_FRAME` (a frame without its type's shape: unknown type,
     * wrong or oversized length, value out of range), `UNEXPECTED_FRAME` (a well-formed frame the
     * channel it names cannot take in its state), `FRAME_HANDLER_FAILED` (handling a frame threw:
     * a bug on this side, contained to the channel), `FILE_TOO_LARGE` (a GET_FILE reply over the
     * caller's limit; the channel stays open).
     */
    readonly code: 'MALFORMED_FRAME' | 'UNEXPECTED_FRAME' | 'FRAME_HANDLER_FAILED' | 'FILE_TOO_LARGE',
    message: string,
    options?: ErrorOptions,
  ) {
    super(message, options);
  }
}

/** Options for {@link GuestChannel.open} and {@link GuestChannel.connect}. */
export interface GuestChannelOptions {
  /** How long connecting and the HELLO handshake may take, in ms (default 10 s). */
  timeoutMs?: number;
  /** How long each later request may wait for its reply, in ms (default 10 s). */
  requestTimeoutMs?: number;
}

/** Options for {@link GuestChannel.getFile}. */
export interface GetFileOptions {
  /** The most bytes the file may have; a larger one fails with FILE_TOO_LARGE (default 64 MiB). */
  maxBytes?: number;
}

/** A process started by the guest agent; `pid` is its pid inside the VM. */
export interface GuestExecProcess extends ExecProcess {
  /** The process id inside the guest. */
  pid: number;
}

/** A file for {@link GuestChannel.replaceDir}. */
export interface GuestDirFile {
  /** File name (no slashes). */
  name: string;
  /** File content. */
  data: Buffer | string;
}

/** What sessions need of the channel, so they do not reach into its internals. */
interface ChannelLink {
  send(channel: number, type: number, payload?: Buffer): boolean;
  whenDrained(cb: () => void): void;
  forget(channel: number): void;
  /** The stream's consumer is behind: stop reading the guest until it catches up. */
  stall(stream: Readable): void;
  /** The stream's consumer caught up, or nothing more can arrive for it. */
  unstall(stream: Readable): void;
}

interface PendingRequest {
  /** The request's frame type name, for errors. */
  name: string;
  resolve(data: Buffer): void;
  reject(err: Error): void;
  chunks: Buffer[];
  /** FILE_DATA bytes so far. */
  bytes: number;
  /** Set for GET_FILE only: no other request takes FILE_DATA. */
  file?: { path: string; maxBytes: number };
  rearm(): void;
  timer?: NodeJS.Timeout;
}

function cstr(value: string): Buffer {
  // An embedded NUL would silently shift every later field of the frame.
  if (value.includes('\0')) throw new TypeError(`string contains a NUL byte: ${JSON.stringify(value)}`);
  return Buffer.from(`${value}\0`, 'utf8');
}

function u16(v: number): Buffer {
  const b = Buffer.alloc(2);
  b.writeUInt16LE(v & 0xffff);
  return b;
}

function u32(v: number): Buffer {
  const b = Buffer.alloc(4);
  b.writeUInt32LE(v >>> 0);
  return b;
}

function toBuffer(data: Buffer | string): Buffer {
  return typeof data === 'string' ? Buffer.from(data, 'utf8') : data;
}

function guestText(payload: Buffer): string {
  return payload.subarray(0, MAX_GUEST_TEXT).toString('utf8');
}

function hex(type: number): string {
  return `0x${type.toString(16).padStart(2, '0')}`;
}

/** Sends data as frames of at most CHUNK bytes; cb runs once the stream can take more. */
function sendChunked(link: ChannelLink, channel: number, type: number, data: Buffer, cb: () => void): void {
  for (let off = 0; off < data.length; off += CHUNK) link.send(channel, type, data.subarray(off, off + CHUNK));
  link.whenDrained(cb);
}

function dialError(message: string, code: 'PORT_REFUSED' | 'DIAL_FAILED'): Error {
  return Object.assign(new Error(message), { code });
}

/** What is wrong with a frame header (type and length), judged before its payload is read. */
function headerProblem(type: number, len: number): string | undefined {
  const name = GUEST_NAMES.get(type);
  if (!name) return `unknown frame type ${hex(type)}`;
  if (len > MAX_GUEST_PAYLOAD) return `${len} bytes exceed the ${MAX_GUEST_PAYLOAD}-byte limit of guest frames`;
  const size = FIXED_SIZE.get(type);
  if (size !== undefined && len !== size) return `${len} bytes, but the type carries exactly ${size}`;
  return undefined;
}

/** What is wrong with a whole frame's payload, for types whose values have a range. */
function payloadProblem(type: number, payload: Buffer): string | undefined {
  if (type === G.STARTED) {
    const pid = payload.readInt32LE(0);
    if (pid < 1) return `pid ${pid} is not a process id`;
  } else if (type === G.EXIT) {
    const code = payload.readInt32LE(0);
    if (code < 0 || code > 255) return `exit code ${code} is outside 0..255`;
  }
  return undefined;
}

/**
 * A session's output towards its consumer. Pushing past the high-water mark stalls the link; the
 * stream's _read (the consumer wants more) releases it, and so do its end and its destruction.
 */
class SessionOutput extends Readable {
  private ended = false;

  constructor(private readonly link: ChannelLink) {
    super({ highWaterMark: SESSION_HIGH_WATER });
    this.on('close', () => link.unstall(this));
  }

  override _read(): void {
    this.link.unstall(this);
  }

  deliver(data: Buffer): void {
    // A consumer that destroyed the stream does not want the rest.
    if (this.ended || this.destroyed) return;
    if (!this.push(data)) this.link.stall(this);
  }

  finish(): void {
    if (this.ended) return;
    this.ended = true;
    this.push(null);
    this.link.unstall(this);
  }
}

/** One exec session: its streams live on after the session ends, so consumers read everything. */
class ExecSession {
  readonly stdout: SessionOutput;
  readonly stderr: SessionOutput;
  readonly stdin: Writable;
  readonly exited: Promise<number>;
  done = false;
  private resolveExit!: (code: number) => void;

  constructor(
    private readonly link: ChannelLink,
    private readonly id: number,
    private readonly tty: boolean,
  ) {
    this.stdout = new SessionOutput(link);
    this.stderr = new SessionOutput(link);
    this.exited = new Promise((resolve) => (this.resolveExit = resolve));
    this.stdin = new Writable({
      // Writes after the end are dropped, like writes to the pipe of a process that has exited.
      write: (chunk: Buffer, _enc, cb) => (this.done ? cb() : sendChunked(link, id, T.STDIN, chunk, () => cb())),
      final: (cb) => {
        if (!this.done) link.send(id, T.STDIN_EOF);
        cb();
      },
    });
    this.stdin.on('error', () => {});
  }

  process(pid: number): GuestExecProcess {
    return {
      pid,
      stdin: this.stdin,
      stdout: this.stdout,
      stderr: this.stderr,
      exited: this.exited,
      resize: (cols, rows) => {
        if (this.tty && !this.done) this.link.send(this.id, T.RESIZE, Buffer.concat([u16(cols), u16(rows)]));
      },
      kill: (signal: NodeJS.Signals = 'SIGTERM') => {
        const num = (constants.signals as Record<string, number>)[signal];
        if (num === undefined) throw new TypeError(`unknown signal ${signal}`);
        if (!this.done) this.link.send(this.id, T.SIGNAL, Buffer.from([num]));
      },
    };
  }

  /** Ends the session: the guest sent EXIT (code) or the session is lost (255). */
  finish(code: number): void {
    if (this.done) return;
    this.done = true;
    this.link.forget(this.id);
    this.stdout.finish();
    this.stderr.finish();
    this.resolveExit(code);
  }
}

/** A TCP connection inside the VM, as a half-closable Duplex. */
class GuestSocket extends Duplex {
  /** The guest no longer knows the session: sending CLOSE would be pointless. */
  guestGone = false;
  /** The guest sent TCP_EOF: no more data may follow. */
  readEnded = false;

  constructor(
    private readonly link: ChannelLink,
    private readonly id: number,
  ) {
    super({ allowHalfOpen: true, readableHighWaterMark: SESSION_HIGH_WATER });
    this.on('close', () => link.unstall(this));
    // The guest can end the connection (or break the channel) in the same read that connected
    // it, before the dial's caller has had a turn to listen for errors: an 'error' nobody
    // listens to would end the node agent. Callers that listen still get it.
    this.on('error', () => {});
  }

  // The consumer wants more: the link may read the guest again (see the module comment).
  override _read(): void {
    this.link.unstall(this);
  }

  override _write(chunk: Buffer, _enc: BufferEncoding, cb: (err?: Error | null) => void): void {
    if (this.guestGone) return cb(Object.assign(new Error('the guest closed the connection'), { code: 'EPIPE' }));
    sendChunked(this.link, this.id, T.TCP_DATA, chunk, () => cb());
  }

  override _final(cb: (err?: Error | null) => void): void {
    if (!this.guestGone) this.link.send(this.id, T.TCP_EOF);
    cb();
  }

  override _destroy(err: Error | null, cb: (err?: Error | null) => void): void {
    // After a clean close both ways the guest ends the session itself once its queue is written;
    // a CLOSE now could cut off data it has not yet handed to the socket.
    const clean = !err && this.readEnded && this.writableFinished;
    if (!this.guestGone && !clean) this.link.send(this.id, T.CLOSE);
    this.guestGone = true;
    this.link.forget(this.id);
    cb(err);
  }

  onData(data: Buffer): void {
    if (this.destroyed) return;
    if (!this.push(data)) this.link.stall(this);
  }

  onEof(): void {
    this.readEnded = true;
    this.push(null);
    this.link.unstall(this);
  }

  onClosed(): void {
    const clean = this.readEnded && this.writableFinished;
    this.guestGone = true;
    this.link.forget(this.id);
    if (!clean) this.destroy();
  }
}

interface PendingDial {
  resolve(socket: Duplex): void;
  reject(err: Error): void;
  timer: NodeJS.Timeout;
}

/** A connection to one microVM's guest agent. */
export class GuestChannel {
  /** Resolves when the stream has ended, for any reason. */
  readonly closed: Promise<void>;
  private resolveClosed!: () => void;
  private isClosed = false;
  private reason?: Error;
  private nextId = 1;
  private readonly requests = new Map<number, PendingRequest>();
  private readonly execs = new Map<number, ExecSession>();
  private readonly pendingExecs = new Map<number, { session: ExecSession; resolve(p: GuestExecProcess): void; reject(e: Error): void; timer: NodeJS.Timeout }>();
  private readonly dialing = new Map<number, PendingDial>();
  private readonly sockets = new Map<number, GuestSocket>();
  private drainWaiters: (() => void)[] = [];
  /** Session streams whose consumers are behind; the link reads the guest only while empty. */
  private readonly stalled = new Set<Readable>();
  private paused = false;
  private parsing = false;
  private chunks: Buffer[] = [];
  private have = 0;
  private need = 0;
  private release = '';
  private host = '';
  private boot = '';
  private readonly requestTimeoutMs: number;
  private readonly link: ChannelLink;
  /** The sealing key the guest agent drew; null until asked for (after HELLO and QUIESCE). */
  private key: Buffer | null = null;
  private keyRequest: Promise<void> | null = null;
  /** The guest agent predates sealing (it answered KEY with ERR): frames go plain. */
  private unsealed = false;
  private sealCount = 0n;

  private constructor(
    private readonly stream: Duplex,
    opts: GuestChannelOptions,
  ) {
    this.requestTimeoutMs = opts.requestTimeoutMs ?? DEFAULT_TIMEOUT_MS;
    this.closed = new Promise((resolve) => (this.resolveClosed = resolve));
    this.link = {
      send: (channel, type, payload) => this.send(channel, type, payload),
      whenDrained: (cb) => this.whenDrained(cb),
      forget: (channel) => {
        this.execs.delete(channel);
        this.sockets.delete(channel);
      },
      stall: (s) => this.stall(s),
      unstall: (s) => this.unstall(s),
    };
    stream.on('data', (chunk: Buffer) => this.onData(chunk));
    stream.on('drain', () => this.flushDrainWaiters());
    stream.on('error', (err: Error) => this.teardown(err));
    stream.on('end', () => {
      this.teardown(new Error('the guest agent closed the channel'));
      stream.destroy();
    });
    stream.on('close', () => this.teardown(new Error('guest channel closed')));
  }

  /** Performs the HELLO handshake on an already connected stream. */
  static async open(stream: Duplex, opts: GuestChannelOptions = {}): Promise<GuestChannel> {
    const channel = new GuestChannel(stream, opts);
    try {
      await channel.handshake(opts.timeoutMs ?? DEFAULT_TIMEOUT_MS);
    } catch (err) {
      await channel.close();
      throw err;
    }
    return channel;
  }

  /** Connects to a unix socket (waiting for it to appear, as QEMU creates it late), then opens. */
  static async connect(socketPath: string, opts: GuestChannelOptions = {}): Promise<GuestChannel> {
    const timeoutMs = opts.timeoutMs ?? DEFAULT_TIMEOUT_MS;
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      try {
        const socket = await connectUnix(socketPath);
        return await GuestChannel.open(socket, { ...opts, timeoutMs: Math.max(1, deadline - Date.now()) });
      } catch (err) {
        const code = (err as NodeJS.ErrnoException).code;
        if ((code !== 'ENOENT' && code !== 'ECONNREFUSED') || Date.now() >= deadline) throw err;
        await new Promise((r) => setTimeout(r, CONNECT_RETRY_MS));
      }
    }
  }

  /** The guest kernel's release (uname -r), from the last HELLO. */
  get kernelRelease(): string {
    return this.release;
  }

  /** The guest's hostname, from the last HELLO. */
  get hostname(): string {
    return this.host;
  }

  /** The guest kernel's boot id; it changes when the VM boots afresh (not on snapshot restore). */
  get bootId(): string {
    return this.boot;
  }

  /** Why the channel closed (a GuestChannelError when the guest broke the protocol); unset while open. */
  get closeReason(): Error | undefined {
    return this.reason;
  }

  /**
   * Bytes received from the guest that this side holds: unparsed input, output of open sessions
   * that their consumers have not read, and GET_FILE data not yet handed over.
   */
  get bufferedBytes(): number {
    let n = this.have + this.stream.readableLength;
    for (const e of this.execs.values()) n += e.stdout.readableLength + e.stderr.readableLength;
    for (const s of this.sockets.values()) n += s.readableLength;
    for (const r of this.requests.values()) n += r.bytes;
    return n;
  }

  /** Whether frames that carry secrets are sealed (false only with a guest agent that predates it). */
  get sealing(): boolean {
    return !this.unsealed;
  }

  /** Re-handshakes on the same stream: the guest forgets every session, and so does this side. */
  async hello(): Promise<void> {
    await this.handshake(this.requestTimeoutMs);
  }

  private async handshake(timeoutMs: number): Promise<void> {
    this.resetSessions(new Error('guest channel reset by HELLO'));
    const ns = Buffer.alloc(8);
    ns.writeBigUInt64LE(BigInt(Date.now()) * 1_000_000n);
    // HELLO makes the guest forget its key: the first sealed frame asks for a new one.
    this.key = null;
    this.unsealed = false;
    const reply = await this.request(T.HELLO, ns, { timeoutMs });
    // Three NUL-terminated strings split into four parts, the last one empty.
    const parts = reply.toString('utf8').split('\0');
    if (parts.length !== 4 || parts[3] !== '') {
      const err = new GuestChannelError(
        'MALFORMED_FRAME',
        'guest sent a malformed OK frame in reply to HELLO: it must hold the kernel release, hostname and boot id as three NUL-terminated strings',
      );
      this.fail(err);
      throw err;
    }
    [this.release, this.host, this.boot] = parts as [string, string, string];
  }

  /** Asks the guest agent for a new sealing key (one request at a time). */
  private fetchKey(): Promise<void> {
    this.keyRequest ??= this.request(T.KEY, Buffer.alloc(0))
      .then(
        (key) => {
          if (key.length !== 32) throw new Error(`the guest agent sent a ${key.length}-byte key`);
          this.key = key;
          this.sealCount = 0n;
        },
        (err: Error & { code?: string }) => {
          // An agent that predates KEY refuses it: it cannot open sealed frames either.
          if (err.code !== 'GUEST_ERROR') throw err;
          this.unsealed = true;
        },
      )
      .finally(() => (this.keyRequest = null));
    return this.keyRequest;
  }

  /** Resolves once frames can be sealed (or are to go plain). */
  private async readyToSeal(): Promise<void> {
    if (this.key || this.unsealed) return;
    await this.fetchKey();
  }

  /** The frame to send for `type` and `payload`: SEALED under the guest's key, or plain for an old agent. */
  private seal(type: number, payload: Buffer): { type: number; payload: Buffer } {
    if (this.unsealed) return { type, payload };
    // Callers wait for readyToSeal first; without a key, nothing goes out in the clear.
    if (!this.key) throw new Error('no sealing key from the guest agent');
    const nonce = Buffer.alloc(12);
    nonce.writeBigUInt64LE(this.sealCount++, 0);
    const cipher = createCipheriv('chacha20', this.key, Buffer.concat([Buffer.alloc(4), nonce]));
    return { type: T.SEALED, payload: Buffer.concat([nonce, cipher.update(Buffer.concat([Buffer.from([type]), payload])), cipher.final()]) };
  }

  /** Starts a process in the guest; resolves once it runs, rejects with the guest's error text. */
  async exec(opts: ExecOptions): Promise<GuestExecProcess> {
    if (this.isClosed) throw new Error('guest channel is closed');
    // The environment carries the box's secrets.
    await this.readyToSeal();
    if (this.isClosed) throw new Error('guest channel is closed');
    const env = Object.entries(opts.env ?? {}).map(([k, v]) => `${k}=${v}`);
    let payload: Buffer;
    try {
      const head = Buffer.alloc(9);
      head.writeUInt8(opts.tty ? 1 : 0, 0);
      head.writeUInt16LE((opts.cols ?? 80) & 0xffff, 1);
      head.writeUInt16LE((opts.rows ?? 24) & 0xffff, 3);
      head.writeUInt16LE(opts.argv.length, 5);
      head.writeUInt16LE(env.length, 7);
      payload = Buffer.concat([head, cstr(opts.cwd ?? '/workspace'), ...opts.argv.map(cstr), ...env.map(cstr)]);
    } catch (err) {
      return Promise.reject(err as Error);
    }
    if (opts.argv.length === 0) return Promise.reject(new TypeError('exec needs a program'));
    if (payload.length + SEAL_OVERHEAD > MAX_PAYLOAD) return Promise.reject(new Error('exec command line and environment exceed 1 MiB'));
    const frame = this.seal(T.EXEC, payload);
    const id = this.nextId++;
    const session = new ExecSession(this.link, id, !!opts.tty);
    this.execs.set(id, session);
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.pendingExecs.delete(id);
        this.send(id, T.CLOSE);
        session.finish(255);
        reject(new Error(`exec ${opts.argv[0]}: the guest did not answer within ${this.requestTimeoutMs} ms`));
      }, this.requestTimeoutMs);
      this.pendingExecs.set(id, { session, resolve, reject, timer });
      this.send(id, frame.type, frame.payload);
    });
  }

  /** Opens a TCP connection to 127.0.0.1:port inside the guest. */
  dial(port: number): Promise<Duplex> {
    if (this.isClosed) return Promise.reject(dialError('guest channel is closed', 'DIAL_FAILED'));
    if (!Number.isInteger(port) || port < 1 || port > 65535) return Promise.reject(dialError(`invalid port ${port}`, 'DIAL_FAILED'));
    const id = this.nextId++;
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.dialing.delete(id);
        this.send(id, T.CLOSE);
        reject(dialError(`dial ${port}: the guest did not answer within ${this.requestTimeoutMs} ms`, 'DIAL_FAILED'));
      }, this.requestTimeoutMs);
      this.dialing.set(id, { resolve, reject, timer });
      this.send(id, T.TCP_CONNECT, u16(port));
    });
  }

  /** Writes a file (at most about 1 MiB) atomically inside the image root, creating parent dirs. */
  async putFile(path: string, data: Buffer | string, mode = 0o644): Promise<void> {
    await this.request(T.PUT_FILE, Buffer.concat([u32(mode), cstr(path), toBuffer(data)]));
  }

  /** Reads a file inside the image root; one larger than `maxBytes` (64 MiB) fails with FILE_TOO_LARGE. */
  getFile(path: string, opts: GetFileOptions = {}): Promise<Buffer> {
    let payload: Buffer;
    try {
      payload = cstr(path);
    } catch (err) {
      return Promise.reject(err as Error);
    }
    return this.request(T.GET_FILE, payload, { file: { path, maxBytes: opts.maxBytes ?? DEFAULT_MAX_FILE_BYTES } });
  }

  /** Makes dir hold exactly these files (mode 0440, root-owned). */
  async replaceDir(dir: string, files: GuestDirFile[]): Promise<void> {
    const parts = [cstr(dir), u32(files.length)];
    for (const f of files) {
      const data = toBuffer(f.data);
      parts.push(cstr(f.name), u32(data.length), data);
    }
    await this.readyToSeal();
    const frame = this.seal(T.REPLACE_DIR, Buffer.concat(parts));
    await this.request(frame.type, frame.payload);
  }

  /** Reads the guest's health figures (uptime, load1, mem_total_kb, mem_available_kb, procs, idle_ms). */
  async health(): Promise<Record<string, number>> {
    const text = (await this.request(T.HEALTH, Buffer.alloc(0))).toString('utf8');
    const out: Record<string, number> = {};
    for (const line of text.split('\n')) {
      const eq = line.indexOf('=');
      if (eq > 0) out[line.slice(0, eq)] = Number(line.slice(eq + 1));
    }
    return out;
  }

  /** Sets the guest's hostname and machine id (and the image's /etc files that carry them). */
  async setIdentity(hostname: string, machineId: string): Promise<void> {
    await this.request(T.SET_IDENTITY, Buffer.concat([cstr(hostname), cstr(machineId)]));
  }

  /**
   * Removes every file of the secrets dir and syncs the disks, before a snapshot; the guest forgets
   * the sealing key, so sealed frames left in its memory cannot be opened from the snapshot. The
   * next sealed frame asks for a new key.
   */
  async quiesce(secretsDir: string): Promise<void> {
    this.key = null;
    await this.request(T.QUIESCE, cstr(secretsDir));
  }

  /** Configures the guest's interface: MAC (optional), address and default route. */
  async netConfig(iface: string, cidr: string, gateway: string, mac?: string): Promise<void> {
    await this.request(T.NET_CONFIG, Buffer.concat([cstr(iface), cstr(cidr), cstr(gateway), ...(mac ? [cstr(mac)] : [])]));
  }

  /** Closes the channel: sessions end (exit 255), dials are destroyed with an error. */
  close(): Promise<void> {
    this.teardown(new Error('guest channel closed'));
    this.stream.destroy();
    return this.closed;
  }

  private request(type: number, payload: Buffer, opts: { timeoutMs?: number; file?: PendingRequest['file'] } = {}): Promise<Buffer> {
    if (this.isClosed) return Promise.reject(new Error('guest channel is closed'));
    if (payload.length > MAX_PAYLOAD) return Promise.reject(new Error(`request of ${payload.length} bytes exceeds the 1 MiB frame limit`));
    const timeoutMs = opts.timeoutMs ?? this.requestTimeoutMs;
    const id = this.nextId++;
    return new Promise((resolve, reject) => {
      const req: PendingRequest = {
        name: HOST_NAMES.get(type) ?? hex(type),
        resolve,
        reject,
        chunks: [],
        bytes: 0,
        file: opts.file,
        // Re-armed on every FILE_DATA: a large download is slow, not stuck.
        rearm: () => {
          clearTimeout(req.timer);
          req.timer = setTimeout(() => {
            this.requests.delete(id);
            // A file still streaming would otherwise go on arriving for nobody.
            if (req.file) this.send(id, T.CLOSE);
            reject(new Error(`guest request ${req.name} timed out after ${timeoutMs} ms`));
          }, timeoutMs);
        },
      };
      req.rearm();
      this.requests.set(id, req);
      this.send(id, type, payload);
    });
  }

  private send(channel: number, type: number, payload?: Buffer): boolean {
    if (this.isClosed) return false;
    const header = Buffer.alloc(HEADER_LEN);
    header.writeUInt32LE(payload?.length ?? 0, 0);
    header.writeUInt32LE(channel, 4);
    header.writeUInt8(type, 8);
    return this.stream.write(payload?.length ? Buffer.concat([header, payload]) : header);
  }

  private whenDrained(cb: () => void): void {
    if (this.isClosed || !this.stream.writableNeedDrain) cb();
    else this.drainWaiters.push(cb);
  }

  private flushDrainWaiters(): void {
    const waiters = this.drainWaiters;
    this.drainWaiters = [];
    for (const cb of waiters) cb();
  }

  private stall(s: Readable): void {
    if (this.isClosed) return;
    this.stalled.add(s);
    if (!this.paused) {
      this.paused = true;
      this.stream.pause();
    }
  }

  private unstall(s: Readable): void {
    if (!this.stalled.delete(s) || this.stalled.size > 0 || !this.paused) return;
    this.paused = false;
    this.stream.resume();
    // Frames already received wait in `chunks`; the stream only delivers new ones.
    this.parse();
  }

  private onData(chunk: Buffer): void {
    this.chunks.push(chunk);
    this.have += chunk.length;
    this.parse();
  }

  /** Parses frames incrementally; chunks are only concatenated once a whole frame is there. */
  private parse(): void {
    // Handling a frame can release a stall, which calls back here: the running loop goes on instead.
    if (this.parsing) return;
    this.parsing = true;
    try {
      while (!this.isClosed && !this.paused) {
        if (this.need === 0) {
          if (this.have < HEADER_LEN) return;
          if (this.chunks[0]!.length < HEADER_LEN) this.chunks = [Buffer.concat(this.chunks)];
          const head = this.chunks[0]!;
          const len = head.readUInt32LE(0);
          const problem = headerProblem(head.readUInt8(8), len);
          if (problem) return this.malformed(head.readUInt8(8), head.readUInt32LE(4), problem);
          this.need = HEADER_LEN + len;
        }
        if (this.have < this.need) return;
        const all = this.chunks.length === 1 ? this.chunks[0]! : Buffer.concat(this.chunks);
        const frame = all.subarray(0, this.need);
        const rest = all.subarray(this.need);
        this.chunks = rest.length ? [rest] : [];
        this.have = rest.length;
        this.need = 0;
        this.dispatch(frame.readUInt32LE(4), frame.readUInt8(8), frame.subarray(HEADER_LEN));
      }
    } finally {
      this.parsing = false;
    }
  }

  private dispatch(channel: number, type: number, payload: Buffer): void {
    try {
      const problem = payloadProblem(type, payload);
      if (problem) return this.malformed(type, channel, problem);
      this.onFrame(channel, type, payload);
    } catch (err) {
      // Whatever a frame leads to must not throw out of the stream's data handler: that would end
      // the node agent, and every box's channel with it.
      this.fail(
        new GuestChannelError('FRAME_HANDLER_FAILED', `handling a ${GUEST_NAMES.get(type)} frame on channel ${channel} failed: ${(err as Error).message}`, { cause: err }),
      );
    }
  }

  private onFrame(channel: number, type: number, payload: Buffer): void {
    const req = this.requests.get(channel);
    if (req) return this.onReply(channel, req, type, payload);
    const starting = this.pendingExecs.get(channel);
    if (starting) {
      if (type !== G.STARTED && type !== G.ERR) return this.unexpected(type, channel, 'not allowed on an exec session that has not started');
      clearTimeout(starting.timer);
      this.pendingExecs.delete(channel);
      if (type === G.STARTED) return starting.resolve(starting.session.process(payload.readInt32LE(0)));
      starting.session.finish(255);
      return starting.reject(new Error(guestText(payload)));
    }
    const exec = this.execs.get(channel);
    if (exec) {
      if (type === G.STDOUT) exec.stdout.deliver(payload);
      else if (type === G.STDERR) exec.stderr.deliver(payload);
      else if (type === G.EXIT) exec.finish(payload.readInt32LE(0));
      // ERR on a started session: the guest gave it up.
      else if (type === G.ERR) exec.finish(255);
      else this.unexpected(type, channel, 'not allowed on a started exec session');
      return;
    }
    const dialing = this.dialing.get(channel);
    if (dialing) {
      if (type !== G.CONNECTED && type !== G.CONNECT_FAILED && type !== G.ERR) return this.unexpected(type, channel, 'not allowed on a dial in progress');
      clearTimeout(dialing.timer);
      this.dialing.delete(channel);
      if (type === G.CONNECTED) {
        const socket = new GuestSocket(this.link, channel);
        this.sockets.set(channel, socket);
        return dialing.resolve(socket);
      }
      if (type === G.CONNECT_FAILED) {
        const errno = payload.readInt32LE(0);
        return dialing.reject(
          errno === ECONNREFUSED
            ? dialError('connection refused: nothing listens on that port in the guest', 'PORT_REFUSED')
            : dialError(`connecting in the guest failed (errno ${errno})`, 'DIAL_FAILED'),
        );
      }
      return dialing.reject(dialError(guestText(payload), 'DIAL_FAILED'));
    }
    const socket = this.sockets.get(channel);
    if (socket) {
      if ((type === G.TCP_DATA || type === G.TCP_EOF) && socket.readEnded) return this.unexpected(type, channel, `${GUEST_NAMES.get(type)} after TCP_EOF`);
      if (type === G.TCP_DATA) socket.onData(payload);
      else if (type === G.TCP_EOF) socket.onEof();
      else if (type === G.CLOSED || type === G.ERR) socket.onClosed();
      else this.unexpected(type, channel, 'not allowed on a TCP connection');
    }
    // Anything else belongs to a session this side already forgot (it timed out, was closed, or
    // a HELLO reset it): the guest may still have had frames for it on the way.
  }

  private onReply(channel: number, req: PendingRequest, type: number, payload: Buffer): void {
    if (type === G.FILE_DATA && req.file) {
      req.bytes += payload.length;
      if (req.bytes > req.file.maxBytes) {
        // The file's size is the guest's content, not a protocol error: only this request fails,
        // and the guest is told to stop reading the file.
        clearTimeout(req.timer);
        this.requests.delete(channel);
        this.send(channel, T.CLOSE);
        return req.reject(new GuestChannelError('FILE_TOO_LARGE', `${req.file.path}: the file is larger than the limit of ${req.file.maxBytes} bytes`));
      }
      req.chunks.push(payload);
      req.rearm();
      return;
    }
    if (type !== G.OK && type !== G.ERR) return this.unexpected(type, channel, `not allowed in reply to ${req.name}`);
    clearTimeout(req.timer);
    this.requests.delete(channel);
    // GUEST_ERROR: the guest refused the request (an agent that predates KEY refuses KEY).
    if (type === G.ERR) return req.reject(Object.assign(new Error(guestText(payload)), { code: 'GUEST_ERROR' }));
    if (req.file && req.bytes + payload.length > req.file.maxBytes) {
      this.send(channel, T.CLOSE);
      return req.reject(new GuestChannelError('FILE_TOO_LARGE', `${req.file.path}: the file is larger than the limit of ${req.file.maxBytes} bytes`));
    }
    req.resolve(req.chunks.length ? Buffer.concat([...req.chunks, payload]) : Buffer.from(payload));
  }

  private malformed(type: number, channel: number, why: string): void {
    const name = GUEST_NAMES.get(type);
    this.fail(new GuestChannelError('MALFORMED_FRAME', name ? `guest sent a malformed ${name} frame on channel ${channel}: ${why}` : `guest sent a malformed frame on channel ${channel}: ${why}`));
  }

  private unexpected(type: number, channel: number, why: string): void {
    this.fail(new GuestChannelError('UNEXPECTED_FRAME', `guest sent an unexpected ${GUEST_NAMES.get(type)} frame on channel ${channel}: ${why}`));
  }

  /** Closes this channel because of what the guest sent; other channels are not affected. */
  private fail(err: GuestChannelError): void {
    this.teardown(err);
    this.stream.destroy();
  }

  /** Ends every session on this side (channel loss, close or a new HELLO). */
  private resetSessions(reason: Error): void {
    for (const [id, p] of this.pendingExecs) {
      clearTimeout(p.timer);
      this.pendingExecs.delete(id);
      p.reject(reason);
    }
    for (const exec of [...this.execs.values()]) exec.finish(255);
    for (const [id, d] of this.dialing) {
      clearTimeout(d.timer);
      this.dialing.delete(id);
      d.reject(dialError(reason.message, 'DIAL_FAILED'));
    }
    for (const socket of [...this.sockets.values()]) {
      socket.guestGone = true;
      socket.destroy(reason);
    }
  }

  private teardown(reason: Error): void {
    if (this.isClosed) return;
    this.reason = reason;
    this.resetSessions(reason);
    this.isClosed = true;
    this.stalled.clear();
    this.chunks = [];
    this.have = 0;
    for (const [id, req] of this.requests) {
      clearTimeout(req.timer);
      this.requests.delete(id);
      req.reject(reason);
    }
    this.flushDrainWaiters();
    this.resolveClosed();
  }
}

function connectUnix(path: string): Promise<Socket> {
  return new Promise((resolve, reject) => {
    const socket = netConnect(path);
    socket.once('error', reject);
    socket.once('connect', () => {
      socket.off('error', reject);
      resolve(socket);
    });
  });
}
