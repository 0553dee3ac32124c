/**
 * Short-lived session tokens: the server signs, the node agent (and later the gateway) verifies
 * offline with the node's key, so open and new sessions keep working while the server is down.
 */
import { createHmac, timingSafeEqual } from 'node:crypto';

export interface SessionClaims {
  /** Box the session is for. */
  boxId: string;
  /** Who asked for it. */
  sub: string;
  /** Expiry, ms since epoch. */
  exp: number;
}

export function signSessionToken(claims: SessionClaims, key: string): string {
  const payload = Buffer.from(JSON.stringify(claims)).toString('base64url');
  const mac = createHmac('sha256', key).update(payload).digest('base64url');
  return `${payload}.${mac}`;
}

/** Returns the claims, or null when the token is malformed, forged or expired. */
export function verifySessionToken(token: string, key: string, now: number): SessionClaims | null {
  const [payload, mac] = token.split('.');
  if (!payload || !mac) return null;
  const want = createHmac('sha256', key).update(payload).digest();
  const got = Buffer.from(mac, 'base64url');
  if (got.length !== want.length || !timingSafeEqual(got, want)) return null;
  try {
    const claims = JSON.parse(Buffer.from(payload, 'base64url').toString()) as SessionClaims;
    if (typeof claims.exp !== 'number' || claims.exp <= now || typeof claims.boxId !== 'string') return null;
    return claims;
  } catch {
    return null;
  }
}
