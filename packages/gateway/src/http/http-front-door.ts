/**
 * The gateway's HTTP/WebSocket front door:
 *  - `/__devyard/auth?token=…&next=…`: a sign-in link (`devyard open`) turns a server-signed access
 *    token into a host-only cookie, so each preview host and the terminal get their own;
 *  - `/boxes/<box>/terminal` (+ `/ws`): the browser terminal, a PTY in the box;
 *  - previews: `<port>--<box>.<preview domain>` (host form) or `/p/<box>/<port>/…` (path form),
 *    HTTP and WebSocket proxied to 127.0.0.1:<port> inside the box, for users who may connect or,
 *    for an org-visible port, any signed-in user;
 *  - `/v1/boxes/<box>/ssh` and `/v1/boxes/<box>/tcp/<port>`: tunnels for `devyard ssh --stdio`
 *    (SSH served by the SSH front door) and `devyard port-forward`, authorized by a bearer token.
 * Our session cookie never reaches the box: it is stripped from proxied requests.
 */
import { createServer, request as httpRequest, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import { createRequire } from 'node:module';
import { readFile } from 'node:fs/promises';
import type { Duplex } from 'node:stream';
import { PassThrough, Writable } from 'node:stream';
import { WebSocketServer, type WebSocket } from 'ws';
import type { RouteBox } from '@devyard/api/gateway-schemas';
import { CHANNEL, ExecClientMessageSchema, frame } from '@devyard/api/exec-protocol';
import { TUNNEL_CLOSE } from '@devyard/api/tunnel-protocol';
import { parsePreviewHost } from '@devyard/core/access-policy';
import { tunnelStream, TunnelError } from '@devyard/sdk/tunnel-client';
import { SessionError, shellArgv, type BoxSessions } from '../box-sessions.js';
import { listenPort } from '../listen-port.js';
import type { RouteCache } from '../route-cache.js';
import type { SshFrontDoor } from '../ssh/ssh-front-door.js';
import { signInPage, terminalPage } from './terminal-page.js';

export interface HttpFrontDoorOptions {
  host: string;
  port: number;
  cache: RouteCache;
  sessions: BoxSessions;
  ssh: SshFrontDoor;
  /** Domain of host-form previews, or null when only the path form is served. */
  previewDomain: () => string | null;
  log: (msg: string, fields?: Record<string, unknown>) => void;
}

const COOKIE = 'devyard_session';
const require = createRequire(import.meta.url);
const ASSETS: Record<string, { module: string; type: string }> = {
  'xterm.js': { module: '@xterm/xterm/lib/xterm.js', type: 'text/javascript' },
  'xterm.css': { module: '@xterm/xterm/css/xterm.css', type: 'text/css' },
  'addon-fit.js': { module: '@xterm/addon-fit/lib/addon-fit.js', type: 'text/javascript' },
};

function cookies(req: IncomingMessage): Map<string, string> {
  const out = new Map<string, string>();
  for (const part of (req.headers.cookie ?? '').split(';')) {
    const i = part.indexOf('=');
    if (i > 0) out.set(part.slice(0, i).trim(), decodeURIComponent(part.slice(i + 1).trim()));
  }
  return out;
}

/** The Cookie header without ours (the box's app must never see the gateway token). */
function foreignCookies(header: string | undefined): string | undefined {
  if (!header) return undefined;
  const kept = header.split(';').filter((p) => p.split('=')[0]?.trim() !== COOKIE);
  return kept.length ? kept.join(';').trim() : undefined;
}

function send(res: ServerResponse, status: number, body: string, type = 'text/plain; charset=utf-8'): void {
  res.writeHead(status, { 'content-type': type, 'cache-control': 'no-store' }).end(body);
}

function refuseUpgrade(socket: Duplex, status: number, reason: string, message: string): void {
  socket.end(`HTTP/1.1 ${status} ${reason}\r\ncontent-type: text/plain\r\nconnection: close\r\n\r\n${message}\n`);
}

export class HttpFrontDoor {
  private server: Server | undefined;
  private readonly wss = new WebSocketServer({ noServer: true, perMessageDeflate: false });

  constructor(private readonly opts: HttpFrontDoorOptions) {}

  async listen(): Promise<number> {
    const server = createServer((req, res) => void this.onRequest(req, res).catch((e) => this.fail(res, e)));
    server.on('upgrade', (req, socket, head) => void this.onUpgrade(req, socket, head).catch((e) => refuseUpgrade(socket, 500, 'Internal Server Error', (e as Error).message)));
    this.server = server;
    return listenPort(server, this.opts.port, this.opts.host);
  }

  async close(): Promise<void> {
    for (const c of this.wss.clients) c.terminate();
    this.server?.closeAllConnections();
    await new Promise<void>((resolve) => (this.server ? this.server.close(() => resolve()) : resolve()));
  }

  private fail(res: ServerResponse, e: unknown): void {
    this.opts.log('http request failed', { error: (e as Error).message });
    if (!res.headersSent) send(res, 500, 'internal error\n');
    else res.destroy();
  }

  /** The signed-in user: a bearer token (CLI) or the session cookie (browser). */
  private subject(req: IncomingMessage): string | null {
    const m = /^Bearer\s+(\S+)$/i.exec(req.headers.authorization ?? '');
    const token = m?.[1] ?? cookies(req).get(COOKIE);
    return token ? (this.opts.cache.verifyAccessToken(token)?.sub ?? null) : null;
  }

  private connectable(subject: string, name: string): Promise<RouteBox | undefined> {
    return this.opts.cache.lookup(`box:${subject}:${name}`, () => this.opts.cache.connectableBox(subject, name));
  }

  private preview(req: IncomingMessage): { box: string; port: number; path: string } | null {
    const domain = this.opts.previewDomain();
    const url = req.url ?? '/';
    if (domain) {
      const h = parsePreviewHost(req.headers.host ?? '', domain);
      if (h) return { ...h, path: url };
    }
    const m = /^\/p\/([a-z0-9-]+)\/(\d{1,5})(\/.*)?$/.exec(url);
    if (m && Number(m[2]) >= 1 && Number(m[2]) <= 65535) return { box: m[1]!, port: Number(m[2]), path: m[3] ?? '/' };
    return null;
  }

  private async onRequest(req: IncomingMessage, res: ServerResponse): Promise<void> {
    const url = new URL(req.url ?? '/', 'http://gateway');
    if (url.pathname === '/__devyard/auth') return this.signIn(url, res);
    if (url.pathname === '/healthz') return send(res, 200, JSON.stringify({ status: 'ok', server: this.opts.cache.serverReachable ? 'reachable' : 'unreachable' }), 'application/json');
    const asset = /^\/__devyard\/assets\/([a-z.-]+)$/.exec(url.pathname)?.[1];
    if (asset && ASSETS[asset]) {
      const a = ASSETS[asset];
      res.writeHead(200, { 'content-type': a.type, 'cache-control': 'public, max-age=3600' }).end(await readFile(require.resolve(a.module)));
      return;
    }
    const target = this.preview(req);
    const subject = this.subject(req);
    if (target) {
      if (!subject) return send(res, 401, signInPage(), 'text/html; charset=utf-8');
      return this.proxyHttp(req, res, subject, target);
    }
    const term = /^\/boxes\/([a-z0-9-]+)\/terminal\/?$/.exec(url.pathname);
    if (term && req.method === 'GET') {
      if (!subject) return send(res, 401, signInPage(), 'text/html; charset=utf-8');
      if (!(await this.connectable(subject, term[1]!))) return send(res, 404, `no box "${term[1]}"\n`);
      return send(res, 200, terminalPage(term[1]!), 'text/html; charset=utf-8');
    }
    send(res, 404, 'not found\n');
  }

  private signIn(url: URL, res: ServerResponse): void {
    const token = url.searchParams.get('token') ?? '';
    const claims = this.opts.cache.verifyAccessToken(token);
    if (!claims) return send(res, 401, signInPage(), 'text/html; charset=utf-8');
    const next = url.searchParams.get('next') ?? '/';
    // Only local paths: a sign-in link must not redirect elsewhere.
    const safeNext = next.startsWith('/') && !next.startsWith('//') ? next : '/';
    const maxAge = Math.max(0, Math.floor((claims.exp - Date.now()) / 1000));
    res
      .writeHead(303, {
        location: safeNext,
        'set-cookie': `${COOKIE}=${encodeURIComponent(token)}; HttpOnly; SameSite=Lax; Path=/; Max-Age=${maxAge}`,
        'cache-control': 'no-store',
      })
      .end();
  }

  /** The box a preview goes to, running, or an HTTP status and message. */
  private async previewTarget(subject: string, t: { box: string; port: number }): Promise<RouteBox | { status: number; message: string }> {
    const { cache, sessions } = this.opts;
    const box = await cache.lookup(`preview:${subject}:${t.box}:${t.port}`, () => cache.previewBox(subject, t.box, t.port));
    if (!box) return { status: 404, message: `no box "${t.box}" with port ${t.port} you may open` };
    if (box.phase === 'running' && box.agentToken) return box;
    // Only those who may start the box wake it for a preview; the server decides (wake answers 403 otherwise).
    if (this.opts.cache.accessTo(subject, box) !== 'manage') return { status: 503, message: `box "${t.box}" is ${box.phase}` };
    try {
      return await sessions.ensureRunning(box, subject, () => {}, 120_000);
    } catch (e) {
      return { status: 503, message: (e as Error).message };
    }
  }

  private async proxyHttp(req: IncomingMessage, res: ServerResponse, subject: string, t: { box: string; port: number; path: string }): Promise<void> {
    const box = await this.previewTarget(subject, t);
    if ('status' in box) return send(res, box.status, `${box.message}\n`);
    const headers: Record<string, string | string[]> = { 'x-forwarded-host': req.headers.host ?? '', 'x-forwarded-proto': 'http' };
    for (const [k, v] of Object.entries(req.headers)) if (v !== undefined && k !== 'authorization' && k !== 'cookie') headers[k] = v;
    const cookie = foreignCookies(req.headers.cookie);
    if (cookie) headers.cookie = cookie;
    const upstream = httpRequest({
      method: req.method,
      path: t.path,
      headers,
      // No agent: each request gets its own tunnel (an agent would ignore createConnection).
      createConnection: () => this.opts.sessions.tunnel(box, t.port) as never,
    });
    upstream.on('response', (up) => {
      res.writeHead(up.statusCode ?? 502, up.rawHeaders);
      up.pipe(res);
    });
    upstream.on('error', (e) => {
      const refused = e instanceof TunnelError && e.code === TUNNEL_CLOSE.refused;
      if (!res.headersSent) send(res, 502, refused ? `nothing is listening on port ${t.port} in box "${t.box}"\n` : `cannot reach port ${t.port} in box "${t.box}": ${e.message}\n`);
      else res.destroy();
    });
    req.pipe(upstream);
  }

  private async onUpgrade(req: IncomingMessage, socket: Duplex, head: Buffer): Promise<void> {
    const url = new URL(req.url ?? '/', 'http://gateway');
    const subject = this.subject(req);
    const target = this.preview(req);
    if (target) {
      if (!subject) return refuseUpgrade(socket, 401, 'Unauthorized', 'sign in first (devyard open)');
      return this.proxyUpgrade(req, socket, head, subject, target);
    }
    if (!subject) return refuseUpgrade(socket, 401, 'Unauthorized', 'invalid or expired access token');
    const ssh = /^\/v1\/boxes\/([a-z0-9-]+)\/ssh$/.exec(url.pathname);
    const tcp = /^\/v1\/boxes\/([a-z0-9-]+)\/tcp\/(\d{1,5})$/.exec(url.pathname);
    const term = /^\/boxes\/([a-z0-9-]+)\/terminal\/ws$/.exec(url.pathname);
    const name = (ssh ?? tcp ?? term)?.[1];
    if (!name) return refuseUpgrade(socket, 404, 'Not Found', 'no such endpoint');
    const box = await this.connectable(subject, name);
    if (!box) return refuseUpgrade(socket, 404, 'Not Found', `no box "${name}" (or you may not connect to it)`);
    const remote = `${req.socket.remoteAddress}:${req.socket.remotePort}`;
    this.wss.handleUpgrade(req, socket, head, (ws) => {
      if (ssh) this.opts.ssh.serveTunnel(tunnelStream(ws), box, subject, remote);
      else if (tcp) void this.tcpTunnel(ws, box, subject, Number(tcp[2]));
      else void this.terminal(ws, box, subject, url);
    });
  }

  private async tcpTunnel(ws: WebSocket, box: RouteBox, subject: string, port: number): Promise<void> {
    if (port < 1 || port > 65535) return ws.close(TUNNEL_CLOSE.refused, 'bad port');
    let running: RouteBox;
    try {
      running = await this.opts.sessions.ensureRunning(box, subject, () => {});
    } catch (e) {
      return ws.close(TUNNEL_CLOSE.unavailable, (e as Error).message.slice(0, 120));
    }
    const client = tunnelStream(ws);
    const upstream = this.opts.sessions.tunnel(running, port);
    client.pipe(upstream).pipe(client);
    upstream.on('error', (e) => {
      const code = e instanceof TunnelError && e.code >= 4000 ? e.code : 1011;
      if (ws.readyState === ws.OPEN) ws.close(code, e.message.slice(0, 120));
    });
    client.on('error', () => upstream.destroy());
  }

  private async terminal(ws: WebSocket, box: RouteBox, subject: string, url: URL): Promise<void> {
    const cols = Math.min(1000, Math.max(1, Number(url.searchParams.get('cols')) || 80));
    const rows = Math.min(1000, Math.max(1, Number(url.searchParams.get('rows')) || 24));
    const sendOut = (b: Buffer) => ws.readyState === ws.OPEN && ws.send(frame(CHANNEL.stdout, b));
    const stdin = new PassThrough();
    const stdout = new Writable({
      write(chunk: Buffer, _enc, cb) {
        sendOut(chunk);
        cb();
      },
    });
    const handle = this.opts.sessions.commandWhenRunning(box, subject, { argv: shellArgv(), tty: { cols, rows, term: 'xterm-256color' }, cwd: '/workspace', stdin, stdout, stderr: stdout }, (line) =>
      sendOut(Buffer.from(`${line}\r\n`)),
    );
    ws.on('message', (data: Buffer, isBinary: boolean) => {
      if (isBinary) {
        if (data[0] === CHANNEL.stdin) stdin.write(data.subarray(1));
        return;
      }
      let msg: unknown;
      try {
        msg = JSON.parse(data.toString());
      } catch {
        return;
      }
      const parsed = ExecClientMessageSchema.safeParse(msg);
      if (parsed.success && parsed.data.type === 'resize') handle.resize(parsed.data.cols, parsed.data.rows);
    });
    ws.on('close', () => handle.close());
    handle.exited.then(
      (code) => {
        if (ws.readyState === ws.OPEN) ws.send(JSON.stringify({ type: 'exit', code }));
        ws.close();
      },
      (e: Error) => {
        if (ws.readyState === ws.OPEN) ws.send(JSON.stringify({ type: 'error', message: e instanceof SessionError ? e.message : `devyard: ${e.message}` }));
        ws.close();
      },
    );
  }

  private async proxyUpgrade(req: IncomingMessage, socket: Duplex, head: Buffer, subject: string, t: { box: string; port: number; path: string }): Promise<void> {
    const box = await this.previewTarget(subject, t);
    if ('status' in box) return refuseUpgrade(socket, box.status, box.status === 404 ? 'Not Found' : 'Service Unavailable', box.message);
    const upstream = this.opts.sessions.tunnel(box, t.port);
    const lines = [`${req.method} ${t.path} HTTP/1.1`];
    for (let i = 0; i < req.rawHeaders.length; i += 2) {
      const k = req.rawHeaders[i]!;
      const lower = k.toLowerCase();
      if (lower === 'authorization') continue;
      if (lower === 'cookie') {
        const kept = foreignCookies(req.rawHeaders[i + 1]);
        if (kept) lines.push(`${k}: ${kept}`);
        continue;
      }
      lines.push(`${k}: ${req.rawHeaders[i + 1]}`);
    }
    upstream.write(`${lines.join('\r\n')}\r\n\r\n`);
    if (head.length) upstream.write(head);
    socket.pipe(upstream).pipe(socket);
    upstream.on('error', () => socket.destroy());
    socket.on('error', () => upstream.destroy());
  }
}
