/**
 * `devyard server`: the control plane in one process — store, API, reconciler. Stateless apart from
 * the store, so it can be killed at any point and restarted: work resumes from the store.
 */
import { join } from 'node:path';
import type { FastifyInstance } from 'fastify';
import { ensureBootstrapTokens, type BootstrapTokens } from './bootstrap-tokens.js';
import { ChangeFeed } from './change-feed.js';
import { createApp } from './http/create-app.js';
import { WatchSlots } from './http/watch-slots.js';
import { createHandlers } from './http/api-handlers.js';
import { ServerMetrics } from './http/server-metrics.js';
import { BoxReconciler, deadLocalHolder } from './loops/box-reconciler.js';
import { WarmPoolFiller } from './loops/warm-pool-filler.js';
import { AccessService } from './services/access-service.js';
import { QuotaService } from './services/quota-service.js';
import { DEFAULT_ORG_QUOTA, TenancyService, type OrgPolicy } from './services/tenancy-service.js';
import { TenancyStore } from './store/tenancy-store.js';
import { BoxService } from './services/box-service.js';
import { AccessStore } from './store/access-store.js';
import { NodeService } from './services/node-service.js';
import { TemplateService } from './services/template-service.js';
import { openSqliteDatabase } from './store/sqlite-database.js';
import { Store, type TemplateRecord } from './store/store.js';
import { isLoopbackRegistry, parseOciReference } from '@devyard/oci/oci-reference';
import { registryCredentialFiles } from '@devyard/oci/registry-credential-files';
import { RegistryClient } from '@devyard/oci/registry-client';
import type { RetryPolicy } from '@devyard/core/box-reconcile';
import { hostname } from 'node:os';
import { KeyringSource } from './secrets/secret-envelope.js';
import { SecretService, type SecretTenancy } from './secrets/secret-service.js';
import { SecretStore } from './store/secret-store.js';
import { AuditLog } from './audit/audit-log.js';
import { installAuditHook } from './http/audit-hook.js';
import { OidcLogin, type OidcOptions } from './identity/oidc-login.js';

export interface ControlPlaneOptions {
  /** Directory for the SQLite store and the bootstrap token files. */
  dataDir: string;
  host?: string;
  /** 0 picks a free port. */
  port?: number;
  logger?: boolean | object;
  retry?: RetryPolicy;
  now?: () => number;
  /** Registry hosts to reach over plain HTTP besides loopback ones (for pinning template images). */
  insecureRegistries?: string[];
  /** Warm pool size per template version (default: the template's `warmPoolSize`). */
  poolSize?: (t: TemplateRecord) => number;
  /** Lifetime of the agent tokens handed to gateways (how long they serve on with the server down). */
  gatewayTokenTtlMs?: number;
  /** Secrets: the KEK keyring (default: DEVYARD_KEK, else `<dataDir>/secrets/kek.keyring`) and the tenancy answers. */
  secrets?: { kek?: string; tenancy?: Partial<SecretTenancy> };
  /** Sign-in through an OpenID Connect provider (docs/identity.md). */
  oidc?: OidcOptions;
  /** Who may create organizations and the quota each new one gets (default: operators; DEFAULT_ORG_QUOTA). */
  orgs?: Partial<OrgPolicy>;
  /** Base URL browsers and CLIs reach this server at (default: the listen URL); the OIDC redirect URI and the OpenAPI document's `servers` derive from it. */
  publicUrl?: string;
  /** Watch streams one user may hold open at once (default DEFAULT_WATCHES_PER_USER); more are refused with 429. */
  watchesPerUser?: number;
}

export interface ControlPlane {
  url: string;
  app: FastifyInstance;
  store: Store;
  feed: ChangeFeed;
  reconciler: BoxReconciler;
  warmPools: WarmPoolFiller;
  boxes: BoxService;
  access: AccessService;
  tokens: BootstrapTokens;
  /** Secrets: write-only values, delivered to boxes in their nodes' desired sets. */
  secrets: SecretService;
  /** The audit log. */
  audit: AuditLog;
  /** Users, organizations, teams, tokens. */
  tenancy: TenancyService;
  /** Quotas. */
  quotas: QuotaService;
  /** OIDC sign-in, when configured. */
  oidc?: OidcLogin;
  close(): Promise<void>;
}

