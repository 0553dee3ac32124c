/**
 * The one place where errors become HTTP: domain errors, validation errors and framework errors
 * are all answered as application/problem+json (RFC 9457) with a stable `code`.
 */
import type { DomainErrorCode } from '@devyard/core/domain-error';
import { DomainError } from '@devyard/core/domain-error';
import { MAX_REPORTED_ERRORS } from '@devyard/api/common-schemas';
import { escapeUnsafeText } from '@devyard/api/input-schemas';
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
  'too-many-requests': 429,
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
  408: 'Request Timeout',
  409: 'Conflict',
  412: 'Precondition Failed',
  413: 'Content Too Large',
  414: 'URI Too Long',
  415: 'Unsupported Media Type',
  428: 'Precondition Required',
  429: 'Too Many Requests',
  431: 'Request Header Fields Too Large',
  500: 'Internal Server Error',
  503: 'Service Unavailable',
};

/** Codes of the framework's client errors that are not about the request's content. */
const FRAMEWORK_CODES: Record<string, string> = {
  FST_ERR_CTP_BODY_TOO_LARGE: 'body-too-large',
  FST_ERR_CTP_INVALID_MEDIA_TYPE: 'unsupported-media-type',
  FST_ERR_MAX_PARAM_LENGTH: 'uri-too-long',
};

export interface Problem {
  type: string;
  title: string;
  status: number;
  detail: string;
  code: string;
  instance?: string;
  errors?: Array<{ field: string; message: string }>;
  errorsOmitted?: number;
  [k: string]: unknown;
}

export function problem(status: number, code: string, detail: string, extra: Record<string, unknown> = {}): Problem {
  return { type: `https://devyard.dev/problems/${code}`, title: TITLE[status] ?? 'Error', status, detail, code, ...extra };
}

/** Longest field name and message a problem repeats back: they may quote what the caller sent. */
const MAX_ECHO = 200;

/**
 * Input quoted in a problem: clipped to a few hundred characters, with controls, line breaks, bidi
 * overrides and lone surrogates escaped (`\u202e`), so a problem printed by a CLI or written to a
 * log reads as what was sent.
 */
export function echo(text: string, max = MAX_ECHO): string {
  return escapeUnsafeText(text.length > max ? `${text.slice(0, max)}…` : text);
}

/** Converts anything thrown by a handler into a problem. Unknown errors hide their message. */
export function toProblem(err: unknown, where?: string): Problem {
  if (err instanceof DomainError) {
    const status = STATUS[err.code];
    const field = typeof err.details.field === 'string' ? err.details.field : undefined;
    return problem(status, err.code, err.message, { ...err.details, ...(field && !err.details.errors ? { errors: [{ field, message: err.message }] } : {}) });
  }
  if (err instanceof ZodError) {
    // One error per element of a large array would turn a 200 KB body into megabytes of answer:
    // the first few are enough to fix a request, and the count says how many more there were.
    const issues = err.issues.slice(0, MAX_REPORTED_ERRORS);
    const errors = issues.map((i) => ({ field: echo([where, ...i.path.map(String)].filter(Boolean).join('.') || '(body)'), message: echo(i.message) }));
    const first = errors[0]!;
    const omitted = err.issues.length - issues.length;
    return problem(400, 'invalid-input', `${first.field}: ${first.message}`, { errors, ...(omitted > 0 ? { errorsOmitted: omitted } : {}) });
  }
  const e = err as { statusCode?: number; code?: string; message?: string };
  if (typeof e?.statusCode === 'number' && e.statusCode >= 400 && e.statusCode < 500) {
    // Fastify's own client errors: malformed JSON, body too large, wrong content type, bad URLs.
    return problem(e.statusCode, FRAMEWORK_CODES[e.code ?? ''] ?? 'invalid-input', echo(e.message ?? 'bad request'));
  }
  return problem(500, 'internal', 'internal error; see the server log');
}
