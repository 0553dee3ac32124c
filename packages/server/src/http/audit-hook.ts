/**
 * Records every mutating API request in the audit log: one `onResponse` hook over the route table,
 * so a new POST/PUT/PATCH/DELETE route is audited without anyone remembering to. Refused requests
 * (missing or bad token, wrong token kind, validation errors, oversized bodies) are recorded too:
 * they reached a route, and who tried what matters most when it was refused.
 *
 * Not recorded, on purpose: the agents' `reportStatus` and `heartbeatNode` and the gateways'
 * `syncGateway`. Every node and every gateway calls them every few seconds for as long as it runs;
 * an entry per call would bury the entries people look for and grow the chain without bound. They
 * report observations, not decisions: what they lead to (a box placed, failed, deleted) is recorded
 * by the reconciler as `system:box-reconciler`. `registerNode` and `wakeBox` are recorded. Reads
 * (GET) are not mutations and are not recorded.
 */
import type { FastifyInstance, FastifyRequest } from 'fastify';
import { ROUTES, type RouteDef } from '@devyard/api/routes';
import type { AuditLog, AuditResult } from '../audit/audit-log.js';
import { DEFAULT_ORG_ID, type Subject } from '../services/box-service.js';
import type { Store } from '../store/store.js';
import { hashToken } from '../token-hash.js';

/**
 * Routes not recorded here: the high-frequency machine routes (see above), and the CLI's sign-in
 * redemption, which the sign-in records itself under the user's name (here it would be anonymous).
 */
export const UNAUDITED_OPERATIONS: ReadonlySet<string> = new Set(['reportStatus', 'heartbeatNode', 'syncGateway', 'redeemOidcLogin']);

const MUTATING = new Set(['POST', 'PUT', 'PATCH', 'DELETE']);

/** Path segments that name a collection, and what one member of it is called in a target. */
const MEMBER: Record<string, string> = {
  boxes: 'box',
  templates: 'template',
  nodes: 'node',
  keys: 'key',
  ports: 'port',
  'access-tokens': 'access-token',
  'exec-sessions': 'exec-session',
  secrets: 'secret',
  tokens: 'token',
  orgs: 'org',
  members: 'member',
  'service-accounts': 'service-account',
  teams: 'team',
  shares: 'share',
  quotas: 'quota',
};

/** Collections whose create request names the new member in `body.name`. */
const NAMED_BY_BODY = new Set(['box', 'template', 'node', 'org', 'team', 'service-account']);

const clip = (s: string) => (s.length > 200 ? `${s.slice(0, 200)}…` : s);

/**
 * Names the organization a request affected when it is not the caller's own (an organization
 * created or joined, a box woken for a user, another organization's trust or quota): its entry
 * belongs in that organization's log, where its admins and auditors look.
 */
export function setAuditOrg(req: FastifyRequest, orgId: string): void {
  Object.assign(req, { devyardAuditOrg: orgId });
}

/**
 * The subject create-app authenticated for this request (it sets `devyardSubject` right after
 * authenticating), or undefined when authentication failed or never ran.
 */
export function requestSubject(req: FastifyRequest): Subject | undefined {
  return (req as FastifyRequest & { devyardSubject?: Subject }).devyardSubject;
}

export function auditResult(status: number): AuditResult {
  if (status < 400) return 'ok';
  if (status === 401 || status === 403 || status === 404) return 'denied';
  return 'error';
}

/**
 * What a request acted on, from its route: `box/<name>`, `box/<name>/port/<port>`, `key/<id>`,
 * `node/<id>`; for a create without path parameters the collection and, where the body names the
 * new member, its name (`template/web`).
 */
