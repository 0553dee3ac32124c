/**
 * The one place where errors become HTTP: domain errors, validation errors and framework errors
 * are all answered as application/problem+json (RFC 9457) with a stable `code`.
 */
import type { DomainErrorCode } from '@devyard/core/domain-error';
import { DomainError } from '@devyard/core/domain-error';
import { ZodError } from 'zod';

const STATUS: Record<DomainErrorCode, number> = {
  'invalid-input': 400,
  unauthenticated: 401,
  forbidden: 403,
  'not-found': 404,
  conflict: 409,
  'invalid-state': 409,
  'precondition-failed': 412,
  'no-capacity': 409,
  'quota-exceeded': 403,
  'stale-lease': 409,
  unavailable: 503,
  internal: 500,
};

const TITLE: Record<number, string> = {
  400: 'Bad Request',
  401: 'Unauthorized',
  403: 'Forbidden',
  404: 'Not Found',
  405: 'Method Not Allowed',
  409: 'Conflict',
  412: 'Precondition Failed',
  413: 'Content Too Large',
  415: 'Unsupported Media Type',
  428: 'Precondition Required',
  500: 'Internal Server Error',
  503: 'Service Unavailable',
};

export interface Problem {
  type: string;
  title: string;
  status: number;
  detail: string;
  code: string;
  instance?: string;
  errors?: Array<{ field: string; message: string }>;
  [k: string]: unknown;
}

export function problem(status: number, code: string, detail: string, extra: Record<string, unknown> = {}): Problem {
  return { type: `https://devyard.dev/problems/${code}`, title: TITLE[status] ?? 'Error', status, detail, code, ...extra };
}

/** Converts anything thrown by a handler into a problem. Unknown errors hide their message. */
export function toProblem(err: unknown, where?: string): Problem {
  if (err instanceof DomainError) {
    const status = STATUS[err.code];
    const field = typeof err.details.field === 'string' ? err.details.field : undefined;
    return problem(status, err.code, err.message, { ...err.details, ...(field && !err.details.errors ? { errors: [{ field, message: err.message }] } : {}) });
  }
  if (err instanceof ZodError) {
    const errors = err.issues.map((i) => ({ field: [where, ...i.path.map(String)].filter(Boolean).join('.') || '(body)', message: i.message }));
    const first = errors[0]!;
    return problem(400, 'invalid-input', `${first.field}: ${first.message}`, { errors });
  }
  const e = err as { statusCode?: number; code?: string; message?: string };
  if (typeof e?.statusCode === 'number' && e.statusCode >= 400 && e.statusCode < 500) {
    // Fastify's own client errors: malformed JSON, body too large, wrong content type.
    const code = e.code === 'FST_ERR_CTP_BODY_TOO_LARGE' ? 'body-too-large' : e.code === 'FST_ERR_CTP_INVALID_MEDIA_TYPE' ? 'unsupported-media-type' : 'invalid-input';
    return problem(e.statusCode, code, e.message ?? 'bad request');
  }
  return problem(500, 'internal', 'internal error; see the server log');
}
