/**
 * The agent's session endpoint: a WebSocket per command session (`/v1/boxes/<id>/exec`) or per TCP
 * connection to a port inside a box (`/v1/boxes/<id>/tcp?port=N`, the tunnel protocol), authorized
 * by a short-lived token the server signed with this node's key. Verification is offline, so
 * sessions keep working while the control plane is down.
 */
import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import type { AddressInfo } from 'node:net';
import type { Duplex } from 'node:stream';
import { WebSocketServer, type WebSocket } from 'ws';
import { CHANNEL, ExecClientMessageSchema, frame, type ExecServerMessage } from '@devyard/api/exec-protocol';
import { verifySessionToken } from '@devyard/api/session-tokens';
import { TUNNEL_CLOSE, TunnelControlSchema, TunnelPortSchema } from '@devyard/api/tunnel-protocol';
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

/** Box-to-client bytes queued in the WebSocket beyond which the box's socket stops being read. */
const TUNNEL_HIGH_WATER = 4 * 1024 * 1024;
/** Reading resumes once the queue has drained below this. */
const TUNNEL_LOW_WATER = 1024 * 1024;
/** Error codes of a dial meaning the box does not run (the runtime drivers' codes). */
const BOX_DOWN_CODES = new Set(['BOX_NOT_RUNNING', 'BOX_PAUSED', 'BOX_NOT_FOUND']);
const EOF_FRAME = JSON.stringify({ type: 'eof' });

