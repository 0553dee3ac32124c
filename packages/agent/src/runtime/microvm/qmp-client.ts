/**
 * A client of QEMU's machine protocol (QMP): JSON lines over the VM's unix socket. Commands carry
 * an id and are answered in order; asynchronous events are kept for callers that wait on one.
 */
import { connect, type Socket } from 'node:net';

/** A QMP command failed; `klass` is QEMU's error class (GenericError, CommandNotFound, …). */
export class QmpError extends Error {
  constructor(
    message: string,
    /** QEMU's error class. */
    readonly klass: string,
  ) {
    super(message);
  }
}

interface Pending {
  resolve: (v: unknown) => void;
  reject: (e: Error) => void;
}

export class QmpClient {
  private buf = '';
  private nextId = 1;
  private readonly pending = new Map<string, Pending>();
  private readonly events: Array<{ event: string; data?: unknown }> = [];
  private readonly eventWaiters: Array<{ name: string; resolve: (d: unknown) => void }> = [];
  private closedError: Error | null = null;

  private constructor(private readonly socket: Socket) {
    socket.setEncoding('utf8');
    socket.on('data', (chunk: string) => this.onData(chunk));
    const fail = (e?: Error) => {
      this.closedError ??= e ?? new Error('QMP connection closed');
      for (const p of this.pending.values()) p.reject(this.closedError);
      this.pending.clear();
    };
    socket.on('error', fail);
    socket.on('close', () => fail());
  }

  /** Connects (retrying while QEMU has not created the socket yet) and negotiates capabilities. */
  static async connect(path: string, timeoutMs = 10_000): Promise<QmpClient> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      try {
        const socket = await new Promise<Socket>((resolve, reject) => {
          const s = connect(path);
          s.once('connect', () => resolve(s));
          s.once('error', reject);
        });
        const client = new QmpClient(socket);
        await client.greeting(deadline - Date.now());
        await client.execute('qmp_capabilities');
        return client;
      } catch (e) {
        const code = (e as NodeJS.ErrnoException).code;
        if ((code !== 'ENOENT' && code !== 'ECONNREFUSED') || Date.now() > deadline) throw e;
        await new Promise((r) => setTimeout(r, 10));
      }
    }
  }

  private greetingWaiter: ((ok: boolean) => void) | null = null;
  private greeted = false;

  private greeting(timeoutMs: number): Promise<void> {
    if (this.greeted) return Promise.resolve();
    return new Promise((resolve, reject) => {
      const t = setTimeout(() => reject(new Error('no QMP greeting from QEMU')), Math.max(timeoutMs, 100));
      this.greetingWaiter = (ok) => {
        clearTimeout(t);
        if (ok) resolve();
        else reject(new Error('QMP connection closed before the greeting'));
      };
      this.socket.once('close', () => this.greetingWaiter?.(false));
    });
  }

  private onData(chunk: string): void {
    this.buf += chunk;
    let nl: number;
    while ((nl = this.buf.indexOf('\n')) >= 0) {
      const line = this.buf.slice(0, nl).trim();
      this.buf = this.buf.slice(nl + 1);
      if (!line) continue;
      let msg: Record<string, unknown>;
      try {
        msg = JSON.parse(line) as Record<string, unknown>;
      } catch {
        continue;
      }
      if ('QMP' in msg) {
        this.greeted = true;
        this.greetingWaiter?.(true);
        this.greetingWaiter = null;
      } else if ('event' in msg) {
        const ev = { event: String(msg.event), data: msg.data };
        const w = this.eventWaiters.findIndex((x) => x.name === ev.event);
        if (w >= 0) this.eventWaiters.splice(w, 1)[0]!.resolve(ev.data);
        else this.events.push(ev);
      } else if ('id' in msg) {
        const p = this.pending.get(String(msg.id));
        if (!p) continue;
        this.pending.delete(String(msg.id));
        if ('error' in msg) {
          const err = msg.error as { class?: string; desc?: string };
          p.reject(new QmpError(err.desc ?? 'QMP error', err.class ?? 'GenericError'));
        } else p.resolve(msg.return);
      }
    }
  }

  /** Runs one command and resolves with its `return` value. */
  execute<T = unknown>(command: string, args?: Record<string, unknown>): Promise<T> {
    if (this.closedError) return Promise.reject(this.closedError);
    const id = String(this.nextId++);
    return new Promise<T>((resolve, reject) => {
      this.pending.set(id, { resolve: resolve as (v: unknown) => void, reject });
      this.socket.write(`${JSON.stringify({ execute: command, ...(args ? { arguments: args } : {}), id })}\n`);
    });
  }

  /** Resolves with the data of the next (or an already received) event of that name. */
  waitEvent(name: string, timeoutMs: number): Promise<unknown> {
    const i = this.events.findIndex((e) => e.event === name);
    if (i >= 0) return Promise.resolve(this.events.splice(i, 1)[0]!.data);
    return new Promise((resolve, reject) => {
      const entry = { name, resolve: (d: unknown) => (clearTimeout(t), resolve(d)) };
      const t = setTimeout(() => {
        this.eventWaiters.splice(this.eventWaiters.indexOf(entry), 1);
        reject(new Error(`QMP event ${name} did not arrive within ${timeoutMs} ms`));
      }, timeoutMs);
      this.eventWaiters.push(entry);
    });
  }

  /** Closes the connection (QEMU keeps running). */
  close(): void {
    this.socket.destroy();
  }
}
