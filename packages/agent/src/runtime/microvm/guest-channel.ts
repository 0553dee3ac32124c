/**
 * The host side of the guest-agent protocol (guest/PROTOCOL.md): one byte stream to a microVM's
 * guest agent (the QEMU virtio-serial chardev socket), multiplexing exec sessions, TCP
 * connections into the VM and file requests as frames on host-chosen channel ids.
 *
 * Frames that carry the box's secrets (EXEC: its environment; REPLACE_DIR: the secret files) go
 * SEALED under a key the guest agent draws: the guest's virtio receive buffers keep every frame's
 * bytes long after it was read, and a RAM snapshot must not hold secrets once the guest forgot
 * the key on QUIESCE (PROTOCOL.md, "Secrets and RAM snapshots").
 */
import { createCipheriv } from 'node:crypto';
import { connect as netConnect, type Socket } from 'node:net';
import { constants } from 'node:os';
import { Duplex, PassThrough, Writable } from 'node:stream';
import type { ExecOptions, ExecProcess } from '../runtime-driver.js';

const HEADER_LEN = 9;
const MAX_PAYLOAD = 1 << 20;
const CHUNK = 64 << 10;
const DEFAULT_TIMEOUT_MS = 10_000;
const CONNECT_RETRY_MS = 20;
const ECONNREFUSED = 111;
/** A SEALED frame's own bytes: the nonce and the inner frame's type. */
const SEAL_OVERHEAD = 13;

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

/** Options for {@link GuestChannel.open} and {@link GuestChannel.connect}. */
export interface GuestChannelOptions {
  /** How long connecting and the HELLO handshake may take, in ms (default 10 s). */
  timeoutMs?: number;
  /** How long each later request may wait for its reply, in ms (default 10 s). */
  requestTimeoutMs?: number;
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
}

interface PendingRequest {
  resolve(data: Buffer): void;
  reject(err: Error): void;
  chunks: Buffer[];
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

/** Sends data as frames of at most CHUNK bytes; cb runs once the stream can take more. */
function sendChunked(link: ChannelLink, channel: number, type: number, data: Buffer, cb: () => void): void {
  for (let off = 0; off < data.length; off += CHUNK) link.send(channel, type, data.subarray(off, off + CHUNK));
  link.whenDrained(cb);
}

function dialError(message: string, code: 'PORT_REFUSED' | 'DIAL_FAILED'): Error {
  return Object.assign(new Error(message), { code });
}

/** One exec session: its streams live on after the session ends, so consumers read everything. */
class ExecSession {
  readonly stdout = new PassThrough();
  readonly stderr = new PassThrough();
  readonly stdin: Writable;
  readonly exited: Promise<number>;
  done = false;
  private resolveExit!: (code: number) => void;

  constructor(
    private readonly link: ChannelLink,
    private readonly id: number,
    private readonly tty: boolean,
  ) {
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
    this.stdout.end();
    this.stderr.end();
    this.resolveExit(code);
  }
}

/** A TCP connection inside the VM, as a half-closable Duplex. */
class GuestSocket extends Duplex {
  /** The guest no longer knows the session: sending CLOSE would be pointless. */
  guestGone = false;
  private readEnded = false;

  constructor(
    private readonly link: ChannelLink,
    private readonly id: number,
  ) {
    super({ allowHalfOpen: true });
  }

  // The protocol has no flow control: data is pushed as the guest sends it.
  override _read(): void {}

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
    this.push(data);
  }

