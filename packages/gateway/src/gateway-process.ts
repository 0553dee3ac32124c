/**
 * `devyard gateway`: a stateless access process. It syncs the route table from the server, serves
 * SSH on one port and HTTP/WebSocket (browser terminal, previews, CLI tunnels) on another, and
 * reports session activity. Killing it drops its own sessions only; any other gateway process of
 * the same server serves the same boxes with the same host keys.
 */
import { randomBytes } from 'node:crypto';
import { hostname } from 'node:os';
import type { GatewayEndpoint } from '@devyard/api/access-schemas';
import { DevyardClient } from '@devyard/sdk/devyard-client';
import { ActivityTracker } from './activity-tracker.js';
import { BoxSessions } from './box-sessions.js';
import { HttpFrontDoor } from './http/http-front-door.js';
import { RouteCache } from './route-cache.js';
import { SshFrontDoor } from './ssh/ssh-front-door.js';

export interface GatewayOptions {
  /** Control-plane URL. */
  serverUrl: string;
  /** Gateway token (the `gateway.token` file in the server's data dir). */
  token: string;
  /** Address to listen on (both ports). */
  host?: string;
  /** SSH port (0 picks one). */
  sshPort?: number;
  /** HTTP port (0 picks one). */
  httpPort?: number;
  /** Base URL clients reach the HTTP port at (default http://<host>:<port>). */
  publicUrl?: string;
  /** Host name clients use for SSH (default: the public URL's host). */
  sshPublicHost?: string;
  /** Domain of host-form preview URLs (`<port>--<box>.<domain>`); default "localhost" when the public host is a loopback name. */
  previewDomain?: string | null;
  /** Route sync interval (default 10 s). */
  syncIntervalMs?: number;
  log?: (msg: string, fields?: Record<string, unknown>) => void;
}

export interface Gateway {
  endpoint: GatewayEndpoint;
  cache: RouteCache;
  activity: ActivityTracker;
  close(): Promise<void>;
}

export async function startGateway(opts: GatewayOptions): Promise<Gateway> {
  const log = opts.log ?? ((msg, fields) => console.error(JSON.stringify({ time: new Date().toISOString(), msg, ...fields })));
  const host = opts.host ?? '127.0.0.1';
  const client = new DevyardClient({ url: opts.serverUrl, token: opts.token, timeoutMs: 10_000 });
  const activity = new ActivityTracker();
  let endpoint: GatewayEndpoint = { url: '', sshHost: '', sshPort: 0, previewDomain: null };
  const cache = new RouteCache({
    gatewayId: `${hostname()}:${process.pid}:${randomBytes(3).toString('hex')}`,
    endpoint: () => endpoint,
    control: client,
    drainActivity: () => activity.drain(),
    restoreActivity: (a) => activity.restore(a),
    intervalMs: opts.syncIntervalMs,
    log,
  });
  const sessions = new BoxSessions(cache, activity, log);
  const ssh = new SshFrontDoor({ host, port: opts.sshPort ?? 0, cache, sessions, log });
  const http = new HttpFrontDoor({ host, port: opts.httpPort ?? 0, cache, sessions, ssh, log, previewDomain: () => endpoint.previewDomain });
  // The first sync must not advertise a half-known endpoint: bind the ports first.
  const httpPort = await http.listen();
  const publicUrl = (opts.publicUrl ?? `http://${host === '0.0.0.0' ? '127.0.0.1' : host}:${httpPort}`).replace(/\/+$/, '');
  const publicHost = new URL(publicUrl).hostname;
  const previewDomain = opts.previewDomain !== undefined ? opts.previewDomain : /^(localhost|127\.0\.0\.1|\[::1\])$/.test(publicHost) ? 'localhost' : null;
  endpoint = { url: publicUrl, sshHost: opts.sshPublicHost ?? publicHost, sshPort: 0, previewDomain };
  try {
    await cache.start();
    endpoint.sshPort = await ssh.listen();
    await cache.refresh();
  } catch (e) {
    await http.close();
    await ssh.close();
    cache.stop();
    throw e;
  }
  log('gateway ready', { http: publicUrl, ssh: `${endpoint.sshHost}:${endpoint.sshPort}` });
  return {
    endpoint,
    cache,
    activity,
    async close() {
      cache.stop();
      await Promise.all([ssh.close(), http.close()]);
    },
  };
}
