/** The handlers of every route in the route table, by operationId. Thin: parse, call a service, map. */
import { BOX_PAGE_DEFAULT, type CreateBoxRequest, type ListBoxesQuery, type MoveBoxRequest } from '@devyard/api/box-schemas';
import type { BoxStatusReport, PrebuildReport, RegisterNodeRequest } from '@devyard/api/node-schemas';
import { buildOpenApiDocument } from '@devyard/api/openapi-document';
import type { CreateTemplateRequest } from '@devyard/api/template-schemas';
import type { Verb } from '@devyard/core/box-lifecycle';
import { DomainError } from '@devyard/core/domain-error';
import type { AddSshKeyRequest, PortVisibility, SignInRequest } from '@devyard/api/access-schemas';
import type { GatewaySyncRequest } from '@devyard/api/gateway-schemas';
import type { ChangeFeed } from '../change-feed.js';
import type { QuotaService } from '../services/quota-service.js';
import type { TenancyService } from '../services/tenancy-service.js';
import type { TenancyStore } from '../store/tenancy-store.js';
import { createTenancyHandlers } from './tenancy-handlers.js';
import type { AccessService } from '../services/access-service.js';
import { DEFAULT_ORG_ID, WARM_POOL_OWNER, type BoxService, type Subject } from '../services/box-service.js';
import { toApiBox, toApiEvent, toApiNode, toApiTemplate } from '../services/box-views.js';
import type { NodeService } from '../services/node-service.js';
import type { TemplateService } from '../services/template-service.js';
import type { BoxListing, BoxRecord } from '../store/box-records.js';
import type { Store } from '../store/store.js';
import { etag, parseIfMatch, type HandlerContext, type Handlers } from './create-app.js';
import { openSse, type SseStream } from './sse-stream.js';
import { decodeBoxPageToken, encodeBoxPageToken } from './box-page-tokens.js';
import type { WatchSlots } from './watch-slots.js';
import type { SecretService } from '../secrets/secret-service.js';
import { createSecretHandlers } from './secret-handlers.js';
import type { AuditLog } from '../audit/audit-log.js';
import { createAuditHandlers } from './audit-handlers.js';
import { setAuditOrg } from './audit-hook.js';
import type { OidcLogin } from '../identity/oidc-login.js';
import { createOidcHandlers } from './oidc-handlers.js';

export interface HandlerDeps {
  store: Store;
  feed: ChangeFeed;
  boxes: BoxService;
  templates: TemplateService;
  nodes: NodeService;
  access: AccessService;
  now: () => number;
  /** The audit log: read by the audit routes. */
  audit: AuditLog;
  /** Secrets. */
  secrets: SecretService;
  /** Users, organizations, teams, tokens. */
  tenancy: TenancyService;
  tenancyStore: TenancyStore;
  quotas: QuotaService;
  /** OIDC sign-in; undefined when the server has no provider configured. */
  oidc?: OidcLogin;
  /**
   * Base URL clients reach this server at (configured, else the listen URL): the OpenAPI
   * document's `servers`. Never derived from a request's Host header, which the caller chooses.
   */
  publicUrl: () => string;
  /** Open watch streams per user. */
  watchSlots: WatchSlots;
}

/** How often an open watch checks that its token still stands (revocation ends it within this plus a query). */
const WATCH_RECHECK_MS = 2_000;

/** Events read per query while a stream catches up. */
const EVENT_BATCH = 500;

/** Nodes are the installation's, not a tenant's: only admins of the default (operator) organization see them. */
function operatorsOnly(subject: Subject): void {
  if (subject.kind !== 'system' && subject.orgId !== DEFAULT_ORG_ID) throw new DomainError('forbidden', 'nodes are managed by the admins of the default organization', {});
}

const isWatch = (q: Record<string, unknown>) => q.watch === '1' || q.watch === 'true';

