/**
 * The gateway's SSH server (ssh2). Two ways in:
 *  - TCP (`ssh -p PORT <box>@HOST`): the box is only known after the key exchange (it is the user
 *    name), so the gateway presents its own host key, the same on every gateway process; users
 *    authenticate with their registered keys.
 *  - A tunnel the HTTP front door already authenticated (`devyard ssh --stdio`, the ProxyCommand
 *    `devyard config-ssh` writes): the box is known before the key exchange, so the gateway
 *    presents the box's own host key; no SSH user authentication is needed on top of the token.
 * Sessions then flow to the box's agent: shell and exec with PTY, env and exit status, SFTP (the
 * box's bundled sftp-server), and local port forwarding (`direct-tcpip`). Agent forwarding, X11 and
 * remote forwarding are refused.
 */
import { createServer, type Server as NetServer, type Socket } from 'node:net';
import type { Duplex } from 'node:stream';
import ssh2 from 'ssh2';
import type { RouteBox } from '@devyard/api/gateway-schemas';
import { BoxSessions, SessionError, SFTP_SERVER_ARGV, shellArgv } from '../box-sessions.js';
import { listenPort } from '../listen-port.js';
import type { RouteCache } from '../route-cache.js';

export interface SshFrontDoorOptions {
  host: string;
  port: number;
  cache: RouteCache;
  sessions: BoxSessions;
  log: (msg: string, fields?: Record<string, unknown>) => void;
}

/** Who a connection is for, once known. */
interface Peer {
  subject?: string;
  /** Box fixed by the tunnel (set before the key exchange), or chosen by the SSH user name. */
  box?: RouteBox;
  remote: string;
}

const LOCAL_TARGETS = new Set(['localhost', '127.0.0.1', '::1', '0.0.0.0']);

export class SshFrontDoor {
  private server: NetServer | undefined;
  private readonly clients = new Set<ssh2.Connection>();

  constructor(private readonly opts: SshFrontDoorOptions) {}

  /** Listens on TCP; answers the bound port. */
  async listen(): Promise<number> {
    const server = createServer((socket) => this.accept(socket, { remote: `${socket.remoteAddress}:${socket.remotePort}` }, this.opts.cache.gatewayHostKey()));
    this.server = server;
    return listenPort(server, this.opts.port, this.opts.host);
  }

  /** Serves SSH over a stream whose user and box the caller already authenticated. */
  serveTunnel(stream: Duplex, box: RouteBox, subject: string, remote: string): void {
    const socketLike = Object.assign(stream, { remoteAddress: remote.replace(/:\d+$/, ''), remotePort: 0, remoteFamily: 'IPv4', setNoDelay: () => stream, setKeepAlive: () => stream });
    this.accept(socketLike as unknown as Socket, { subject, box, remote }, box.hostKey);
  }

  async close(): Promise<void> {
    for (const c of this.clients) c.end();
    await new Promise<void>((resolve) => (this.server ? this.server.close(() => resolve()) : resolve()));
  }

  private accept(socket: Socket, peer: Peer, hostKey: string): void {
    // One ssh2 server per host key; the server object only carries config until a socket is injected.
    const server = new ssh2.Server({ hostKeys: [hostKey], ident: 'devyard-gateway' });
    server.on('connection', (client) => this.onClient(client, peer));
    server.injectSocket(socket);
  }

  private onClient(client: ssh2.Connection, peer: Peer): void {
    const { cache, log } = this.opts;
    this.clients.add(client);
    client.on('close', () => this.clients.delete(client));
    client.on('error', (e) => log('ssh client error', { remote: peer.remote, error: e.message }));
    let wantBox: string | undefined;
    client.on('authentication', (ctx) => {
      if (peer.subject) {
        // The tunnel carried a verified access token: any method is fine.
        ctx.accept();
        return;
      }
      wantBox = ctx.username;
      if (ctx.method !== 'publickey') return ctx.reject(['publickey']);
      // A key added a moment ago is found after a fresh sync.
      const key = ctx.key;
      void cache.lookup(`key:${key.algo}:${key.data.toString('base64')}`, () => cache.userByKey(key.algo, key.data)).then((user) => (user ? this.finishKeyAuth(ctx, user, peer) : ctx.reject(['publickey'])));
    });
    client.on('ready', () => {
      const resolveBox = async (): Promise<RouteBox | undefined> => {
        if (peer.box) return cache.boxById(peer.box.id) ?? peer.box;
        const name = wantBox ?? '';
        return cache.lookup(`box:${peer.subject}:${name}`, () => cache.connectableBox(peer.subject!, name));
      };
      log('ssh connected', { remote: peer.remote, subject: peer.subject, box: peer.box?.name ?? wantBox });
      client.on('session', (acceptSession) => this.onSession(acceptSession(), peer, resolveBox, wantBox ?? peer.box?.name ?? ''));
      client.on('tcpip', (accept, reject, info) => {
        void (async () => {
          const box = await resolveBox();
          if (!box || !LOCAL_TARGETS.has(info.destIP) || box.phase !== 'running' || !box.agentToken) return reject();
          let tunnel: Duplex;
          try {
            tunnel = this.opts.sessions.tunnel(box, info.destPort);
          } catch {
            return reject();
          }
          const channel = accept();
          channel.pipe(tunnel).pipe(channel);
          tunnel.on('error', () => channel.close());
          channel.on('error', () => tunnel.destroy());
          channel.on('close', () => tunnel.destroy());
        })();
      });
      client.on('request', (accept, reject) => reject?.());
    });
  }

