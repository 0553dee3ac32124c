/**
 * Domain errors carry a stable code and know nothing of HTTP; the server's edge handler maps each
 * code to a status and a problem+json body.
 */
export type DomainErrorCode =
  | 'invalid-input'
  | 'not-found'
  | 'conflict'
  | 'invalid-state'
  | 'precondition-failed'
  | 'unauthenticated'
  | 'forbidden'
  | 'no-capacity'
  | 'quota-exceeded'
  | 'too-many-requests'
  | 'stale-lease'
  | 'unavailable'
  | 'internal';

export class DomainError extends Error {
  /** Stable machine-readable code, e.g. `invalid-state`. */
  readonly code: DomainErrorCode;
  /** Structured details for the client: the offending field, the current phase, … */
  readonly details: Record<string, unknown>;

  constructor(code: DomainErrorCode, message: string, details: Record<string, unknown> = {}) {
    super(message);
    this.name = 'DomainError';
    this.code = code;
    this.details = details;
  }
}

export function isDomainError(e: unknown): e is DomainError {
  return e instanceof DomainError;
}
