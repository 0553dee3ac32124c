/**
 * Page tokens of box lists: the position after the last box of a page (its creation time and id),
 * base64url-encoded so that clients pass it back as they got it and never build one.
 */
import { DomainError } from '@devyard/core/domain-error';
import type { BoxCursor } from '../store/store.js';

export function encodeBoxPageToken(c: BoxCursor): string {
  return Buffer.from(`${c.createdAt}.${c.id}`, 'latin1').toString('base64url');
}

export function decodeBoxPageToken(token: string): BoxCursor {
  const m = /^(0|[1-9][0-9]{0,14})\.([a-z]_[0-9a-z]{1,60})$/.exec(Buffer.from(token, 'base64url').toString('latin1'));
  if (!m) throw new DomainError('invalid-input', 'pageToken must be a nextPageToken this server returned', { field: 'pageToken' });
  return { createdAt: Number(m[1]), id: m[2]! };
}