  private finishKeyAuth(ctx: ssh2.PublicKeyAuthContext, user: { subject: string; key: ssh2.ParsedKey }, peer: Peer): void {
    if (!ctx.signature) return ctx.accept(); // "would this key do?": yes
    if (user.key.verify(ctx.blob!, ctx.signature, ctx.hashAlgo) !== true) return ctx.reject(['publickey']);
    peer.subject = user.subject;
    ctx.accept();
  }

  private onSession(session: ssh2.Session, peer: Peer, resolveBox: () => Promise<RouteBox | undefined>, name: string): void {
    let pty: { cols: number; rows: number; term: string } | undefined;
    const env: Record<string, string> = {};
    let resize: ((cols: number, rows: number) => void) | undefined;
    session.on('pty', (accept, _reject, info) => {
      pty = { cols: info.cols || 80, rows: info.rows || 24, term: info.term || 'xterm-256color' };
      accept?.();
    });
    session.on('window-change', (accept, _reject, info) => {
      if (pty) pty = { ...pty, cols: info.cols, rows: info.rows };
      resize?.(info.cols, info.rows);
      accept?.();
    });
    session.on('env', (accept, reject, info) => {
      // Like sshd's AcceptEnv: names only, no overriding the loader or PATH.
      if (/^[A-Za-z_][A-Za-z0-9_]*$/.test(info.key) && !/^(LD_|PATH$)/.test(info.key)) {
        env[info.key] = info.val;
        accept?.();
      } else reject?.();
    });
    const run = (channel: ssh2.ServerChannel, argv: string[], opts: { tty: boolean; cwd?: string; greet?: boolean }) => {
      void (async () => {
        const fail = (message: string) => {
          channel.stderr.write(`${message}\r\n`);
          channel.exit(255);
          channel.end();
        };
        try {
          const box = await resolveBox();
          if (!box) return fail(`devyard: no box "${name}" (or you may not connect to it); see \`devyard list\``);
          // An interactive shell says whose box it is and who is signed in, so someone who reaches
          // an account that is not theirs (a key registered to another user) sees it at once.
          if (opts.greet) channel.stderr.write(`devyard: box ${box.name} of ${box.owner}, signed in as ${peer.subject}\r\n`);
          const handle = this.opts.sessions.commandWhenRunning(
            box,
            peer.subject!,
            { argv, tty: opts.tty && pty ? pty : undefined, env, cwd: opts.cwd, stdin: channel, stdout: channel, stderr: channel.stderr },
            (line) => channel.stderr.write(`${line}\r\n`),
          );
          resize = (c, r) => handle.resize(c, r);
          channel.on('close', () => handle.close());
          const code = await handle.exited;
          channel.exit(code);
          channel.end();
        } catch (e) {
          fail(e instanceof SessionError ? e.message : `devyard: ${(e as Error).message}`);
        }
      })();
    };
    session.on('shell', (accept) => run(accept(), shellArgv(), { tty: true, cwd: '/workspace', greet: true }));
    // Commands start in the home directory, as with sshd (scp and rsync paths are relative to it).
    session.on('exec', (accept, _reject, info) => run(accept(), shellArgv(info.command), { tty: !!pty, cwd: '/root' }));
    session.on('subsystem', (accept, reject, info) => {
      if (info.name !== 'sftp') return reject?.();
      run(accept(), SFTP_SERVER_ARGV, { tty: false, cwd: '/root' });
    });
  }
}
