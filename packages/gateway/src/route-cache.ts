/**
 * The gateway's view of the world: the route table from the server's sync call, kept in memory
 * and refreshed periodically and on a miss. When the server is down the last table keeps serving
 * until its agent tokens expire, so open sessions and new ones with valid tokens keep working.
 */
import { createPublicKey, type KeyObject } from 'node:crypto';
import ssh2 from 'ssh2';
import type { GatewayEndpoint } from '@devyard/api/access-schemas';
import type { BoxActivity, BrowserSession, RouteBox, RouteTable } from '@devyard/api/gateway-schemas';
import { verifyAccessToken, type AccessClaims, type AccessTokenUse } from '@devyard/api/access-tokens';
import { gatewayAccess, mayConnect, mayOpenPort } from '@devyard/core/access-policy';
import type { BoxAccess } from '@devyard/core/rbac-policy';

/** The server calls the cache needs; declared here, implemented by the SDK client. */
export interface GatewayControlPlane {
  /** Registers the gateway, reports activity and answers the route table. */
  syncGateway(req: { gatewayId: string; endpoint: GatewayEndpoint; activity: BoxActivity[] }): Promise<RouteTable>;
  /** Starts or resumes a box for a user; answers the box's new state. */
  wakeBox(boxId: string, subject: string): Promise<{ phase: string; desiredState: string }>;
  /** Redeems a browser sign-in link, once across all gateways, for the session token of its cookie. */
  redeemSignIn(token: string): Promise<BrowserSession>;
}

/** A registered user key, parsed once per table. */
interface UserKey {
  subject: string;
  algo: string;
  blob: Buffer;
  key: ssh2.ParsedKey;
}

export interface RouteCacheOptions {
  gatewayId: string;
  endpoint: () => GatewayEndpoint;
  control: GatewayControlPlane;
  /** Collected activity, drained into each sync. */
  drainActivity: () => BoxActivity[];
  /** Give back undelivered activity after a failed sync. */
  restoreActivity: (a: BoxActivity[]) => void;
  /** Periodic sync interval (default 10 s). */
  intervalMs?: number;
  log: (msg: string, fields?: Record<string, unknown>) => void;
  now?: () => number;
}

export class RouteCache {
  private table: RouteTable | undefined;
  private accessKey: KeyObject | undefined;
  private keys: UserKey[] = [];
  private timer: NodeJS.Timeout | undefined;
  private inFlight: Promise<boolean> | undefined;
  private lastSyncAt = 0;
  private readonly now: () => number;
  /** Whether the last sync reached the server. */
  serverReachable = false;

  constructor(private readonly opts: RouteCacheOptions) {
    this.now = opts.now ?? Date.now;
  }

  /** First sync (retried until it works or `timeoutMs` passes), then periodic ones. */
  async start(timeoutMs = 30_000): Promise<void> {
    const deadline = this.now() + timeoutMs;
    while (!(await this.refresh()) && this.now() < deadline) await new Promise((r) => setTimeout(r, 500));
    if (!this.table) throw new Error('cannot fetch the route table from the server');
    const tick = () => {
      this.timer = setTimeout(() => void this.refresh().finally(tick), this.opts.intervalMs ?? 10_000);
      this.timer.unref();
    };
    tick();
  }

  stop(): void {
    clearTimeout(this.timer);
  }

  /** Syncs now (concurrent callers share one call); true when the server answered. */
  refresh(): Promise<boolean> {
    this.inFlight ??= this.sync().finally(() => (this.inFlight = undefined));
    return this.inFlight;
  }

  /** Syncs unless one finished within `minAgeMs`. */
  async refreshIfOlder(minAgeMs: number): Promise<void> {
    if (this.now() - this.lastSyncAt >= minAgeMs) await this.refresh();
  }

  /**
   * `find()` against the cached table, and once more after a fresh sync when it finds nothing (see
   * refreshAfterMiss; `missKey` names what was looked for).
   */
  async lookup<T>(missKey: string, find: () => T | undefined): Promise<T | undefined> {
    const found = find();
    if (found !== undefined) return found;
    await this.refreshAfterMiss(missKey);
    return find();
  }

  private readonly missAt = new Map<string, number>();
  private forcedSyncs: number[] = [];

  /**
   * Looks again after a miss (a key or box added a moment ago): a fresh sync, unless this same
   * thing missed within the last 5 s (a wrong key retried) or ten misses forced a sync within the
   * last second (then at most one sync a second), so misses cannot hammer the server.
   */
  private async refreshAfterMiss(what: string): Promise<void> {
    const now = this.now();
    if (now - (this.missAt.get(what) ?? 0) < 5000) return;
    this.missAt.set(what, now);
    if (this.missAt.size > 10_000) this.missAt.clear();
    this.forcedSyncs = this.forcedSyncs.filter((t) => now - t < 1000);
    if (this.forcedSyncs.length >= 10) return this.refreshIfOlder(1000);
    this.forcedSyncs.push(now);
    await this.refresh();
  }

