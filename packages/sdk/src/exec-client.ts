/**
 * Client side of a command session: connects to the node agent with a signed session token and
 * pumps stdin/stdout/stderr, terminal resizes and the exit code over one WebSocket.
 */
import type { Readable, Writable } from 'node:stream';
import WebSocket from 'ws';
import { CHANNEL, frame, type ExecServerMessage } from '@devyard/api/exec-protocol';
import type { ExecSession } from '@devyard/api/box-schemas';

export interface ExecClientOptions {
  argv: string[];
  tty?: boolean;
  cols?: number;
  rows?: number;
  env?: Record<string, string>;
  cwd?: string;
  stdin?: Readable | null;
  stdout: Writable;
  stderr: Writable;
  /** Called on every chunk in either direction (activity tracking). */
  onActivity?: () => void;
}

const STDIN_HIGH_WATER = 4 * 1024 * 1024;

export interface ExecHandle {
  /** Resolves with the remote exit code. */
  exited: Promise<number>;
  resize(cols: number, rows: number): void;
  close(): void;
}

export function execInBox(session: ExecSession, opts: ExecClientOptions): ExecHandle {
  const ws = new WebSocket(session.url, { headers: { authorization: `Bearer ${session.token}` } });
  let settled = false;
  const exited = new Promise<number>((resolve, reject) => {
    ws.on('open', () => {
      ws.send(JSON.stringify({ type: 'start', argv: opts.argv, tty: opts.tty ?? false, cols: opts.cols ?? 80, rows: opts.rows ?? 24, env: opts.env ?? {}, cwd: opts.cwd }));
      if (opts.stdin) {
        const stdin = opts.stdin;
        stdin.on('data', (d: Buffer) => {
          opts.onActivity?.();
          if (ws.readyState !== ws.OPEN) return;
          ws.send(frame(CHANNEL.stdin, d));
          // Backpressure: stop reading input while the socket has much unsent.
          if (ws.bufferedAmount > STDIN_HIGH_WATER) {
            stdin.pause();
            const poll = () => (ws.bufferedAmount > STDIN_HIGH_WATER && ws.readyState === ws.OPEN ? setTimeout(poll, 2) : stdin.resume());
            setTimeout(poll, 2);
          }
        });
        opts.stdin.on('end', () => ws.readyState === ws.OPEN && ws.send(JSON.stringify({ type: 'eof' })));
      } else {
        ws.send(JSON.stringify({ type: 'eof' }));
      }
    });
    ws.on('message', (data: Buffer, isBinary: boolean) => {
      if (isBinary) {
        opts.onActivity?.();
        const out = data[0] === CHANNEL.stderr ? opts.stderr : opts.stdout;
        // Backpressure: stop reading the socket until a slow consumer drains.
        if (!out.write(data.subarray(1))) {
          ws.pause();
          out.once('drain', () => ws.resume());
        }
        return;
      }
      const msg = JSON.parse(data.toString()) as ExecServerMessage;
      if (msg.type === 'exit') {
        settled = true;
        resolve(msg.code);
        ws.close();
      } else if (msg.type === 'error') {
        settled = true;
        reject(new Error(msg.message));
        ws.close();
      }
    });
    ws.on('unexpected-response', (_req, res) => {
      settled = true;
      reject(new Error(`node agent refused the session (HTTP ${res.statusCode})`));
    });
    ws.on('error', (e) => {
      if (!settled) reject(new Error(`cannot reach the node agent at ${session.url}: ${e.message}`));
      settled = true;
    });
    ws.on('close', () => {
      if (!settled) reject(new Error('the session closed before the command finished'));
    });
  });
  return {
    exited,
    resize: (cols, rows) => ws.readyState === ws.OPEN && ws.send(JSON.stringify({ type: 'resize', cols, rows })),
    close: () => ws.close(),
  };
}
