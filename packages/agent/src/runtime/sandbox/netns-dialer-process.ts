/**
 * TCP connections to a box's localhost, made from inside the box's network namespace by a small
 * helper process (`nsenter --net=<netns> node`) that connects and hands the connected socket back
 * over its IPC channel (SCM_RIGHTS). After that handshake the agent owns the file descriptor: no
 * process copies the bytes, and the helper is not on the data path at all.
 *
 * One helper per box, started on the first dial and ended when the box stops, after
 * {@link DEFAULT_DIALER_IDLE_MS} without a dial, or when the agent goes away (the helper exits
 * when its IPC channel closes, so it never outlives the agent).
 */
import { spawn, type ChildProcess } from 'node:child_process';
import type { Socket } from 'node:net';

/** A dialer with no dial for this long exits; the next dial starts a new one (~0.1 s). */
export const DEFAULT_DIALER_IDLE_MS = 60_000;
/** A connection that neither connects nor fails by then is given up. */
const CONNECT_TIMEOUT_MS = 10_000;

/**
 * The helper, run with `node -e` so the same text works from the compiled package and from the
 * sources under test. It pauses each socket before it connects: a server that speaks first (an
 * SSH banner) must have its bytes read by the agent, never by the helper.
 */
export const DIALER_SOURCE = `
process.title = 'devyard-netns-dialer';
const net = require('node:net');
process.on('disconnect', () => process.exit(0));
const reply = (m, h) => { try { process.send(m, h, (err) => { if (err && h) h.destroy(); }); } catch { process.exit(0); } };
process.on('message', (m) => {
  if (!m || !Number.isInteger(m.id) || !Number.isInteger(m.port)) return;
  const s = net.connect({ host: '127.0.0.1', port: m.port });
  s.pause();
  const timer = setTimeout(() => s.destroy(Object.assign(new Error('connect timed out'), { code: 'ETIMEDOUT' })), ${CONNECT_TIMEOUT_MS});
  s.once('connect', () => { clearTimeout(timer); s.removeAllListeners('error'); s.on('error', () => {}); reply({ id: m.id, ok: true }, s); });
  s.once('error', (e) => { clearTimeout(timer); s.destroy(); reply({ id: m.id, ok: false, code: e.code || 'EIO', message: e.message }); });
});
`;

/** A dial that did not produce a connection; `code` is the errno name or `DIALER_EXITED`. */
export class DialError extends Error {
  constructor(
    /** errno name (`ECONNREFUSED`, `ETIMEDOUT`, …) or `DIALER_EXITED` when the helper ended first. */
    readonly code: string,
    message: string,
  ) {
    super(message);
  }
}

interface Pending {
  resolve: (s: Socket) => void;
  reject: (e: Error) => void;
  timer: NodeJS.Timeout;
}

type DialerReply = { id: number; ok: true } | { id: number; ok: false; code: string; message: string };

/** Options of {@link NetnsDialer}. */
export interface NetnsDialerOptions {
  /** The network namespace to connect from (`/run/netns/<name>`). */
  netnsPath: string;
  /** Idle time before the helper exits (default {@link DEFAULT_DIALER_IDLE_MS}). */
  idleMs?: number;
  /** Called once when the helper has exited (idle, closed, crashed). */
  onExit?: () => void;
}

/** The agent's end of one helper process. */
export class NetnsDialer {
  private readonly child: ChildProcess;
  private readonly pending = new Map<number, Pending>();
  private nextId = 1;
  private idleTimer: NodeJS.Timeout | undefined;
  private exitedFlag = false;
  /** Resolves when the helper process has exited. */
  readonly exited: Promise<void>;

  constructor(private readonly opts: NetnsDialerOptions) {
    const env = { ...process.env };
    // The helper needs no loader hooks or flags meant for the agent (or a test runner).
    delete env.NODE_OPTIONS;
    this.child = spawn(
      'nsenter',
      [`--net=${opts.netnsPath}`, '--', process.execPath, '--max-old-space-size=32', '-e', DIALER_SOURCE],
      { stdio: ['ignore', 'inherit', 'inherit', 'ipc'], env, serialization: 'json' },
    );
    // Neither the process nor its channel keeps the agent alive.
    this.child.unref();
    this.child.channel?.unref();
    this.exited = new Promise<void>((resolve) => {
      const done = () => {
        if (this.exitedFlag) return;
        this.exitedFlag = true;
        clearTimeout(this.idleTimer);
        for (const [id, p] of this.pending) {
          clearTimeout(p.timer);
          p.reject(new DialError('DIALER_EXITED', 'the box network dialer exited'));
          this.pending.delete(id);
        }
        this.opts.onExit?.();
        resolve();
      };
      this.child.once('exit', done);
      this.child.once('error', done);
    });
    this.child.on('message', (msg: DialerReply, handle?: Socket) => this.onReply(msg, handle));
    this.armIdle();
  }

  /** Host pid of the helper (diagnostics and tests). */
  get pid(): number | undefined {
    return this.child.pid;
  }

  /** Whether the helper is still there to take dials. */
  get alive(): boolean {
    return !this.exitedFlag && this.child.connected;
  }

  /** Connects to 127.0.0.1:port in the namespace; the socket is the agent's own once resolved. */
  dial(port: number): Promise<Socket> {
    if (!this.alive) return Promise.reject(new DialError('DIALER_EXITED', 'the box network dialer exited'));
    clearTimeout(this.idleTimer);
    const id = this.nextId++;
    return new Promise<Socket>((resolve, reject) => {
      const timer = setTimeout(() => {
        this.pending.delete(id);
        this.armIdle();
        reject(new DialError('ETIMEDOUT', `connect to port ${port} timed out`));
      }, CONNECT_TIMEOUT_MS + 2_000);
      this.pending.set(id, { resolve, reject, timer });
      this.child.send({ id, port }, (err) => {
        if (!err) return;
        const p = this.pending.get(id);
        if (!p) return;
        clearTimeout(p.timer);
        this.pending.delete(id);
        this.armIdle();
        reject(new DialError('DIALER_EXITED', `the box network dialer is gone: ${err.message}`));
      });
    });
  }

  /** Ends the helper (pending dials fail); resolves once it has exited, or after `waitMs`. */
  async close(waitMs = 2_000): Promise<void> {
    if (this.exitedFlag) return;
    this.child.kill('SIGKILL');
    await Promise.race([this.exited, new Promise((r) => setTimeout(r, waitMs).unref())]);
  }

  private onReply(msg: DialerReply, handle?: Socket): void {
    const p = this.pending.get(msg?.id);
    if (!p) {
      // A dial given up on meanwhile: nobody wants this connection.
      handle?.destroy();
      return;
    }
    clearTimeout(p.timer);
    this.pending.delete(msg.id);
    this.armIdle();
    if (msg.ok && handle) p.resolve(handle);
    else if (msg.ok) p.reject(new DialError('EIO', 'the dialer sent no connection'));
    else p.reject(new DialError(msg.code, msg.message));
  }

  private armIdle(): void {
    clearTimeout(this.idleTimer);
    if (this.pending.size > 0 || this.exitedFlag) return;
    this.idleTimer = setTimeout(() => void this.close(), this.opts.idleMs ?? DEFAULT_DIALER_IDLE_MS);
    this.idleTimer.unref();
  }
}
