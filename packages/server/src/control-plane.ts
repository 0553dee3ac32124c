/**
 * `devyard server`: the control plane in one process — store, API, reconciler. Stateless apart from
 * the store, so it can be killed at any point and restarted: work resumes from the store.
 */
import { join } from 'node:path';
import type { FastifyInstance } from 'fastify';
import { ensureBootstrapTokens, type BootstrapTokens } from './bootstrap-tokens.js';
import { ChangeFeed } from './change-feed.js';
import { createApp } from './http/create-app.js';
import { createHandlers } from './http/api-handlers.js';
import { ServerMetrics } from './http/server-metrics.js';
import { BoxReconciler, deadLocalHolder } from './loops/box-reconciler.js';
import { WarmPoolFiller } from './loops/warm-pool-filler.js';
import { AccessService } from './services/access-service.js';
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
  const boxes = new BoxService(store, feed, now);
  const nodes = new NodeService(store, feed, now, opts.retry);
  const access = new AccessService(store, new AccessStore(store.db), boxes, now, { agentTokenTtlMs: opts.gatewayTokenTtlMs });
  const app = createApp({ store, handlers: createHandlers({ store, feed, boxes, templates, nodes, access, now }), logger: opts.logger });
  const reconciler = new BoxReconciler(store, feed, now, {
    holder: `${hostname()}:${process.pid}`,
    holderIsDead: deadLocalHolder(hostname()),
    retry: opts.retry,
    log: (msg, fields) => app.log.warn(fields ?? {}, msg),
    onError: () => metrics.reconcileErrors.inc(),
  });
  const metrics = new ServerMetrics(store, () => reconciler.queueDepth, now);
  metrics.install(app);
  nodes.onRunning = (createdAt) => metrics.createToRunning.observe((now() - createdAt) / 1000);
  const warmPools = new WarmPoolFiller(store, feed, boxes, {
    poolSize: opts.poolSize ?? ((t) => t.spec.warmPoolSize ?? 0),
    log: (msg, fields) => app.log.warn(fields ?? {}, msg),
  });
  await app.listen({ host: opts.host ?? '127.0.0.1', port: opts.port ?? 0 });
  const addr = app.server.address();
  const port = typeof addr === 'object' && addr ? addr.port : opts.port;
  reconciler.start();
  warmPools.start();
  return {
    url: `http://${opts.host && opts.host !== '0.0.0.0' ? opts.host : '127.0.0.1'}:${port}`,
    app,
    store,
    feed,
    reconciler,
    warmPools,
    boxes,
    access,
    tokens,
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