/** The event id a reconnecting stream resumes after: decimal digits only, like the ids it was sent. */
function lastEventId(header: string | string[] | undefined): number | undefined {
  if (header === undefined) return undefined;
  if (typeof header !== 'string' || !/^(0|[1-9][0-9]{0,14})$/.test(header)) {
    throw new DomainError('invalid-input', 'Last-Event-ID must be the decimal id of an event this stream sent', { field: 'Last-Event-ID' });
  }
  return Number(header);
}

/** Idempotency keys are stored with the box they created: one value of printable ASCII. */
const IDEMPOTENCY_KEY = /^[\x20-\x7e]{1,200}$/;

export function createHandlers(d: HandlerDeps): Handlers {
  // The document depends only on the route table and the configured URL: built and serialized
  // once, on first use (it is some 90 KB, and anyone may ask for it).
  let openApi: string | undefined;
  const nodeNames = async () => new Map((await d.store.listNodes()).map((n) => [n.id, n.name]));
  /** Names of fork sources by id (a source row outlives its deletion, so the name stays known). */
  const forkSourceNames = async (boxes: readonly BoxListing[]) => {
    const names = new Map<string, string>();
    for (const id of new Set(boxes.map((b) => b.forkOf).filter((id): id is string => id !== null))) {
      const src = boxes.find((b) => b.id === id) ?? (await d.store.getBoxListing(id));
      if (src) names.set(id, src.name);
    }
    return names;
  };
  const nodeName = async (id: string | null) => (id ? ((await d.store.getNode(id))?.name ?? null) : null);
  const view = async (b: BoxListing) =>
    toApiBox(b, await nodeName(b.nodeId), {
      forkOf: b.forkOf ? (await forkSourceNames([b])).get(b.forkOf) : undefined,
      movingFrom: (await nodeName(b.moveFromNodeId)) ?? undefined,
    });

  /** Answers a box with its ETag (the version), as every box-returning route does. */
  const withEtag = async (ctx: HandlerContext, b: BoxRecord) => {
    void ctx.reply.header('etag', etag(b.version));
    return view(b);
  };

  /** `?owner=` addresses another user's box (shared with the caller, or the caller administers the org). */
  const owner = (ctx: HandlerContext) => ctx.query.owner as string | undefined;
  const visible = async (subject: Subject, b: BoxListing) => b.owner !== WARM_POOL_OWNER && b.orgId === subject.orgId && (await d.boxes.accessOf(subject, b)) !== 'none';

  const verb = (v: Verb) => async (ctx: HandlerContext) => {
    const box = await d.boxes.applyVerb(ctx.subject, ctx.params.name!, v, parseIfMatch(ctx.req.headers['if-match']), owner(ctx));
    void ctx.reply.header('location', `/v1/boxes/${box.name}`);
    return withEtag(ctx, box);
  };

  /** The node in the path must be the one the agent registered; node tokens are not per node yet. */
  /** The node of the path, which must be the caller itself (its own credential). */
  const nodeParam = async (ctx: HandlerContext) => {
    d.nodes.requireSelf(ctx.subject.name, ctx.params.id!);
    return (await d.nodes.requireNode(ctx.params.id!)).id;
  };

  /**
   * A watch stream, holding one of the caller's watch slots while it is open: a user cannot open
   * streams without limit, and a closed stream (or one that failed to open) gives its slot back.
   * The caller is authenticated again every WATCH_RECHECK_MS: a revoked token, a user who left the
   * organization or was disabled ends the stream, and a changed role or team set applies to what
   * it shows from then on (`who()`).
   */
  const watching = async (ctx: HandlerContext, body: (sse: SseStream, who: () => Subject) => Promise<void>) => {
    const release = d.watchSlots.take(ctx.subject);
    let subject = ctx.subject;
    let recheck: NodeJS.Timeout | undefined;
    try {
      const sse = openSse(ctx.req, ctx.reply);
      recheck = setInterval(() => {
        d.tenancy.reauthenticate(subject).then(
          (now) => {
            if (now) return void (subject = now);
            sse.send('error', { code: 'unauthenticated', detail: 'this watch ended: its token no longer stands (revoked, expired, or its user left the organization)' });
            sse.close();
          },
          (e: Error) => ctx.req.log.warn({ err: e.message }, 'watch: checking the token again failed; the stream stays open until the next check'),
        );
      }, WATCH_RECHECK_MS);
      await body(sse, () => subject);
    } finally {
      clearInterval(recheck);
      release();
    }
  };

  /**
   * Box events as they are recorded. Each change sends only the events after the stream's cursor,
   * and checks who may see them per box of those events: the cost of a change does not grow with
   * the number of boxes in the organization.
   */
  const watchEvents = async (ctx: HandlerContext, filter: { boxId?: string }) => {
    const lastId = lastEventId(ctx.req.headers['last-event-id']);
    await watching(ctx, async (sse, who) => {
      let cursor = lastId !== undefined ? lastId : filter.boxId ? 0 : await d.store.lastEventId();
      let busy: Promise<void> = Promise.resolve();
      const flush = () => {
        busy = busy.then(async () => {
          if (filter.boxId) {
            // The route checked access when the stream opened; a box the caller can no longer see
            // (a share removed, a team left) ends the stream before anything more of it is sent.
            const b = await d.store.getBoxListing(filter.boxId);
            if (!b || !(await visible(who(), b))) return sse.close();
          }
          for (;;) {
            const events = await d.store.listEvents({ afterId: cursor, ...filter, limit: EVENT_BATCH });
            // A box route was authorized already; the organization's stream shows the boxes the caller may see.
            const shown = new Map<string, boolean>();
            for (const e of events) {
              if (!filter.boxId && !shown.has(e.boxId)) {
                const b = await d.store.getBoxListing(e.boxId);
                shown.set(e.boxId, b !== undefined && (await visible(who(), b)));
              }
              if (filter.boxId || shown.get(e.boxId)) sse.send('event', toApiEvent(e), e.id);
              cursor = e.id;
            }
            if (events.length < EVENT_BATCH) return;
          }
        });
      };
      const onBox = (b: BoxRecord) => {
        if (filter.boxId ? b.id === filter.boxId : b.orgId === who().orgId) flush();
      };
      d.feed.on('box', onBox);
      flush();
      await sse.closed;
      d.feed.off('box', onBox);
    });
  };

  return {
    ...createAuditHandlers(d.audit), // audit log
    ...createSecretHandlers(d.secrets), // secrets
    ...createOidcHandlers(d.oidc), // OIDC sign-in
    ...createTenancyHandlers(d), // users, tokens, organization, teams, shares, quotas
    healthz: async () => {
      await d.store.listNodes();
      return { status: 'ok' };
    },
    openapi: async (ctx) => {
      void ctx.reply.type('application/json; charset=utf-8');
      return (openApi ??= JSON.stringify(buildOpenApiDocument(d.publicUrl())));
    },

    createBox: async (ctx) => {
      const key = ctx.req.headers['idempotency-key'];
      if (Array.isArray(key) || (key !== undefined && !IDEMPOTENCY_KEY.test(key))) {
        throw new DomainError('invalid-input', 'Idempotency-Key must be one value of 1–200 printable ASCII characters', { field: 'Idempotency-Key' });
      }
      const { box, replayed } = await d.boxes.create(ctx.subject, ctx.body as CreateBoxRequest, key);
      void ctx.reply.header('location', `/v1/boxes/${box.name}`);
      if (replayed) void ctx.reply.header('idempotent-replayed', 'true');
      return withEtag(ctx, box);
    },
    listBoxes: async (ctx) => {
      const q = ctx.query as ListBoxesQuery;
      if (!isWatch(q)) {
        const page = await d.boxes.list(ctx.subject, { limit: q.limit ?? BOX_PAGE_DEFAULT, after: q.pageToken !== undefined ? decodeBoxPageToken(q.pageToken) : undefined });
        const names = await nodeNames();
        const sources = await forkSourceNames(page.items);
        return {
          items: page.items.map((b) =>
            toApiBox(b, b.nodeId ? (names.get(b.nodeId) ?? null) : null, {
              forkOf: b.forkOf ? sources.get(b.forkOf) : undefined,
              movingFrom: b.moveFromNodeId ? names.get(b.moveFromNodeId) : undefined,
            }),
          ),
          ...(page.next ? { nextPageToken: encodeBoxPageToken(page.next) } : {}),
        };
      }
      await watching(ctx, async (sse, who) => {
        // Each change sends that one box; the full list goes out once, when the stream opens.
        const onBox = async (b: BoxListing) => {
          if (await visible(who(), b)) sse.send('box', await view(b));
        };
        d.feed.on('box', onBox);
        for await (const b of d.boxes.listAll(who())) await onBox(b);
        await sse.closed;
        d.feed.off('box', onBox);
      });
      return undefined;
    },
    getBox: async (ctx) => withEtag(ctx, await d.boxes.get(ctx.subject, ctx.params.name!, { owner: owner(ctx) })),
    startBox: verb('start'),
    stopBox: verb('stop'),
    pauseBox: verb('pause'),
    resumeBox: verb('resume'),
    deleteBox: verb('delete'),
    forkBox: async (ctx) => {
      const boxes = await d.boxes.fork(ctx.subject, ctx.params.name!, ctx.body as { name: string; count: number }, owner(ctx));
      void ctx.reply.header('location', `/v1/boxes/${boxes[0]!.name}`);
      return { boxes: await Promise.all(boxes.map(view)) };
    },
    moveBox: async (ctx) => {
      const box = await d.boxes.move(ctx.subject, ctx.params.name!, ctx.body as MoveBoxRequest, owner(ctx));
      void ctx.reply.header('location', `/v1/boxes/${box.name}`);
      return withEtag(ctx, box);
    },
    listBoxEvents: async (ctx) => {
      const { box, events } = await d.boxes.events(ctx.subject, ctx.params.name!, owner(ctx));
      if (!isWatch(ctx.query)) return { items: events.map(toApiEvent) };
      await watchEvents(ctx, { boxId: box.id });
      return undefined;
    },
    createExecSession: async (ctx) => {
      const s = await d.boxes.createExecSession(ctx.subject, ctx.params.name!, owner(ctx));
      return { url: s.url, token: s.token, expiresAt: new Date(s.expiresAt).toISOString() };
    },
    watchEvents: async (ctx) => {
      await watchEvents(ctx, {});
      return undefined;
    },

    getBoxConnection: async (ctx) => d.access.connection(ctx.subject, ctx.params.name!, owner(ctx)),
    listBoxPorts: async (ctx) => ({ items: await d.access.listPorts(ctx.subject, ctx.params.name!, owner(ctx)) }),
    setBoxPort: async (ctx) => d.access.setPort(ctx.subject, ctx.params.name!, Number(ctx.params.port), (ctx.body as { visibility: PortVisibility }).visibility, owner(ctx)),
    resetBoxPort: async (ctx) => {
      await d.access.resetPort(ctx.subject, ctx.params.name!, Number(ctx.params.port), owner(ctx));
      return undefined;
    },
    listSshKeys: async (ctx) => ({ items: await d.access.listKeys(ctx.subject) }),
    createSshKeyChallenge: async (ctx) => d.access.keyChallenge(ctx.subject),
    addSshKey: async (ctx) => d.access.addKey(ctx.subject, ctx.body as AddSshKeyRequest),
    removeSshKey: async (ctx) => {
      await d.access.removeKey(ctx.subject, ctx.params.id!);
      return undefined;
    },
    createAccessToken: async (ctx) => {
      const body = ctx.body as { ttlSeconds: number; signIn?: SignInRequest };
      return d.access.createAccessToken(ctx.subject, body.ttlSeconds, body.signIn);
    },
    syncGateway: async (ctx) => d.access.sync(ctx.body as GatewaySyncRequest),
    wakeBox: async (ctx) => {
      const box = await d.access.wake(ctx.params.id!, (ctx.body as { subject: string }).subject);
      // Recorded in the box's organization, where its admins look (the gateway belongs to none).
      setAuditOrg(ctx.req, box.orgId);
      return view(box);
    },
    redeemSignIn: async (ctx) => d.access.redeemSignIn((ctx.body as { token: string }).token),

    createTemplate: async (ctx) => toApiTemplate(await d.templates.create(ctx.body as CreateTemplateRequest, ctx.subject.orgId)),
    listTemplates: async (ctx) => ({ items: (await d.templates.list(ctx.subject.orgId)).map(toApiTemplate) }),
    getTemplate: async (ctx) => toApiTemplate(await d.templates.get(ctx.params.name!, ctx.query.version as number | undefined, ctx.subject.orgId)),
    listTemplatePrebuilds: async (ctx) => {
      await d.templates.versions(ctx.params.name!, ctx.subject.orgId); // 404 for an unknown (or another organization's) template
      const names = await nodeNames();
      return {
        items: (await d.store.listPrebuilds(ctx.params.name!)).map((p) => ({
          id: p.id,
          template: p.template_name,
          templateVersion: Number(p.template_version),
          node: names.get(p.node_id) ?? p.node_id,
          commit: p.commit_sha,
          status: p.status as 'ready' | 'failed',
          error: p.error,
          logTail: JSON.parse(p.log_tail) as string[],
          finishedAt: new Date(Number(p.finished_at)).toISOString(),
        })),
      };
    },
    listTemplateVersions: async (ctx) => ({ items: (await d.templates.versions(ctx.params.name!, ctx.subject.orgId)).map(toApiTemplate) }),

    listNodes: async (ctx) => {
      operatorsOnly(ctx.subject);
      return { items: (await d.nodes.list()).map(({ node, boxes }) => toApiNode(node, d.now(), boxes)) };
    },
    cordonNode: async (ctx) => {
      operatorsOnly(ctx.subject);
      return toApiNode(await d.nodes.setCordoned(ctx.params.name!, true), d.now(), 0);
    },
    uncordonNode: async (ctx) => {
      operatorsOnly(ctx.subject);
      return toApiNode(await d.nodes.setCordoned(ctx.params.name!, false), d.now(), 0);
    },

    registerNode: async (ctx) => {
      const { node, leaseSeconds, credential } = await d.nodes.register(ctx.body as RegisterNodeRequest, ctx.subject.name);
      return { nodeId: node.id, leaseSeconds, sessionKey: node.sessionKey, credential };
    },
    heartbeatNode: async (ctx) => {
      const exp = await d.nodes.heartbeat(await nodeParam(ctx), (ctx.body as { images?: string[] }).images);
      return { leaseExpiresAt: new Date(exp).toISOString() };
    },
    getDesiredSet: async (ctx) => {
      const nodeId = await nodeParam(ctx);
      if (!isWatch(ctx.query)) return d.nodes.desiredSet(nodeId);
      const sse = openSse(ctx.req, ctx.reply);
      let timer: NodeJS.Timeout | undefined;
      const push = () => {
        // Coalesce bursts (a verb touches the box several times) into one snapshot.
        clearTimeout(timer);
        timer = setTimeout(async () => sse.send('desired', await d.nodes.desiredSet(nodeId)), 1);
      };
      const onNode = (id: string) => id === nodeId && push();
      d.feed.on('node', onNode);
      sse.send('desired', await d.nodes.desiredSet(nodeId));
      await sse.closed;
      clearTimeout(timer);
      d.feed.off('node', onNode);
      return undefined;
    },
    reportStatus: async (ctx) => {
      const nodeId = await nodeParam(ctx);
      const body = ctx.body as { reports: BoxStatusReport[]; prebuilds: PrebuildReport[] };
      await d.nodes.report(nodeId, body.reports);
      await d.nodes.reportPrebuilds(nodeId, body.prebuilds);
      return undefined;
    },
  } satisfies Record<string, (ctx: HandlerContext) => Promise<unknown>> as Handlers;
}

export type { Subject };
