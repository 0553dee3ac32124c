/**
 * `devyard gateway`: a stateless access process. It syncs the route table from the server, serves
 * SSH on one port and HTTP/WebSocket (browser terminal, previews, CLI tunnels) on another, and
 * reports session activity. Killing it drops its own sessions only; any other gateway process of
 * the same server serves the same boxes with the same host keys.
 */
import { randomBytes } from 'node:crypto';
import { hostname } from 'node:os';
import type { GatewayEndpoint } from '@devyard/api/access-schemas';
import { previewDomainConflict } from '@devyard/core/browser-boundary';
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
  /**
   * Domain previews are served under (`<port>--<box>.<domain>`), never the gateway's own site;
   * null serves no previews. Default: "localhost" when the public host is a loopback IP address
   * (browsers resolve `*.localhost` to loopback without DNS), else none.
   */
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

/** The listen address as a URL host: a wildcard means this machine's loopback. */
const urlHost = (host: string) => (host === '0.0.0.0' ? '127.0.0.1' : host === '::' ? '[::1]' : host.includes(':') ? `[${host}]` : host);

/** A gateway configuration that must not run, with a stable code. */
export class GatewayConfigError extends Error {
  constructor(
    /** `preview-domain-same-site`: previews would share a site (or a host) with the gateway; `invalid-preview-domain`; `invalid-public-url`. */
    readonly code: 'preview-domain-same-site' | 'invalid-preview-domain' | 'invalid-public-url',
    message: string,
  ) {
    super(message);
    this.name = 'GatewayConfigError';
  }
}

/**
 * The preview domain a gateway at `publicHost` serves, or null for none. A given domain must be
 * of another site than the gateway: a box's page served on the gateway's own site would get its
 * SameSite cookies and could set cookies it reads.
 */
export function resolvePreviewDomain(publicHost: string, given: string | null | undefined): string | null {
  if (given === null) return null;
  const domain = given ?? (/^(127\.\d+\.\d+\.\d+|\[::1\]|::1)$/.test(publicHost) ? 'localhost' : null);
  if (domain === null) return null;
  const conflict = previewDomainConflict(publicHost, domain);
  if (conflict?.reason === 'not-a-domain') throw new GatewayConfigError('invalid-preview-domain', `${conflict.message} (e.g. preview.example-boxes.com, or "none")`);
  if (conflict) {
    throw new GatewayConfigError(
      'preview-domain-same-site',
      `${conflict.message}. Previews run code from boxes and must be served from another site than the gateway: give --preview-domain a domain of another registrable domain (or "none"), or reach the gateway at another --public-url (for one machine: http://127.0.0.1:PORT with previews under localhost)`,
    );
  }
  return domain;
}

export async function startGateway(opts: GatewayOptions): Promise<Gateway> {
  const log = opts.log ?? ((msg, fields) => console.error(JSON.stringify({ time: new Date().toISOString(), msg, ...fields })));
  const host = opts.host ?? '127.0.0.1';
  // Refuse a configuration that would put previews on the gateway's site before binding anything.
  let givenHost: string;
  try {
    givenHost = new URL(opts.publicUrl ?? `http://${urlHost(host)}`).hostname;
  } catch {
    throw new GatewayConfigError('invalid-public-url', `the public URL "${opts.publicUrl}" is not a URL (e.g. https://devyard.example.com)`);
  }
  const previewDomain = resolvePreviewDomain(givenHost, opts.previewDomain);
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
  const http = new HttpFrontDoor({ host, port: opts.httpPort ?? 0, cache, sessions, ssh, log, previewDomain: () => endpoint.previewDomain, publicUrl: () => endpoint.url });
  // The first sync must not advertise a half-known endpoint: bind the ports first.
  const httpPort = await http.listen();
  const publicUrl = (opts.publicUrl ?? `http://${urlHost(host)}:${httpPort}`).replace(/\/+$/, '');
  const publicHost = new URL(publicUrl).hostname;
  endpoint = { url: publicUrl, sshHost: opts.sshPublicHost ?? publicHost, sshPort: 0, previewDomain };
  if (!previewDomain) log('previews are off: this gateway has no preview domain (--preview-domain)', { url: publicUrl });
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
  log('gateway ready', { http: publicUrl, ssh: `${endpoint.sshHost}:${endpoint.sshPort}`, previews: previewDomain });
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
