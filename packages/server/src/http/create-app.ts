/**
 * Builds the Fastify app from the route table in `@devyard/api/routes`: every route is validated
 * with its zod schemas, authenticated per its `auth`, and answered by the handler of the same
 * operationId. Routes without a handler fail at start-up, not at request time.
 */
import { randomUUID } from 'node:crypto';
import { STATUS_CODES, type IncomingMessage } from 'node:http';
import type { Duplex } from 'node:stream';
import Fastify, { type FastifyBaseLogger, type FastifyInstance, type FastifyReply, type FastifyRequest } from 'fastify';
import { ROUTES, type OperationId, type RouteDef } from '@devyard/api/routes';
import { DomainError } from '@devyard/core/domain-error';
import type { Store } from '../store/store.js';
import type { TokenRow } from '../store/tenancy-store.js';
import { requirePermission } from '../services/tenancy-service.js';
import { hashToken } from '../token-hash.js';
import { DEFAULT_ORG_ID, type Subject } from '../services/box-service.js';
import { echo, problem, toProblem, type Problem } from './problem-details.js';

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

/** Largest request body. */
export const MAX_BODY_BYTES = 1024 * 1024;
/** Longest request target (path and query); longer ones answer 414. */
export const MAX_URL_LENGTH = 8 * 1024;
/** Largest request head (request line and headers, as Node counts it); larger ones answer 431. */
export const MAX_HEADER_BYTES = 16 * 1024;
/** Longest path parameter: secret names are up to 128 characters, every other parameter is shorter. */
export const MAX_PARAM_LENGTH = 256;

/**
 * X-Request-ID values kept as the request's id (in logs and audit entries, and echoed back): short
 * and of a charset that cannot break a log line or a header. Anything else gets a generated id.
 */
const REQUEST_ID = /^[A-Za-z0-9._:+/=-]{1,128}$/;

function requestId(req: IncomingMessage): string {
  const h = req.headers['x-request-id'];
  return typeof h === 'string' && REQUEST_ID.test(h) ? h : randomUUID();
}

/** The request target as a problem's `instance`: clipped, so a long URL is not answered at length. */
const instanceOf = (url: string) => echo(url, 256);

/**
 * Answers an error Node's HTTP parser found before Fastify saw a request (a head over the size
 * limit, an unparsable request line or header, a timeout) with problem+json on the raw socket.
 */
function onClientError(error: Error, socket: Duplex): void {
  // Node adds the parser's error code and the bytes it choked on.
  const err = error as Error & { code?: string; rawPacket?: unknown };
  if (err.code === 'ECONNRESET' || socket.destroyed) return;
  let p: Problem;
  if (err.code === 'HPE_HEADER_OVERFLOW') {
    // The request line alone over the URL limit is a URL too long, not a header too large.
    const head = Buffer.isBuffer(err.rawPacket) ? err.rawPacket.subarray(0, MAX_HEADER_BYTES + 1).toString('latin1') : '';
    const lineEnd = head.indexOf('\r\n');
    const urlTooLong = (lineEnd < 0 ? head.length : lineEnd) > MAX_URL_LENGTH;
    p = urlTooLong
      ? problem(414, 'uri-too-long', `the request target is longer than ${MAX_URL_LENGTH} bytes`)
      : problem(431, 'header-too-large', `the request line and headers are larger than ${MAX_HEADER_BYTES} bytes`);
  } else if (err.code === 'ERR_HTTP_REQUEST_TIMEOUT') {
    p = problem(408, 'request-timeout', 'the request was not received in time');
  } else {
    p = problem(400, 'bad-request', 'the request is not valid HTTP/1.1');
  }
  if (socket.writable) {
    const body = JSON.stringify(p);
    socket.write(
      `HTTP/1.1 ${p.status} ${STATUS_CODES[p.status]}\r\nContent-Type: application/problem+json; charset=utf-8\r\nContent-Length: ${Buffer.byteLength(body)}\r\nConnection: close\r\n\r\n${body}`,
    );
  }
  socket.destroy(err);
}