  private async sync(): Promise<boolean> {
    const activity = this.opts.drainActivity();
    try {
      const t = await this.opts.control.syncGateway({ gatewayId: this.opts.gatewayId, endpoint: this.opts.endpoint(), activity });
      this.install(t);
      this.serverReachable = true;
      return true;
    } catch (e) {
      this.opts.restoreActivity(activity);
      if (this.serverReachable) this.opts.log('route sync failed; serving from the cached table', { error: (e as Error).message });
      else if (!this.table) this.opts.log('route sync failed; no route table yet', { error: (e as Error).message });
      this.serverReachable = false;
      return false;
    } finally {
      this.lastSyncAt = this.now();
    }
  }

  private install(t: RouteTable): void {
    if (!this.accessKey || this.table?.accessTokenKey !== t.accessTokenKey) this.accessKey = createPublicKey(t.accessTokenKey);
    const keys: UserKey[] = [];
    for (const u of t.users) {
      for (const line of u.keys) {
        const k = ssh2.utils.parseKey(line);
        if (k instanceof Error || Array.isArray(k)) continue;
        keys.push({ subject: u.subject, algo: k.type, blob: k.getPublicSSH(), key: k });
      }
    }
    this.table = t;
    this.keys = keys;
  }

  /** The private host key every gateway presents on its SSH port. */
  gatewayHostKey(): string {
    return this.requireTable().gatewayHostKey;
  }

  /** Whether the cached agent tokens are still valid (false: the server has been away too long). */
  usable(): boolean {
    return !!this.table && this.table.expiresAt > this.now();
  }

  private requireTable(): RouteTable {
    if (!this.table) throw new Error('no route table yet');
    return this.table;
  }

  /** The user a public key belongs to, with the parsed key to verify signatures. */
  userByKey(algo: string, blob: Buffer): { subject: string; key: ssh2.ParsedKey } | undefined {
    const k = this.keys.find((x) => x.algo === algo && x.blob.equals(blob));
    return k ? { subject: k.subject, key: k.key } : undefined;
  }

  /** Verifies a server-signed access token of the given use (a CLI bearer token by default); its claims, or null. */
  verifyAccessToken(token: string, use: AccessTokenUse = 'access'): AccessClaims | null {
    if (!this.accessKey) return null;
    return verifyAccessToken(token, this.accessKey, this.now(), use);
  }

  /** Redeems a sign-in link at the server (which records it, so it works once, anywhere). */
  redeemSignIn(token: string): Promise<BrowserSession> {
    return this.opts.control.redeemSignIn(token);
  }

  private membership(subject: string, orgId: string) {
    return this.table?.users.find((u) => u.subject === subject)?.memberships.find((m) => m.orgId === orgId);
  }

  /** What `subject` may do with a box (the server's rule, from the cached memberships and shares). */
  accessTo(subject: string, box: RouteBox): BoxAccess {
    return gatewayAccess(this.membership(subject, box.orgId), subject, box);
  }

  /**
   * The box a user means by `name` (`box`, or `box.owner` for another user's box shared with them),
   * when the user may connect to it: their own box of that name first, else the only one they may
   * connect to. Unknown and not allowed look the same (undefined).
   */
  connectableBox(subject: string, name: string): RouteBox | undefined {
    const [box, owner] = name.split('.', 2) as [string, string | undefined];
    const candidates = (this.table?.boxes ?? []).filter((b) => b.name === box && (owner === undefined || b.owner === owner) && mayConnect(this.accessTo(subject, b)));
    return candidates.find((b) => b.owner === subject) ?? (candidates.length === 1 ? candidates[0] : undefined);
  }

  boxById(id: string): RouteBox | undefined {
    return this.table?.boxes.find((b) => b.id === id);
  }

  /**
   * The box a preview of `name`:`port` points to for `viewer`: the viewer's own box of that name,
   * else the one box of that name whose port is org-visible (names are unique per owner only).
   */
  previewBox(viewer: string, name: string, port: number): RouteBox | undefined {
    const own = this.connectableBox(viewer, name);
    if (own) return own;
    const shared = (this.table?.boxes ?? []).filter(
      (b) => b.name === name && mayOpenPort(this.accessTo(viewer, b), !!this.membership(viewer, b.orgId), b.ports.find((p) => p.port === port)?.visibility ?? 'private'),
    );
    return shared.length === 1 ? shared[0] : undefined;
  }

  /** Asks the server to start or resume a box for `subject`. */
  wake(boxId: string, subject: string): Promise<{ phase: string; desiredState: string }> {
    return this.opts.control.wakeBox(boxId, subject);
  }
}
