/**
 * The gateway's HTTP/WebSocket front door. On the gateway's own origin (its public URL):
 *  - `/__devyard/auth?token=…&next=…`: a terminal sign-in link (`devyard open BOX`) is redeemed once,
 *    through the server, for a session cookie that opens that box's terminal and nothing else;
 *  - `/boxes/<box>/terminal` (+ `/ws`): the browser terminal, a PTY in the box; its WebSocket needs
 *    the gateway's own Origin and the CSRF token of the page besides the cookie;
 *  - `/v1/boxes/<box>/ssh` and `/v1/boxes/<box>/tcp/<port>`: tunnels for `devyard ssh --stdio` (SSH
 *    served by the SSH front door) and `devyard port-forward`, for a bearer token only.
 * Previews live on hosts of their own, `<port>--<box>.<preview domain>`, a site apart from the
 * gateway's: a box's page must never run on the gateway's origin, where it could drive the
 * terminal with the user's cookie. Each preview host has its own sign-in and cookie; HTTP and
 * WebSocket are proxied to 127.0.0.1:<port> inside the box, for users who may connect or, for an
 * org-visible port, any member. Our cookie and the Authorization header never reach the box, and
 * the box cannot set our cookie, nor any cookie for a wider domain than its preview host.
 */
import { createHash, timingSafeEqual } from 'node:crypto';
import { createServer, request as httpRequest, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import { createRequire } from 'node:module';
import { readFile } from 'node:fs/promises';
import type { Duplex } from 'node:stream';
import { PassThrough, Writable } from 'node:stream';
import { parseCookie, parseSetCookie, stringifySetCookie } from 'cookie';
import { WebSocketServer, type WebSocket } from 'ws';
import type { AccessClaims } from '@devyard/api/access-tokens';
import type { RouteBox } from '@devyard/api/gateway-schemas';
import { CHANNEL, ExecClientMessageSchema, frame } from '@devyard/api/exec-protocol';
import { TUNNEL_CLOSE } from '@devyard/api/tunnel-protocol';
import { parsePreviewHost, previewHost, scopeCovers, terminalPath, type BrowserScope } from '@devyard/core/access-policy';
import { previewCookieAllowed, signInRedirect } from '@devyard/core/browser-boundary';
import { ApiError } from '@devyard/sdk/api-error';
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
  /** Domain previews are served under, or null when this gateway serves none. */
  previewDomain: () => string | null;
  /** The gateway's public base URL: its origin is the only one the terminal answers. */
  publicUrl: () => string;
  log: (msg: string, fields?: Record<string, unknown>) => void;
}

/** The browser session cookie: one per preview host (host-only) and one per terminal (its path). */
const COOKIE = 'devyard_session';
const require = createRequire(import.meta.url);
const ASSETS: Record<string, { module: string; type: string }> = {
  'xterm.js': { module: '@xterm/xterm/lib/xterm.js', type: 'text/javascript' },
  'xterm.css': { module: '@xterm/xterm/css/xterm.css', type: 'text/css' },
  'addon-fit.js': { module: '@xterm/addon-fit/lib/addon-fit.js', type: 'text/javascript' },
};

/** Pages of the gateway's own origin: never framed (a preview must not overlay the terminal), no referrer. */
const OWN_PAGE_HEADERS = {
  'content-security-policy': "frame-ancestors 'none'",
  'x-frame-options': 'DENY',
  'referrer-policy': 'no-referrer',
  'x-content-type-options': 'nosniff',
};

/** A preview request: the box and port named by the Host, the path as sent, and the preview's origin. */
interface PreviewTarget {
  box: string;
  port: number;
  path: string;
  origin: string;
}

/** Who a browser request speaks for, and how it proved it. */
type Caller = { via: 'bearer'; sub: string } | { via: 'cookie'; sub: string; token: string };

/** The Cookie header without ours (the box's app must never see the gateway's session). */
function foreignCookies(header: string | undefined): string | undefined {
  if (!header) return undefined;
  const kept = header.split(';').filter((p) => p.split('=')[0]?.trim() !== COOKIE);
  return kept.length ? kept.join(';').trim() : undefined;
}

/**
 * The terminal page's CSRF token: derived from the session cookie it was served with, so any
 * gateway can check it without state, and only a page that could read our origin knows it.
 */
function csrfToken(sessionToken: string): string {
  return createHash('sha256').update(`devyard-terminal-csrf\0${sessionToken}`).digest('base64url');
}

function sameSecret(a: string, b: string): boolean {
  const x = Buffer.from(a);
  const y = Buffer.from(b);
  return x.length === y.length && timingSafeEqual(x, y);
}

