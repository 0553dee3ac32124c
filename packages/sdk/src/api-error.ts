/** An error answered by the API as problem+json, or a failure to reach it. */
export class ApiError extends Error {
  constructor(
    /** HTTP status; 0 when the server could not be reached. */
    readonly status: number,
    /** The problem's stable code, e.g. `invalid-state`, or `unreachable`. */
    readonly code: string,
    message: string,
    /** The whole problem body. */
    readonly problem: Record<string, unknown> = {},
  ) {
    super(message);
    this.name = 'ApiError';
  }
}
