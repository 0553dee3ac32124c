/**
 * Access tokens for gateways: the server signs them with an Ed25519 key, gateways verify them with
 * the public half from their cached route table, offline. Unlike the node session tokens (HMAC with
 * a per-node secret), a gateway holds no secret that could mint tokens.
 */
import { createPublicKey, sign, verify, type KeyObject } from 'node:crypto';

export interface AccessClaims {
  /** The user (subject) the token speaks for. */
  sub: string;
  /** Always "devyard-gateway": tokens for other audiences are refused. */
  aud: 'devyard-gateway';
  /** Issued at, ms since epoch. */
  iat: number;
  /** Expiry, ms since epoch. */
  exp: number;
}

export const ACCESS_TOKEN_PREFIX = 'dya_';

export function signAccessToken(claims: AccessClaims, privateKey: KeyObject): string {
  const payload = Buffer.from(JSON.stringify(claims)).toString('base64url');
  const sig = sign(null, Buffer.from(payload), privateKey).toString('base64url');
  return `${ACCESS_TOKEN_PREFIX}${payload}.${sig}`;
}

/** Returns the claims, or null when the token is malformed, forged, for another audience or expired. */
export function verifyAccessToken(token: string, publicKey: KeyObject | string, now: number): AccessClaims | null {
  if (!token.startsWith(ACCESS_TOKEN_PREFIX)) return null;
  const [payload, sig] = token.slice(ACCESS_TOKEN_PREFIX.length).split('.');
  if (!payload || !sig) return null;
  const key = typeof publicKey === 'string' ? createPublicKey(publicKey) : publicKey;
  try {
    if (!verify(null, Buffer.from(payload), key, Buffer.from(sig, 'base64url'))) return null;
    const c = JSON.parse(Buffer.from(payload, 'base64url').toString()) as AccessClaims;
    if (c.aud !== 'devyard-gateway' || typeof c.sub !== 'string' || typeof c.exp !== 'number' || c.exp <= now) return null;
    return c;
  } catch {
    return null;
  }
}