/** A WebSocket close reason must fit in 123 bytes; stay clear of it on a character boundary. */
function closeReason(text: string): string {
  let out = text;
  while (Buffer.byteLength(out) > 119) out = out.slice(0, -1);
  return out;
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
      const url = new URL(req.url ?? '/', 'http://agent');
      const snap = /^\/v1\/boxes\/([a-z0-9_]+)\/snapshot$/.exec(url.pathname);
      if (snap && req.method === 'GET') {
        this.serveSnapshot(req, res, url, snap[1]!);
        return;
      }
      res.writeHead(404, { 'content-type': 'application/problem+json' }).end(JSON.stringify({ status: 404, code: 'not-found', detail: 'no such route' }));
    });
    server.on('upgrade', (req, socket, head) => {
      const url = new URL(req.url ?? '/', 'http://agent');
      const m = /^\/v1\/boxes\/([a-z0-9_]+)\/(exec|tcp)$/.exec(url.pathname);
      const key = this.opts.sessionKey();
      const claims = key ? verifySessionToken(tokenOf(req, url) ?? '', key, Date.now()) : null;
      if (!m || !claims || claims.boxId !== m[1]) {
        socket.end('HTTP/1.1 401 Unauthorized\r\ncontent-type: text/plain\r\n\r\ninvalid or expired session token\n');
        return;
      }
      const boxId = m[1]!;
      if (m[2] === 'tcp') {
        const port = TunnelPortSchema.safeParse(url.searchParams.get('port') ?? '');
        if (!port.success) {
          socket.end('HTTP/1.1 400 Bad Request\r\ncontent-type: text/plain\r\n\r\nport must be an integer from 1 to 65535\n');
          return;
        }
        this.wss.handleUpgrade(req, socket, head, (ws) => void this.tunnel(ws, boxId, port.data, claims.sub));
        return;
      }
      this.wss.handleUpgrade(req, socket, head, (ws) => void this.session(ws, boxId, claims.sub));
    });
    this.server = server;
    await new Promise<void>((resolve) => server.listen(this.opts.port, this.opts.host, resolve));
    return `http://${this.opts.host}:${(server.address() as AddressInfo).port}`;
  }

  /**
   * A paused box's snapshot bundle for the node it moves to. The token is one the server signed
   * with this node's key for that node (`sub` node:<id>), so only the node the box is bound to
   * now can fetch it.
   */
  private serveSnapshot(req: IncomingMessage, res: ServerResponse, url: URL, boxId: string): void {
    const problem = (status: number, code: string, detail: string) => res.writeHead(status, { 'content-type': 'application/problem+json' }).end(JSON.stringify({ status, code, detail }));
    const key = this.opts.sessionKey();
    const claims = key ? verifySessionToken(tokenOf(req, url) ?? '', key, Date.now()) : null;
    if (!claims || claims.boxId !== boxId || !claims.sub.startsWith('node:')) return void problem(401, 'unauthorized', 'invalid or expired transfer token');
    const driver = this.opts.driver;
    if (!driver.exportSnapshot) return void problem(404, 'not-found', 'this node cannot export boxes');
    driver.exportSnapshot(boxId).then(
      (stream) => {
        this.opts.log('snapshot transfer', { boxId, to: claims.sub });
        res.writeHead(200, { 'content-type': 'application/zstd' });
        stream.on('error', (e) => {
          this.opts.log('snapshot transfer failed', { boxId, err: e.message });
          res.destroy(e);
        });
        stream.pipe(res);
      },
      (e: Error & { code?: string }) => problem(409, 'conflict', e.message),
    );
  }

  async close(): Promise<void> {
    for (const c of this.wss.clients) c.terminate();
    await new Promise<void>((resolve) => (this.server ? this.server.close(() => resolve()) : resolve()));
  }

  /**
   * One TCP connection to 127.0.0.1:port in the box, carried over the WebSocket (tunnel protocol):
   * binary frames are bytes, `{"type":"eof"}` is a half-close, and the WebSocket closes once both
   * directions have ended or either side fails.
   */
  private async tunnel(ws: WebSocket, boxId: string, port: number, sub: string): Promise<void> {
    const t0 = Date.now();
    // Set once the dial succeeds; the WebSocket handlers below may run before that.
    let sock: Duplex | undefined = undefined;
    let closed = false;
    const early: Buffer[] = [];
    let earlyEof = false;
    let bytesIn = 0;
    let bytesOut = 0;
    // Client bytes wait (bounded by the pause) until the connection exists.
    ws.pause();
    ws.on('close', (code) => {
      closed = true;
      sock?.destroy();
      this.opts.log('tcp session ended', { boxId, sub, port, code, bytesIn, bytesOut, ms: Date.now() - t0 });
    });
    ws.on('error', () => sock?.destroy());
    const finish = (code: number, reason = '') => {
      if (ws.readyState === ws.OPEN || ws.readyState === ws.CONNECTING) {
        // A paused WebSocket would never read the peer's close frame (ws waits 30 s, then drops it).
        ws.resume();
        ws.close(code, closeReason(reason));
      }
      sock?.destroy();
    };
    ws.on('message', (data: Buffer, isBinary: boolean) => {
      if (isBinary) {
        bytesIn += data.length;
        if (!sock) early.push(Buffer.from(data));
        else if (!sock.write(data)) ws.pause();
        return;
      }
      let ok = false;
      try {
        ok = TunnelControlSchema.safeParse(JSON.parse(data.toString())).success;
      } catch {
        ok = false;
      }
      if (!ok) return finish(1008, 'unknown control message');
      if (sock) sock.end();
      else earlyEof = true;
    });

    let s: Duplex;
    try {
      s = await this.opts.driver.dial(boxId, port);
    } catch (e) {
      const code = (e as { code?: unknown }).code;
      const message = (e as Error).message;
      this.opts.log('tcp session refused', { boxId, sub, port, code, message });
      if (code === 'PORT_REFUSED') finish(TUNNEL_CLOSE.refused, message);
      else if (typeof code === 'string' && BOX_DOWN_CODES.has(code)) finish(TUNNEL_CLOSE.unavailable, message);
      else finish(1011, message);
      return;
    }
    if (closed) {
      s.destroy();
      return;
    }
    sock = s;
    this.opts.log('tcp session', { boxId, sub, port });

    let readDone = false;
    let writeDone = false;
    const maybeDone = () => {
      if (readDone && writeDone) finish(1000);
    };
    // Box → client, paused while the WebSocket has too much queued.
    let queued = 0;
    s.on('data', (d: Buffer) => {
      bytesOut += d.length;
      queued += d.length;
      ws.send(d, { binary: true }, () => {
        queued -= d.length;
        if (queued < TUNNEL_LOW_WATER && s.isPaused() && !readDone) s.resume();
      });
      if (queued > TUNNEL_HIGH_WATER) s.pause();
    });
    s.on('end', () => {
      readDone = true;
      if (ws.readyState === ws.OPEN) ws.send(EOF_FRAME);
      maybeDone();
    });
    // Client → box: the WebSocket is paused while the socket's write buffer is full.
    s.on('drain', () => ws.resume());
    s.on('finish', () => {
      writeDone = true;
      maybeDone();
    });
    s.on('error', (err) => finish(1011, `connection to port ${port} failed: ${err.message}`));
    s.on('close', () => finish(1000));

    for (const b of early.splice(0)) s.write(b);
    if (earlyEof) s.end();
    ws.resume();
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