export function createApp(opts: AppOptions): FastifyInstance {
  const common = {
    bodyLimit: MAX_BODY_BYTES,
    http: { maxHeaderSize: MAX_HEADER_BYTES },
    // The id comes from genReqId, which checks X-Request-ID first; Fastify would take any value.
    requestIdHeader: false,
    genReqId: requestId,
    clientErrorHandler: onClientError,
    routerOptions: { maxParamLength: MAX_PARAM_LENGTH },
    // Errors the router finds before a route runs (bad percent-encoding, an over-long parameter)
    // are answered by the same mapping as every other error.
    frameworkErrors: (err: Error, req: FastifyRequest, reply: FastifyReply) => sendProblem(req, reply, toProblem(err)),
  } as const;
  // Fastify takes a ready logger (pino instance) under a different option than a logger config.
  const app = (
    opts.logger && typeof (opts.logger as { info?: unknown }).info === 'function'
      ? Fastify({ ...common, loggerInstance: opts.logger as FastifyBaseLogger })
      : Fastify({ ...common, logger: opts.logger ?? false })
  ) as unknown as FastifyInstance;

  // Fastify's JSON parser (secure-json-parse) refuses `__proto__` and `constructor.prototype` keys,
  // which would otherwise reach record schemas (env, labels) and replace the result's prototype.
  const parseJson = app.getDefaultJsonParser('error', 'error');
  app.removeContentTypeParser('application/json');
  app.addContentTypeParser('application/json', { parseAs: 'string' }, (req, body, done) => {
    const text = String(body);
    // Verbs are POSTs without a body; clients often still send the JSON content type.
    if (text.trim() === '') return done(null, undefined);
    parseJson(req, text, (err, value) => {
      if (!err) return done(null, value);
      let valid = true;
      try {
        JSON.parse(text);
      } catch {
        valid = false;
      }
      const message = valid ? 'request body has a __proto__ or constructor.prototype key' : 'request body is not valid JSON';
      done(Object.assign(new Error(message), { statusCode: 400 }), undefined);
    });
  });

  app.addHook('onRequest', async (req, reply) => {
    void reply.header('x-request-id', req.id);
    if (req.url.length > MAX_URL_LENGTH) return sendProblem(req, reply, problem(414, 'uri-too-long', `the request target is longer than ${MAX_URL_LENGTH} bytes`));
  });

  app.setErrorHandler((err, req, reply) => {
    const p = toProblem(err);
    if (p.status >= 500) req.log.error({ err }, 'request failed');
    sendProblem(req, reply, p);
  });
  app.setNotFoundHandler((req, reply) => {
    sendProblem(req, reply, problem(404, 'not-found', `no route ${req.method} ${echo(req.url.split('?')[0]!)}`));
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
  return new DomainError('invalid-input', p.detail, { errors: p.errors, field: p.errors?.[0]?.field, ...(p.errorsOmitted ? { errorsOmitted: p.errorsOmitted } : {}) });
}

function sendProblem(req: FastifyRequest, reply: FastifyReply, p: Problem): FastifyReply {
  return reply.status(p.status).type('application/problem+json').send({ ...p, instance: instanceOf(req.url) });
}

/** Parses an If-Match header carrying a box ETag (`"v7"`); undefined when absent or `*`. */
export function parseIfMatch(header: string | string[] | undefined): number | undefined {
  if (header === undefined) return undefined;
  const v = Array.isArray(header) ? header[0]! : header;
  if (v.trim() === '*') return undefined;
  const m = /^(?:W\/)?"v(\d{1,15})"$/.exec(v.trim());
  if (!m) throw new DomainError('invalid-input', 'If-Match must be an ETag returned by the API, e.g. "v3"', { field: 'If-Match' });
  return Number(m[1]);
}

export function etag(version: number): string {
  return `"v${version}"`;
}
