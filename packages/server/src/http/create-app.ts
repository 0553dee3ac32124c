/**
 * Builds the Fastify app from the route table in `@devyard/api/routes`: every route is validated
 * with its zod schemas, authenticated per its `auth`, and answered by the handler of the same
 * operationId. Routes without a handler fail at start-up, not at request time.
 */
import { createHash } from 'node:crypto';
import Fastify, { type FastifyBaseLogger, type FastifyInstance, type FastifyReply, type FastifyRequest } from 'fastify';
import { ROUTES, type OperationId, type RouteDef } from '@devyard/api/routes';
import { DomainError } from '@devyard/core/domain-error';
import type { Store } from '../store/store.js';
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
  logger?: boolean | object;
}

export function hashToken(token: string): string {
  return createHash('sha256').update(token).digest('hex');
}

async function authenticate(store: Store, req: FastifyRequest, route: RouteDef): Promise<Subject> {
  if (route.auth === 'none') return { name: 'anonymous', kind: 'user', orgId: DEFAULT_ORG_ID };
  const header = req.headers.authorization;
  const m = header ? /^Bearer\s+(\S+)$/i.exec(header) : null;
  if (!m) throw new DomainError('unauthenticated', 'missing bearer token (set DEVYARD_TOKEN or run `devyard up`)');
  const row = await store.findTokenByHash(hashToken(m[1]!));
  if (!row) throw new DomainError('unauthenticated', 'invalid or revoked token');
  if (row.kind !== route.auth) throw new DomainError('forbidden', `a ${row.kind} token cannot call ${route.operationId}`);
  return { name: row.subject, kind: row.kind as Subject['kind'], orgId: DEFAULT_ORG_ID };
}

export function createApp(opts: AppOptions): FastifyInstance {
  const common = { bodyLimit: 1024 * 1024, requestIdHeader: 'x-request-id' } as const;
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
        const subject = await authenticate(opts.store, req, route);
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