export async function startControlPlane(opts: ControlPlaneOptions): Promise<ControlPlane> {
  const now = opts.now ?? Date.now;
  const store = new Store(await openSqliteDatabase(join(opts.dataDir, 'devyard.db')));
  const feed = new ChangeFeed();
  const registry = new RegistryClient({
    insecure: (host) => isLoopbackRegistry(host, opts.insecureRegistries ?? []),
    credentials: registryCredentialFiles(join(opts.dataDir, 'secrets')),
  });
  const templates = new TemplateService(store, now, {
    imageResolver: { resolve: async (ref) => (await registry.resolve(parseOciReference(ref))).digest },
  });
  await templates.seedBuiltins();
  const tokens = await ensureBootstrapTokens(store, opts.dataDir, now());
  const tenancyStore = new TenancyStore(store.db);
  const tenancy = new TenancyService(store, tenancyStore, now, { creation: opts.orgs?.creation ?? 'operators', defaultQuota: opts.orgs?.defaultQuota ?? DEFAULT_ORG_QUOTA });
  const quotas = new QuotaService(store, tenancyStore);
  const boxes = new BoxService(store, feed, now, { tenancy: tenancyStore, quotas });
  const nodes = new NodeService(store, feed, now, opts.retry);
  const secrets = new SecretService({
    store,
    secrets: new SecretStore(store.db),
    keys: new KeyringSource({ dataDir: opts.dataDir, env: opts.secrets?.kek ?? process.env.DEVYARD_KEK, create: true, onReloadError: (m) => app.log.error(m) }),
    feed,
    now,
    tenancy: opts.secrets?.tenancy ?? {
      teamsOf: async (orgId, userName) => {
        const user = await tenancyStore.getUserByName(userName);
        return user ? (await tenancyStore.teamsOf(orgId, user.id)).map((t) => t.name) : [];
      },
      teamExists: async (orgId, team) => !!(await tenancyStore.getTeamByName(orgId, team)),
      orgOfBox: (b) => b.orgId,
    },
    log: (level, msg, fields) => app.log[level](fields ?? {}, msg),
  });
  nodes.secrets = secrets;
  tenancy.onMembershipChange = (orgId, userName) => void secrets.refreshUser(orgId, userName).catch((e: Error) => app.log.error({ err: e.message }, 'secrets: refreshing a user after a membership change failed'));
  const access = new AccessService(store, new AccessStore(store.db), boxes, now, {
    agentTokenTtlMs: opts.gatewayTokenTtlMs,
    principalByName: (name, orgId) => tenancy.principalByName(name, orgId),
    tenancy: tenancyStore,
  });
  const audit = new AuditLog(store, now);
  const publicUrl = () => opts.publicUrl ?? url;
  const oidc = opts.oidc && new OidcLogin(opts.oidc, { tenancy, now, publicUrl, audit: (e) => audit.append(e) });
  const app = createApp({ store, handlers: createHandlers({ store, feed, boxes, templates, nodes, access, now, audit, secrets, tenancy, tenancyStore, quotas, oidc, publicUrl, watchSlots: new WatchSlots(opts.watchesPerUser) }),
    principal: (row) => tenancy.principalForToken(row),
    logger: opts.logger,
  });
  installAuditHook(app, audit, store); // every mutating request is recorded
  const reconciler = new BoxReconciler(store, feed, now, {
    holder: `${hostname()}:${process.pid}`,
    holderIsDead: deadLocalHolder(hostname()),
    audit,
    retry: opts.retry,
    log: (msg, fields) => app.log.warn(fields ?? {}, msg),
    onError: () => metrics.reconcileErrors.inc(),
  });
  const metrics = new ServerMetrics(store, () => reconciler.queueDepth, now);
  metrics.install(app);
  nodes.onRunning = (createdAt) => metrics.createToRunning.observe((now() - createdAt) / 1000);
  const warmPools = new WarmPoolFiller(store, feed, boxes, {
    poolSize: opts.poolSize ?? ((t) => t.spec.warmPoolSize ?? 0),
    audit,
    log: (msg, fields) => app.log.warn(fields ?? {}, msg),
  });
  // Keys added to the keyring since the last start become current for every secret (on-start rewrap).
  await secrets.rewrapAll().then(
    (r) => r.rewrapped > 0 && app.log.info({ rewrapped: r.rewrapped, kekId: r.currentKekId }, 'secrets: data keys re-wrapped under the current KEK'),
    (e: Error) => app.log.error({ err: e.message }, 'secrets: re-wrapping data keys under the current KEK failed; they stay under their old keys'),
  );
  await app.listen({ host: opts.host ?? '127.0.0.1', port: opts.port ?? 0 });
  const addr = app.server.address();
  const port = typeof addr === 'object' && addr ? addr.port : opts.port;
  const url = `http://${opts.host && opts.host !== '0.0.0.0' ? opts.host : '127.0.0.1'}:${port}`;
  reconciler.start();
  warmPools.start();
  return {
    url,
    app,
    store,
    feed,
    reconciler,
    warmPools,
    boxes,
    access,
    tokens,
    audit,
    secrets,
    tenancy,
    quotas,
    oidc,
    async close() {
      await warmPools.stop();
      await reconciler.stop();
      // SSE watchers hold connections open; end them so close() does not wait for clients.
      app.server.closeAllConnections?.();
      await app.close();
      await store.close();
    },
  };
}
