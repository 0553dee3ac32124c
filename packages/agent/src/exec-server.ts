/**
 * The agent's session endpoint: a WebSocket per command session, authorized by a short-lived token
 * the server signed with this node's key. Verification is offline, so sessions keep working while
 * the control plane is down.
 */
import { createServer, type IncomingMessage, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import { WebSocketServer, type WebSocket } from 'ws';
import { CHANNEL, ExecClientMessageSchema, frame, type ExecServerMessage } from '@devyard/api/exec-protocol';
import { verifySessionToken } from '@devyard/api/session-tokens';
import type { ExecProcess, RuntimeDriver } from './runtime/runtime-driver.js';

export interface ExecServerOptions {
  host: string;
  port: number;
  driver: RuntimeDriver;
  /** Current session key (null until the node registered once). */
  sessionKey: () => string | null;
  /** Prometheus text for GET /metrics. */
  metrics?: () => Promise<{ contentType: string; body: string }>;
  log: (msg: string, fields?: Record<string, unknown>) => void;
}

function tokenOf(req: IncomingMessage, url: URL): string | null {
  const h = req.headers.authorization;
  const m = h ? /^Bearer\s+(\S+)$/i.exec(h) : null;
  return m?.[1] ?? url.searchParams.get('token');
}

export class ExecServer {
  private server: Server | undefined;
  private readonly wss = new WebSocketServer({ noServer: true });

  constructor(private readonly opts: ExecServerOptions) {}

  async listen(): Promise<string> {
    const server = createServer((req, res) => {
      if (req.url === '/healthz') {
        res.writeHead(200, { 'content-type': 'application/json' }).end('{"status":"ok"}');
        return;
      }
      if (req.url === '/metrics' && this.opts.metrics) {
        void this.opts.metrics().then(({ contentType, body }) => res.writeHead(200, { 'content-type': contentType }).end(body));
        return;
      }
      res.writeHead(404, { 'content-type': 'application/problem+json' }).end(JSON.stringify({ status: 404, code: 'not-found', detail: 'no such route' }));
    });
    server.on('upgrade', (req, socket, head) => {
      const url = new URL(req.url ?? '/', 'http://agent');
      const m = /^\/v1\/boxes\/([a-z0-9_]+)\/exec$/.exec(url.pathname);
      const key = this.opts.sessionKey();
      const claims = key ? verifySessionToken(tokenOf(req, url) ?? '', key, Date.now()) : null;
      if (!m || !claims || claims.boxId !== m[1]) {
        socket.end('HTTP/1.1 401 Unauthorized\r\ncontent-type: text/plain\r\n\r\ninvalid or expired session token\n');
        return;
      }
      this.wss.handleUpgrade(req, socket, head, (ws) => void this.session(ws, m[1]!, claims.sub));
    });
    this.server = server;
    await new Promise<void>((resolve) => server.listen(this.opts.port, this.opts.host, resolve));
    return `http://${this.opts.host}:${(server.address() as AddressInfo).port}`;
  }

  async close(): Promise<void> {
    for (const c of this.wss.clients) c.terminate();
    await new Promise<void>((resolve) => (this.server ? this.server.close(() => resolve()) : resolve()));
  }

  private async session(ws: WebSocket, boxId: string, sub: string): Promise<void> {
    const send = (m: ExecServerMessage) => ws.readyState === ws.OPEN && ws.send(JSON.stringify(m));
    let proc: ExecProcess | undefined;
    const pending: Buffer[] = [];
    let eof = false;
    ws.on('message', async (data: Buffer, isBinary: boolean) => {
      if (isBinary) {
        if (data[0] !== CHANNEL.stdin) return;
        if (proc) proc.stdin.write(data.subarray(1));
        else pending.push(Buffer.from(data.subarray(1)));
        return;
      }
      const parsed = ExecClientMessageSchema.safeParse(JSON.parse(data.toString()));
      if (!parsed.success) {
        send({ type: 'error', message: `bad message: ${parsed.error.issues[0]?.message}` });
        ws.close();
        return;
      }
      const msg = parsed.data;
      if (msg.type === 'start') {
        if (proc) return;
        try {
          proc = await this.opts.driver.exec(boxId, { argv: msg.argv, tty: msg.tty, cols: msg.cols, rows: msg.rows, env: msg.env, cwd: msg.cwd });
        } catch (e) {
          send({ type: 'error', message: (e as Error).message });
          ws.close();
          return;
        }
        this.opts.log('exec session', { boxId, sub, argv0: msg.argv[0], tty: msg.tty });
        for (const b of pending.splice(0)) proc.stdin.write(b);
        if (eof) proc.stdin.end();
        proc.stdout.on('data', (d: Buffer) => ws.readyState === ws.OPEN && ws.send(frame(CHANNEL.stdout, d)));
        proc.stderr.on('data', (d: Buffer) => ws.readyState === ws.OPEN && ws.send(frame(CHANNEL.stderr, d)));
        const code = await proc.exited;
        // The exit can be seen before the last output is read: wait for both streams to end (bounded,
        // since a process's orphaned children may hold them open).
        const ended = (s: NodeJS.ReadableStream & { readableEnded?: boolean }) =>
          new Promise<void>((r) => (s.readableEnded ? r() : (s.once('end', () => r()), s.once('close', () => r()))));
        await Promise.race([Promise.all([ended(proc.stdout), ended(proc.stderr)]), new Promise((r) => setTimeout(r, 1000))]);
        send({ type: 'exit', code });
        ws.close();
      } else if (msg.type === 'resize') proc?.resize(msg.cols, msg.rows);
      else if (msg.type === 'signal') proc?.kill(msg.signal);
      else if (msg.type === 'eof') {
        eof = true;
        proc?.stdin.end();
      }
    });
    ws.on('close', () => proc?.kill('SIGHUP'));
  }
}
