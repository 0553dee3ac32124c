/**
 * Builds the Fastify app from the route table in `@devyard/api/routes`: every route is validated
 * with its zod schemas, authenticated per its `auth`, and answered by the handler of the same
 * operationId. Routes without a handler fail at start-up, not at request time.
 */
import Fastify, { type FastifyBaseLogger, type FastifyInstance, type FastifyReply, type FastifyRequest } from 'fastify';
import { ROUTES, type OperationId, type RouteDef } from '@devyard/api/routes';
import { DomainError } from '@devyard/core/domain-error';
import type { Store } from '../store/store.js';
import type { TokenRow } from '../store/tenancy-store.js';
import { requirePermission } from '../services/tenancy-service.js';
import { hashToken } from '../token-hash.js';
import { DEFAULT_ORG_ID, type Subject } from '../services/box-service.js';
import { problem, toProblem } from './problem-details.js';

export interface HandlerContext {
  req: FastifyRequest;
  reply: FastifyReply;
  subject: Subject;
  params: Record<string, string>;
  query: Record<string, unknown>;
  body: unknown;
}

/** A handler returns the body (sent with the route's status) or takes over the reply itself (SSE). */
export type Handler = (ctx: HandlerContext) => Promise<unknown>;

export type Handlers = Record<OperationId, Handler>;

export interface AppOptions {
  store: Store;
  handlers: Handlers;
  /** Who a user token speaks for: its user, organization, role and teams; throws when refused. */
  principal: (row: TokenRow) => Promise<Subject>;
  logger?: boolean | object;
}

const ANONYMOUS: Subject = { name: 'anonymous', kind: 'user', orgId: DEFAULT_ORG_ID, role: 'member', teamIds: [] };

/**
 * The one place every request is authenticated and checked against its route's organization
 * permission (resource rules, e.g. a box's owner and shares, are applied by the services).
 */
async function authenticate(opts: AppOptions, req: FastifyRequest, route: RouteDef): Promise<Subject> {
  // The audit hook's actor and org (http/audit-hook.ts): known before the scope and permission
  // checks, so a refusal is audited with the full subject.
  const known = (s: Subject) => (Object.assign(req, { devyardSubject: s }), s);
  if (route.auth === 'none') return known(ANONYMOUS);
  const header = req.headers.authorization;
  const m = header ? /^Bearer\s+(\S+)$/i.exec(header) : null;
  if (!m) throw new DomainError('unauthenticated', 'missing bearer token (set DEVYARD_TOKEN or run `devyard up`)');
  const row = await opts.store.findTokenByHash(hashToken(m[1]!));
  if (!row) throw new DomainError('unauthenticated', 'invalid or revoked token');
  if (row.kind !== route.auth) throw new DomainError('forbidden', `a ${row.kind} token cannot call ${route.operationId}`);
  if (row.kind !== 'user') return known({ name: row.subject, kind: row.kind as Subject['kind'], orgId: DEFAULT_ORG_ID, role: 'member', teamIds: [] });
  const subject = known(await opts.principal(row));
  if (subject.scopes && !subject.scopes.includes('write') && route.method !== 'GET') {
    throw new DomainError('forbidden', `this token is read-only (scopes: ${subject.scopes.join(', ')})`, { scopes: subject.scopes });
  }
  if (route.permission) requirePermission(subject, route.permission);
  return subject;
}

export function createApp(opts: AppOptions): FastifyInstance {
  // maxParamLength: secret names are up to 128 characters (fastify's default cuts path parameters at 100).
  const common = { bodyLimit: 1024 * 1024, requestIdHeader: 'x-request-id', routerOptions: { maxParamLength: 256 } } as const;
  // Fastify takes a ready logger (pino instance) under a different option than a logger config.
  const app = (
    opts.logger && typeof (opts.logger as { info?: unknown }).info === 'function'
      ? Fastify({ ...common, loggerInstance: opts.logger as FastifyBaseLogger })
      : Fastify({ ...common, logger: opts.logger ?? false })
  ) as unknown as FastifyInstance;

  // Verbs are POSTs without a body; clients often still send the JSON content type.
  app.removeContentTypeParser('application/json');
  app.addContentTypeParser('application/json', { parseAs: 'string' }, (_req, body, done) => {
    const text = String(body);
    if (text.trim() === '') return done(null, undefined);
    try {
      done(null, JSON.parse(text));
    } catch {
      done(Object.assign(new Error('request body is not valid JSON'), { statusCode: 400 }), undefined);
    }
  });

  app.setErrorHandler((err, req, reply) => {
    const p = toProblem(err);
    if (p.status >= 500) req.log.error({ err }, 'request failed');
    void reply.status(p.status).type('application/problem+json').send({ ...p, instance: req.url });
  });
  app.setNotFoundHandler((req, reply) => {
    void reply
      .status(404)
      .type('application/problem+json')
      .send({ ...problem(404, 'not-found', `no route ${req.method} ${req.url.split('?')[0]}`), instance: req.url });
  });

  for (const route of ROUTES as readonly RouteDef[]) {
    const handler = opts.handlers[route.operationId as OperationId];
    if (!handler) throw new Error(`route ${route.operationId} has no handler`);
    app.route({
      method: route.method,
      url: route.path.replace(/\{(\w+)\}/g, ':$1'),
      handler: async (req, reply) => {
        const subject = await authenticate(opts, req, route);
        const parse = (schema: RouteDef['params'] | RouteDef['body'], value: unknown, where: string) => {
          if (!schema) return value;
          const r = schema.safeParse(value ?? {});
          if (!r.success) throw Object.assign(r.error, { where });
          return r.data;
        };
        let params: unknown;
        let query: unknown;
        let body: unknown;
        try {
          params = parse(route.params, req.params, 'path');
          query = parse(route.query, req.query, 'query');
          body = parse(route.body, req.body, '');
        } catch (e) {
          throw toProblemError(e);
        }
        const result = await handler({ req, reply, subject, params: params as Record<string, string>, query: query as Record<string, unknown>, body });
        if (reply.sent || reply.raw.headersSent) return reply;
        if (route.status === 204) return reply.status(204).send();
        return reply.status(route.status).send(result);
      },
    });
  }
  return app;
}

/** Keeps the zod error (mapped by toProblem) but names the part of the request it is about. */
function toProblemError(e: unknown): unknown {
  const where = (e as { where?: string }).where;
  if (!where) return e;
  const p = toProblem(e, where);
  return new DomainError('invalid-input', p.detail, { errors: p.errors, field: p.errors?.[0]?.field });
}

/** Parses an If-Match header carrying a box ETag (`"v7"`); undefined when absent or `*`. */
export function parseIfMatch(header: string | string[] | undefined): number | undefined {
  if (header === undefined) return undefined;
  const v = Array.isArray(header) ? header[0]! : header;
  if (v.trim() === '*') return undefined;
  const m = /^(?:W\/)?"v(\d+)"$/.exec(v.trim());
  if (!m) throw new DomainError('invalid-input', 'If-Match must be an ETag returned by the API, e.g. "v3"', { field: 'If-Match' });
  return Number(m[1]);
}

export function etag(version: number): string {
  return `"v${version}"`;
}
