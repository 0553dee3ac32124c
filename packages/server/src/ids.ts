import { randomBytes } from 'node:crypto';

/** Sortable, URL- and hostname-safe ids: a prefix, the time in base 36, then randomness. */
export function newId(prefix: string): string {
  return `${prefix}_${Date.now().toString(36)}${randomBytes(8).toString('hex')}`;
}