export function auditTarget(route: RouteDef, params: unknown, body: unknown): string | null {
  const p = (params ?? {}) as Record<string, unknown>;
  const parts: string[] = [];
  let collection: string | undefined;
  let afterParam = false;
  for (const seg of route.path.split('/').filter(Boolean)) {
    const m = /^\{(\w+)\}$/.exec(seg);
    if (m) {
      const value = clip(String(p[m[1]!] ?? ''));
      // `/secrets/{scope}/{name}` reads `secret/<scope>/<name>`.
      parts.push(collection ? `${collection}/${value}` : afterParam ? value : `${m[1]}/${value}`);
      collection = undefined;
      afterParam = true;
    } else {
      collection = MEMBER[seg];
      afterParam = false;
    }
  }
  if (parts.length > 0) return parts.join('/');
  if (!collection) return null;
  const name = body && typeof body === 'object' ? (body as { name?: unknown }).name : undefined;
  return NAMED_BY_BODY.has(collection) && typeof name === 'string' && name !== '' ? `${collection}/${clip(name)}` : collection;
}

/**
 * Who stands behind a refused request's bearer token, when the token exists: a token refused for
 * its kind, scope, role, expiry or revocation still names its subject, and that is the actor.
 * Unknown or missing tokens answer undefined (the actor is then `anonymous`).
 */
async function tokenHolder(store: Store, req: FastifyRequest): Promise<{ name: string; orgId: string; tokenId: string } | undefined> {
  const header = req.headers.authorization;
  const m = typeof header === 'string' ? /^Bearer\s+(\S+)$/i.exec(header) : null;
  if (!m) return undefined;
  const row = await store.findTokenByHash(hashToken(m[1]!));
  if (!row) return undefined;
  return { name: row.subject, orgId: (row as { org_id?: string | null }).org_id ?? DEFAULT_ORG_ID, tokenId: row.id };
}

/** Installs the hooks; call once, after createApp and before listen. */
export function installAuditHook(app: FastifyInstance, audit: AuditLog, store: Store): void {
  const audited = new Map<string, RouteDef>();
  for (const r of ROUTES as readonly RouteDef[]) {
    if (MUTATING.has(r.method) && !UNAUDITED_OPERATIONS.has(r.operationId)) audited.set(`${r.method} ${r.path.replace(/\{(\w+)\}/g, ':$1')}`, r);
  }
  const routeOf = (req: FastifyRequest) => (req.routeOptions.url ? audited.get(`${req.method} ${req.routeOptions.url}`) : undefined);
  const problemCodes = new WeakMap<FastifyRequest, string>();

  // The problem's `code` is only in the serialized body; keep it for the entry.
  app.addHook('onSend', async (req, reply, payload) => {
    if (reply.statusCode >= 400 && typeof payload === 'string' && routeOf(req)) {
      try {
        const code = (JSON.parse(payload) as { code?: unknown }).code;
        if (typeof code === 'string') problemCodes.set(req, code);
      } catch {}
    }
    return payload;
  });

  app.addHook('onResponse', async (req, reply) => {
    const route = routeOf(req);
    if (!route) return;
    const status = reply.statusCode;
    const result = auditResult(status);
    const detail: Record<string, unknown> = {};
    if (result !== 'ok') Object.assign(detail, { status, code: problemCodes.get(req) ?? null });
    let subject: Pick<Subject, 'name' | 'orgId'> | undefined = requestSubject(req);
    if (!subject && result !== 'ok') {
      const holder = await tokenHolder(store, req).catch(() => undefined);
      if (holder) {
        subject = holder;
        detail.tokenId = holder.tokenId; // refused before authentication completed
      }
    }
    // A gateway wakes a box for a user: the gateway is the actor, the user who connected is context.
    const onBehalfOf = route.auth === 'gateway' ? (req.body as { subject?: unknown } | undefined)?.subject : undefined;
    if (typeof onBehalfOf === 'string') detail.onBehalfOf = clip(onBehalfOf);
    try {
      await audit.append({
        orgId: (req as FastifyRequest & { devyardAuditOrg?: string }).devyardAuditOrg ?? subject?.orgId ?? DEFAULT_ORG_ID,
        actor: subject?.name ?? 'anonymous',
        action: route.operationId,
        target: auditTarget(route, req.params, req.body),
        requestId: String(req.id),
        source: req.ip,
        result,
        detail: Object.keys(detail).length > 0 ? detail : null,
      });
    } catch (err) {
      // The response is gone already; an audit store failure must be loud, not silent.
      req.log.error({ err, operationId: route.operationId, requestId: req.id }, 'audit append failed');
    }
  });
}