function send(res: ServerResponse, status: number, body: string, type = 'text/plain; charset=utf-8', extra: Record<string, string> = {}): void {
  res.writeHead(status, { 'content-type': type, 'cache-control': 'no-store', ...extra }).end(body);
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

  private get publicOrigin(): URL {
    return new URL(this.opts.publicUrl());
  }

  /** A CLI's bearer token (an `access` token); browsers cannot attach one on their own. */
  private bearer(req: IncomingMessage): AccessClaims | null {
    const m = /^Bearer\s+(\S+)$/i.exec(req.headers.authorization ?? '');
    return m ? this.opts.cache.verifyAccessToken(m[1]!, 'access') : null;
  }

  /** The browser session of our cookie, when it opens exactly `wanted`. */
  private cookieSession(req: IncomingMessage, wanted: BrowserScope): { claims: AccessClaims; token: string } | null {
    const token = parseCookie(req.headers.cookie ?? '')[COOKIE];
    if (!token) return null;
    const claims = this.opts.cache.verifyAccessToken(token, 'session');
    return claims?.scope && scopeCovers(claims.scope, wanted) ? { claims, token } : null;
  }

  /** The caller of a browser page or WebSocket: a bearer token, or a session cookie for exactly `wanted`. */
  private caller(req: IncomingMessage, wanted: BrowserScope): Caller | null {
    const b = this.bearer(req);
    if (b) return { via: 'bearer', sub: b.sub };
    const s = this.cookieSession(req, wanted);
    return s ? { via: 'cookie', sub: s.claims.sub, token: s.token } : null;
  }

  private connectable(subject: string, name: string): Promise<RouteBox | undefined> {
    return this.opts.cache.lookup(`box:${subject}:${name}`, () => this.opts.cache.connectableBox(subject, name));
  }

  /** The preview a request is for, from its Host alone; null on the gateway's own host. */
  private preview(req: IncomingMessage): PreviewTarget | null {
    const domain = this.opts.previewDomain();
    const host = req.headers.host ?? '';
    const h = domain ? parsePreviewHost(host, domain) : null;
    return h ? { ...h, path: req.url ?? '/', origin: `${this.publicOrigin.protocol}//${host.toLowerCase()}` } : null;
  }

  private async onRequest(req: IncomingMessage, res: ServerResponse): Promise<void> {
    const url = new URL(req.url ?? '/', 'http://gateway');
    const target = this.preview(req);
    if (target) {
      // On a preview host everything is the box's, but its sign-in.
      if (url.pathname === '/__devyard/auth') return this.signIn(req, url, res, target);
      const who = this.caller(req, { kind: 'preview', box: target.box, port: target.port });
      if (!who) return send(res, 401, signInPage(), 'text/html; charset=utf-8');
      return this.proxyHttp(req, res, who.sub, target);
    }
    if (url.pathname === '/__devyard/auth') return this.signIn(req, url, res, null);
    if (url.pathname === '/healthz') return send(res, 200, JSON.stringify({ status: 'ok', server: this.opts.cache.serverReachable ? 'reachable' : 'unreachable' }), 'application/json');
    const asset = /^\/__devyard\/assets\/([a-z.-]+)$/.exec(url.pathname)?.[1];
    if (asset && ASSETS[asset]) {
      const a = ASSETS[asset];
      res.writeHead(200, { 'content-type': a.type, 'cache-control': 'public, max-age=3600', 'x-content-type-options': 'nosniff' }).end(await readFile(require.resolve(a.module)));
      return;
    }
    const term = /^\/boxes\/([a-z0-9-]+)\/terminal\/?$/.exec(url.pathname);
    if (term && req.method === 'GET') {
      const who = this.caller(req, { kind: 'terminal', box: term[1]! });
      if (!who) return send(res, 401, signInPage(), 'text/html; charset=utf-8', OWN_PAGE_HEADERS);
      if (!(await this.connectable(who.sub, term[1]!))) return send(res, 404, `no box "${term[1]}"\n`);
      return send(res, 200, terminalPage(term[1]!, who.via === 'cookie' ? csrfToken(who.token) : '', who.sub), 'text/html; charset=utf-8', OWN_PAGE_HEADERS);
    }
    send(res, 404, 'not found\n');
  }

  /**
   * A sign-in link: checked offline, then redeemed once at the server for a session of the link's
   * scope, set as a cookie on the host the link was issued for (a preview host, or the gateway's
   * own host with the terminal's path), and a redirect within that origin only.
   */
  private async signIn(req: IncomingMessage, url: URL, res: ServerResponse, at: PreviewTarget | null): Promise<void> {
    const html = 'text/html; charset=utf-8';
    const token = url.searchParams.get('token') ?? '';
    const link = this.opts.cache.verifyAccessToken(token, 'sign-in');
    if (!link?.scope) return send(res, 401, signInPage('This sign-in link is not valid, or has expired: links last a minute.'), html, OWN_PAGE_HEADERS);
    const gateway = this.publicOrigin;
    const scope = link.scope;
    let origin: string;
    let cookiePath: string;
    if (at) {
      if (!scopeCovers(scope, { kind: 'preview', box: at.box, port: at.port })) return send(res, 400, signInPage(`This sign-in link is not for ${at.origin}.`), html);
      origin = at.origin;
      cookiePath = '/';
    } else {
      if (scope.kind !== 'terminal' || (req.headers.host ?? '').toLowerCase() !== gateway.host) {
        const where = scope.kind === 'terminal' ? gateway.origin : `the preview of port ${scope.port} of "${scope.box}"`;
        return send(res, 400, signInPage(`This sign-in link is for ${where}.`), html, OWN_PAGE_HEADERS);
      }
      origin = gateway.origin;
      // Behind a proxy that strips a base path (public URL https://host/devyard), the browser's path has it.
      cookiePath = `${gateway.pathname.replace(/\/+$/, '')}${terminalPath(scope.box)}`;
    }
    let session: { token: string; expiresAt: number };
    try {
      session = await this.opts.cache.redeemSignIn(token);
    } catch (e) {
      if (e instanceof ApiError && e.status === 401) return send(res, 401, signInPage(`${e.message}.`), html, OWN_PAGE_HEADERS);
      this.opts.log('sign-in redemption failed', { error: (e as Error).message });
      return send(res, 503, signInPage('The Devyard server cannot be reached to sign you in; sessions already open keep working. Try again in a moment.'), html, OWN_PAGE_HEADERS);
    }
    const cookie = stringifySetCookie({
      name: COOKIE,
      value: session.token,
      httpOnly: true,
      secure: gateway.protocol === 'https:',
      sameSite: 'lax',
      path: cookiePath,
      maxAge: Math.max(0, Math.floor((session.expiresAt - Date.now()) / 1000)),
    });
    res
      .writeHead(303, { location: signInRedirect(url.searchParams.get('next'), origin), 'set-cookie': cookie, 'cache-control': 'no-store', 'referrer-policy': 'no-referrer' })
      .end();
  }

  /** The box a preview goes to, running, or an HTTP status and message. */
  private async previewBox(subject: string, t: { box: string; port: number }): Promise<RouteBox | { status: number; message: string }> {
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

  /** Whether a previewed app's Set-Cookie header may pass (see previewCookieAllowed). */
  private cookieMayPass(value: string, t: PreviewTarget): boolean {
    try {
      const c = parseSetCookie(value);
      return previewCookieAllowed({ name: c.name, value: c.value, domain: c.domain }, new URL(t.origin).hostname, [COOKIE]);
    } catch {
      return false;
    }
  }

  private async proxyHttp(req: IncomingMessage, res: ServerResponse, subject: string, t: PreviewTarget): Promise<void> {
    const box = await this.previewBox(subject, t);
    if ('status' in box) return send(res, box.status, `${box.message}\n`);
    const headers: Record<string, string | string[]> = { 'x-forwarded-host': req.headers.host ?? '', 'x-forwarded-proto': this.publicOrigin.protocol.replace(/:$/, '') };
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
      const raw: string[] = [];
      for (let i = 0; i < up.rawHeaders.length; i += 2) {
        const [k, v] = [up.rawHeaders[i]!, up.rawHeaders[i + 1]!];
        if (k.toLowerCase() === 'set-cookie' && !this.cookieMayPass(v, t)) continue;
        raw.push(k, v);
      }
      res.writeHead(up.statusCode ?? 502, raw);
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
    const target = this.preview(req);
    if (target) return this.previewUpgrade(req, socket, head, target);
    const ssh = /^\/v1\/boxes\/([a-z0-9-]+)\/ssh$/.exec(url.pathname);
    const tcp = /^\/v1\/boxes\/([a-z0-9-]+)\/tcp\/(\d{1,5})$/.exec(url.pathname);
    const term = /^\/boxes\/([a-z0-9-]+)\/terminal\/ws$/.exec(url.pathname);
    const name = (ssh ?? tcp ?? term)?.[1];
    if (!name) return refuseUpgrade(socket, 404, 'Not Found', 'no such endpoint');
    let subject: string;
    if (term) {
      const who = this.terminalCaller(req, url, name);
      if ('status' in who) return refuseUpgrade(socket, who.status, who.status === 401 ? 'Unauthorized' : 'Forbidden', who.message);
      subject = who.sub;
    } else {
      // CLI tunnels: a bearer token only. A browser that holds our cookie must not be able to open them.
      const b = this.bearer(req);
      if (!b) return refuseUpgrade(socket, 401, 'Unauthorized', 'invalid or expired access token (tunnels take a bearer token)');
      subject = b.sub;
    }
    const box = await this.connectable(subject, name);
    if (!box) return refuseUpgrade(socket, 404, 'Not Found', `no box "${name}" (or you may not connect to it)`);
    const remote = `${req.socket.remoteAddress}:${req.socket.remotePort}`;
    this.wss.handleUpgrade(req, socket, head, (ws) => {
      if (ssh) this.opts.ssh.serveTunnel(tunnelStream(ws), box, subject, remote);
      else if (tcp) void this.tcpTunnel(ws, box, subject, Number(tcp[2]));
      else void this.terminal(ws, box, subject, url);
    });
  }

  /**
   * Who may open a terminal WebSocket: a bearer token (no browser can send one), or the terminal's
   * session cookie together with the gateway's own Origin and the CSRF token of the terminal page.
   * A cookie alone is what a browser attaches for any page that opens the socket.
   */
  private terminalCaller(req: IncomingMessage, url: URL, name: string): { sub: string } | { status: 401 | 403; message: string } {
    const b = this.bearer(req);
    if (b) return { sub: b.sub };
    const s = this.cookieSession(req, { kind: 'terminal', box: name });
    if (!s) return { status: 401, message: 'sign in first (devyard open)' };
    if (req.headers.origin !== this.publicOrigin.origin) return { status: 403, message: 'the terminal opens only from its own page' };
    if (!sameSecret(url.searchParams.get('csrf') ?? '', csrfToken(s.token))) return { status: 403, message: 'the terminal opens only from its own page (CSRF token)' };
    return { sub: s.claims.sub };
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

  /**
   * A preview's WebSocket: a bearer token, or the preview host's cookie from a page of the same box
   * (any of its preview hosts). Previews under one preview domain may share a site, so SameSite
   * lets another user's preview page send the cookie; the Origin tells them apart.
   */
  private previewCaller(req: IncomingMessage, t: PreviewTarget): { sub: string } | { status: 401 | 403; message: string } {
    const b = this.bearer(req);
    if (b) return { sub: b.sub };
    const s = this.cookieSession(req, { kind: 'preview', box: t.box, port: t.port });
    if (!s) return { status: 401, message: 'sign in first (devyard open BOX --port N)' };
    const domain = this.opts.previewDomain()!;
    let from: URL | undefined;
    try {
      from = new URL(req.headers.origin ?? '');
    } catch {}
    const here = new URL(t.origin);
    const sameBox = from && from.protocol === here.protocol && from.port === here.port && parsePreviewHost(from.host, domain)?.box === t.box;
    if (!sameBox) return { status: 403, message: `this WebSocket opens only from pages of "${previewHost(t.port, t.box, domain)}" and the other ports of its box` };
    return { sub: s.claims.sub };
  }

  private async previewUpgrade(req: IncomingMessage, socket: Duplex, head: Buffer, t: PreviewTarget): Promise<void> {
    const who = this.previewCaller(req, t);
    if ('status' in who) return refuseUpgrade(socket, who.status, who.status === 401 ? 'Unauthorized' : 'Forbidden', who.message);
    const box = await this.previewBox(who.sub, t);
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
    upstream.on('error', () => socket.destroy());
    socket.on('error', () => upstream.destroy());
    socket.pipe(upstream);
    this.pipeUpgradeAnswer(upstream, socket, t);
  }

  /**
   * Passes the box's answer to an upgrade on to the browser, its Set-Cookie headers filtered like
   * those of plain responses (browsers take cookies from a 101 too), then the bytes as they come.
   */
  private pipeUpgradeAnswer(upstream: Duplex, socket: Duplex, t: PreviewTarget): void {
    let buf = Buffer.alloc(0);
    const onData = (d: Buffer) => {
      buf = Buffer.concat([buf, d]);
      const end = buf.indexOf('\r\n\r\n');
      if (end < 0) {
        if (buf.length > 64 * 1024) {
          upstream.destroy();
          socket.destroy();
        }
        return;
      }
      upstream.off('data', onData);
      const lines = buf.subarray(0, end).toString('latin1').split('\r\n');
      // A folded header line could carry a cookie past the filter: refuse such an answer.
      if (lines.slice(1).some((l) => /^[ \t]/.test(l))) {
        upstream.destroy();
        return refuseUpgrade(socket, 502, 'Bad Gateway', 'the box answered with a folded header');
      }
      const kept = lines.filter((l, i) => i === 0 || !/^set-cookie\s*:/i.test(l) || this.cookieMayPass(l.slice(l.indexOf(':') + 1).trim(), t));
      socket.write(Buffer.from(`${kept.join('\r\n')}\r\n\r\n`, 'latin1'));
      const rest = buf.subarray(end + 4);
      if (rest.length) socket.write(rest);
      upstream.pipe(socket);
    };
    upstream.on('data', onData);
  }
}
