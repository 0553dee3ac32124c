/** API tokens are stored as SHA-256 hashes: a copy of the database does not yield usable tokens. */
import { createHash } from 'node:crypto';

export function hashToken(token: string): string {
  return createHash('sha256').update(token).digest('hex');
}
