/**
 * Access tokens for gateways: the server signs them with an Ed25519 key, gateways verify them with
 * the public half from their cached route table, offline. Unlike the node session tokens (HMAC with
 * a per-node secret), a gateway holds no secret that could mint tokens.
 *
 * One format, three uses, told apart by `use` so that none passes for another:
 *  - `access`: what the CLI sends as a bearer token (tunnels, `ssh --stdio`); it speaks for the user
 *    in everything the user may do through a gateway;
 *  - `sign-in`: the token in a browser sign-in link (`devyard open`), valid for a minute, redeemed
 *    once at the server through a gateway, for one scope (a box's terminal or one preview);
 *  - `session`: what a redeemed sign-in link becomes, kept in the browser's cookie; it opens only
 *    the scope of its link.
 */
import { createPublicKey, sign, verify, type KeyObject } from 'node:crypto';
import type { BrowserScope } from '@devyard/core/access-policy';

export type AccessTokenUse = 'access' | 'sign-in' | 'session';

export interface AccessClaims {
  /** The user (subject) the token speaks for. */
  sub: string;
  /** Always "devyard-gateway": tokens for other audiences are refused. */
  aud: 'devyard-gateway';
  /** Issued at, ms since epoch. */
  iat: number;
  /** Expiry, ms since epoch. */
  exp: number;
  /** What the token is for; absent in tokens signed before there were several uses, which are `access`. */
  use?: AccessTokenUse;
  /** What a `sign-in` or `session` token opens (and nothing else). */
  scope?: BrowserScope;
  /** Token id: the server records a redeemed sign-in link's id, so that each link works once. */
  jti?: string;
}

export const ACCESS_TOKEN_PREFIX = 'dya_';

/** How long a sign-in link may wait before it is used. */
export const SIGN_IN_LINK_TTL_MS = 60_000;

/** How long the browser session a sign-in link becomes lasts. */
export const BROWSER_SESSION_TTL_MS = 8 * 3600_000;

export function signAccessToken(claims: AccessClaims, privateKey: KeyObject): string {
  const payload = Buffer.from(JSON.stringify(claims)).toString('base64url');
  const sig = sign(null, Buffer.from(payload), privateKey).toString('base64url');
  return `${ACCESS_TOKEN_PREFIX}${payload}.${sig}`;
}

function validScope(s: unknown): s is BrowserScope {
  const o = s as Partial<{ kind: string; box: unknown; port: unknown }> | null;
  if (!o || typeof o.box !== 'string') return false;
  if (o.kind === 'terminal') return true;
  return o.kind === 'preview' && typeof o.port === 'number' && Number.isInteger(o.port) && o.port >= 1 && o.port <= 65535;
}

/**
 * Returns the claims, or null when the token is malformed, forged, for another audience, expired,
 * or not of the `use` asked for (a `sign-in` or `session` token also needs a scope and an id).
 */
export function verifyAccessToken(token: string, publicKey: KeyObject | string, now: number, use: AccessTokenUse = 'access'): AccessClaims | null {
  if (!token.startsWith(ACCESS_TOKEN_PREFIX)) return null;
  const [payload, sig] = token.slice(ACCESS_TOKEN_PREFIX.length).split('.');
  if (!payload || !sig) return null;
  const key = typeof publicKey === 'string' ? createPublicKey(publicKey) : publicKey;
  try {
    if (!verify(null, Buffer.from(payload), key, Buffer.from(sig, 'base64url'))) return null;
    const c = JSON.parse(Buffer.from(payload, 'base64url').toString()) as AccessClaims;
    if (c.aud !== 'devyard-gateway' || typeof c.sub !== 'string' || typeof c.exp !== 'number' || c.exp <= now) return null;
    if ((c.use ?? 'access') !== use) return null;
    if (use === 'access') return c.scope === undefined ? c : null;
    return validScope(c.scope) && typeof c.jti === 'string' && c.jti.length > 0 ? c : null;
  } catch {
    return null;
  }
}