  onEof(): void {
    this.readEnded = true;
    this.push(null);
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
  private nextId = 1;
  private readonly requests = new Map<number, PendingRequest>();
  private readonly execs = new Map<number, ExecSession>();
  private readonly pendingExecs = new Map<number, { session: ExecSession; resolve(p: GuestExecProcess): void; reject(e: Error): void; timer: NodeJS.Timeout }>();
  private readonly dialing = new Map<number, PendingDial>();
  private readonly sockets = new Map<number, GuestSocket>();
  private drainWaiters: (() => void)[] = [];
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
    const reply = await this.request(T.HELLO, ns, timeoutMs);
    const [release = '', host = '', boot = ''] = reply.toString('utf8').split('\0');
    this.release = release;
    this.host = host;
    this.boot = boot;
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

  /** Reads a file inside the image root. */
  getFile(path: string): Promise<Buffer> {
    return this.request(T.GET_FILE, cstr(path));
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

  private request(type: number, payload: Buffer, timeoutMs = this.requestTimeoutMs): Promise<Buffer> {
    if (this.isClosed) return Promise.reject(new Error('guest channel is closed'));
    if (payload.length > MAX_PAYLOAD) return Promise.reject(new Error(`request of ${payload.length} bytes exceeds the 1 MiB frame limit`));
    const id = this.nextId++;
    return new Promise((resolve, reject) => {
      const req: PendingRequest = {
        resolve,
        reject,
        chunks: [],
        // Re-armed on every FILE_DATA: a large download is slow, not stuck.
        rearm: () => {
          clearTimeout(req.timer);
          req.timer = setTimeout(() => {
            this.requests.delete(id);
            reject(new Error(`guest request 0x${type.toString(16)} timed out after ${timeoutMs} ms`));
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

  /** Parses frames incrementally; chunks are only concatenated once a whole frame is there. */
  private onData(chunk: Buffer): void {
    this.chunks.push(chunk);
    this.have += chunk.length;
    while (!this.isClosed) {
      if (this.need === 0) {
        if (this.have < HEADER_LEN) return;
        if (this.chunks[0]!.length < HEADER_LEN) this.chunks = [Buffer.concat(this.chunks)];
        const len = this.chunks[0]!.readUInt32LE(0);
        if (len > MAX_PAYLOAD) {
          this.teardown(new Error(`guest sent a frame of ${len} bytes: protocol error`));
          this.stream.destroy();
          return;
        }
        this.need = HEADER_LEN + len;
      }
      if (this.have < this.need) return;
      const all = this.chunks.length === 1 ? this.chunks[0]! : Buffer.concat(this.chunks);
      const frame = all.subarray(0, this.need);
      const rest = all.subarray(this.need);
      this.chunks = rest.length ? [rest] : [];
      this.have = rest.length;
      this.need = 0;
      this.onFrame(frame.readUInt32LE(4), frame.readUInt8(8), frame.subarray(HEADER_LEN));
    }
  }

  private onFrame(channel: number, type: number, payload: Buffer): void {
    const req = this.requests.get(channel);
    if (req) return this.onReply(channel, req, type, payload);
    const starting = this.pendingExecs.get(channel);
    if (starting && (type === G.STARTED || type === G.ERR)) {
      clearTimeout(starting.timer);
      this.pendingExecs.delete(channel);
      if (type === G.STARTED) return starting.resolve(starting.session.process(payload.readInt32LE(0)));
      starting.session.finish(255);
      return starting.reject(new Error(payload.toString('utf8')));
    }
    const exec = this.execs.get(channel);
    if (exec) {
      if (type === G.STDOUT) exec.stdout.write(payload);
      else if (type === G.STDERR) exec.stderr.write(payload);
      else if (type === G.EXIT) exec.finish(payload.readInt32LE(0));
      // ERR on a started session: the guest gave it up.
      else if (type === G.ERR) exec.finish(255);
      return;
    }
    const dialing = this.dialing.get(channel);
    if (dialing) {
      clearTimeout(dialing.timer);
      this.dialing.delete(channel);
      if (type === G.CONNECTED) {
        const socket = new GuestSocket(this.link, channel);
        this.sockets.set(channel, socket);
        return dialing.resolve(socket);
      }
      if (type === G.CONNECT_FAILED) {
        const errno = payload.length >= 4 ? payload.readInt32LE(0) : 0;
        return dialing.reject(
          errno === ECONNREFUSED
            ? dialError('connection refused: nothing listens on that port in the guest', 'PORT_REFUSED')
            : dialError(`connecting in the guest failed (errno ${errno})`, 'DIAL_FAILED'),
        );
      }
      return dialing.reject(dialError(payload.toString('utf8'), 'DIAL_FAILED'));
    }
    const socket = this.sockets.get(channel);
    if (socket) {
      if (type === G.TCP_DATA) socket.onData(payload);
      else if (type === G.TCP_EOF) socket.onEof();
      else if (type === G.CLOSED || type === G.ERR) socket.onClosed();
    }
    // Anything else belongs to a session this side already forgot.
  }

  private onReply(channel: number, req: PendingRequest, type: number, payload: Buffer): void {
    if (type === G.FILE_DATA) {
      req.chunks.push(payload);
      req.rearm();
      return;
    }
    clearTimeout(req.timer);
    this.requests.delete(channel);
    if (type === G.OK) req.resolve(req.chunks.length ? Buffer.concat([...req.chunks, payload]) : Buffer.from(payload));
    else if (type === G.ERR) req.reject(Object.assign(new Error(payload.toString('utf8')), { code: 'GUEST_ERROR' }));
    else req.reject(new Error(`unexpected reply type 0x${type.toString(16)}`));
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
    this.resetSessions(reason);
    this.isClosed = true;
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
