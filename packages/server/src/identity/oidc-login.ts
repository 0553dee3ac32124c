/**
 * Sign-in through an external OpenID Connect provider: authorization code with PKCE (S256), state
 * and nonce, done by openid-client, which also validates the ID token (signature against the
 * provider's JWKS, issuer, audience, expiry, nonce). A successful sign-in maps the provider's claims
 * to a Devyard user (created at first sign-in, a member of the default organization) and issues
 * that user a login token.
 *
 * The pending flows (state → PKCE verifier, nonce, where to deliver the token) live in this
 * process's memory: they last minutes and are used once, so a restart mid-sign-in only costs the
 * user a retry, and nothing about a half-finished sign-in ever reaches the store.
 *
 * `devyard login` receives the result on a loopback listener, and any local process could listen on
 * a loopback port or craft a sign-in link naming its own: so the browser carries only a one-time
 * code there, redeemed within two minutes with the CLI's own PKCE verifier (whose S256 challenge
 * started the sign-in). The login token is issued at redemption, to the holder of the verifier.
 */
import { createHash, randomBytes } from 'node:crypto';
import * as client from 'openid-client';
import { DomainError } from '@devyard/core/domain-error';
import type { AuditEntryInput } from '../audit/audit-log.js';
import type { Subject } from '../services/box-service.js';
import type { UserRow } from '../store/tenancy-store.js';

/** How the server reaches its OpenID provider (`devyard server --oidc-*`). */
export interface OidcOptions {
  /** Issuer URL; its `/.well-known/openid-configuration` is read at the first sign-in. HTTPS, or HTTP on loopback. */
  issuer: string;
  /** Client id registered at the provider. */
  clientId: string;
  /** Client secret (sent with client_secret_basic); without one the client is public and PKCE alone protects the code. */
  clientSecret?: string;
  /** Redirect URI registered at the provider (default: `<public URL>/v1/auth/oidc/callback`). */
  redirectUri?: string;
  /** Scopes requested (default: openid profile email). */
  scopes?: string[];
  /** Which claims name the user. */
  claims?: {
    /** Claim for the user name (default `preferred_username`, falling back to the email, then `sub`). */
    username?: string;
    /** Claim for the email address (default `email`). */
    email?: string;
  };
}

/** What OidcLogin needs from tenancy (TenancyService has it). */
export interface OidcTenancy {
  /** The user an identity maps to, created at first sign-in as a member of the default organization. */
  upsertOidcUser(claims: { issuer: string; subject: string; preferredName: string; email: string | null }): Promise<UserRow>;
  /** The user acting in an organization, or undefined when not a member. */
  principal(user: UserRow, orgId: string): Promise<Subject | undefined>;
  /** A token for the signed-in user, in the organization. */
  issueLoginToken(user: UserRow, orgId: string, ttlSeconds: number): Promise<string>;
}

/** Where a sign-in started: the provider URL to send the browser to, and the cookie that binds the flow to that browser. */
export interface OidcLoginStart {
  /** The provider's authorization URL. */
  authorizationUrl: string;
  /** Cookie name and value to set on the browser that started the flow. */
  cookie: { name: string; value: string; maxAgeSeconds: number };
}

/** A finished sign-in. */
export interface OidcLoginResult {
  /** The new login token (`dy_u_…`), shown once. */
  token: string;
  /** Devyard user name the identity maps to. */
  user: string;
  /** Whether this sign-in created the user. */
  firstLogin: boolean;
  /** When the token expires (epoch ms). */
  expiresAt: number;
  /** The CLI's loopback URL to send the one-time code to, if the sign-in came from `devyard login`. */
  cli?: { url: string; code: string };
  /** Name of the flow's browser cookie, to clear. */
  cookieName: string;
}

interface PendingFlow {
  verifier: string;
  nonce: string;
  browserKey: string;
  cli?: { url: string; challenge: string };
  expiresAt: number;
}

/** A finished CLI sign-in waiting for the CLI to redeem its code. */
interface Redeemable {
  user: UserRow;
  challenge: string;
  expiresAt: number;
}

/** A redeemed CLI sign-in. */
export interface OidcCliToken {
  token: string;
  user: string;
  expiresAt: number;
}

/** Organization a signed-in user's token acts in. */
export const LOGIN_ORG_ID = 'org_default';
/** Lifetime of a login token. */
export const LOGIN_TOKEN_TTL_SECONDS = 12 * 3600;
/** How long a started sign-in may take. */
export const FLOW_TTL_MS = 10 * 60_000;
/** How long the CLI has to redeem its one-time code. */
export const CLI_CODE_TTL_MS = 2 * 60_000;
/** A PKCE S256 challenge: base64url of 32 bytes. */
const S256_CHALLENGE = /^[A-Za-z0-9_-]{43}$/;
/** Bound on pending flows: starting one needs no credentials, so memory must not grow with requests. */
const MAX_PENDING = 2000;
/** Name prefix of the cookie binding a flow to the browser that started it. */
export const FLOW_COOKIE_PREFIX = 'dy_oidc_';

const isLoopbackHost = (h: string) => h === '127.0.0.1' || h === 'localhost' || h === '[::1]';

/**
 * The CLI's callback URL, if it is one a token may be sent to: plain HTTP on 127.0.0.1 or localhost
 * with an explicit port. Anything else could hand the token to another machine.
 */
export function parseCliCallback(raw: string): URL {
  let url: URL;
  try {
    url = new URL(raw);
  } catch {
    throw new DomainError('invalid-input', 'cli must be a URL such as http://127.0.0.1:PORT/callback', { field: 'cli' });
  }
  if (raw.length > 2048 || url.protocol !== 'http:' || (url.hostname !== '127.0.0.1' && url.hostname !== 'localhost') || url.port === '' || url.username !== '' || url.password !== '') {
    throw new DomainError('invalid-input', 'cli must be a loopback URL, http://127.0.0.1:PORT/… or http://localhost:PORT/… (the token is only ever delivered to this machine)', { field: 'cli' });
  }
  url.hash = '';
  return url;
}

function invalid(message: string, details: Record<string, unknown> = {}): DomainError {
  return new DomainError('invalid-input', message, details);
}

export class OidcLogin {
  private readonly pending = new Map<string, PendingFlow>();
  private readonly redeemable = new Map<string, Redeemable>();
  private config?: Promise<client.Configuration>;
  private readonly issuerUrl: URL;

  constructor(
    private readonly opts: OidcOptions,
    private readonly deps: {
      tenancy: OidcTenancy;
      now: () => number;
      /** The server's public base URL (known once it listens), for the default redirect URI. */
      publicUrl: () => string;
      /** Records sign-ins and refused callbacks in the audit log. */
      audit?: (entry: AuditEntryInput) => Promise<unknown>;
    },
  ) {
    try {
      this.issuerUrl = new URL(opts.issuer);
    } catch {
      throw new Error(`OIDC issuer "${opts.issuer}" is not a URL`);
    }
    if (this.issuerUrl.protocol !== 'https:' && !(this.issuerUrl.protocol === 'http:' && isLoopbackHost(this.issuerUrl.hostname))) {
      throw new Error(`OIDC issuer "${opts.issuer}" must use https (plain http is accepted on loopback only)`);
    }
    if (!opts.clientId) throw new Error('OIDC needs a client id (--oidc-client-id)');
  }

  /** The server's public base URL, as browsers and the CLI reach it. */
  get serverUrl(): string {
    return this.deps.publicUrl().replace(/\/+$/, '');
  }

  /** The redirect URI registered at the provider. */
  get redirectUri(): string {
    return this.opts.redirectUri ?? `${this.serverUrl}/v1/auth/oidc/callback`;
  }

  /**
   * The provider's configuration, discovered at first use rather than at start-up so that the
   * control plane starts while the provider is down; a failed discovery is retried next time.
   */
  private configuration(): Promise<client.Configuration> {
    if (!this.config) {
      const insecure = this.issuerUrl.protocol === 'http:';
      this.config = client
        .discovery(this.issuerUrl, this.opts.clientId, undefined, this.opts.clientSecret ? client.ClientSecretBasic(this.opts.clientSecret) : client.None(), {
          ...(insecure ? { execute: [client.allowInsecureRequests] } : {}),
          timeout: 10,
        })
        .catch((e: Error) => {
          this.config = undefined;
          throw new DomainError('unavailable', `cannot reach the OpenID provider ${this.opts.issuer} (${e.message})`, { issuer: this.opts.issuer });
        });
    }
    return this.config;
  }

  /**
   * Starts a sign-in; `cli` is the loopback URL of a waiting `devyard login`, if any, and
   * `cliChallenge` the S256 challenge of its verifier (required with `cli`).
   */
  async start(cli: string | undefined, cliChallenge?: string): Promise<OidcLoginStart> {
    let cliFlow: PendingFlow['cli'];
    if (cli !== undefined) {
      const url = parseCliCallback(cli).href;
      if (cliChallenge === undefined || !S256_CHALLENGE.test(cliChallenge)) {
        throw invalid('a CLI sign-in needs cli_challenge: the base64url SHA-256 of the verifier the CLI redeems its code with (PKCE S256)', { field: 'cli_challenge' });
      }
      cliFlow = { url, challenge: cliChallenge };
    } else if (cliChallenge !== undefined) throw invalid('cli_challenge goes with cli', { field: 'cli_challenge' });
    const config = await this.configuration();
    const verifier = client.randomPKCECodeVerifier();
    const state = client.randomState();
    const nonce = client.randomNonce();
    const browserKey = randomBytes(18).toString('base64url');
    this.prune();
    this.pending.set(state, { verifier, nonce, browserKey, cli: cliFlow, expiresAt: this.deps.now() + FLOW_TTL_MS });
    const url = client.buildAuthorizationUrl(config, {
      redirect_uri: this.redirectUri,
      scope: (this.opts.scopes ?? ['openid', 'profile', 'email']).join(' '),
      response_type: 'code',
      code_challenge: await client.calculatePKCECodeChallenge(verifier),
      code_challenge_method: 'S256',
      state,
      nonce,
    });
    return { authorizationUrl: url.href, cookie: { name: flowCookieName(state), value: browserKey, maxAgeSeconds: FLOW_TTL_MS / 1000 } };
  }

  /**
   * Finishes a sign-in from the provider's redirect: `query` is the callback's query string and
   * `cookies` the browser's cookies. Refuses (400) unknown, expired, replayed or foreign flows,
   * provider errors and codes the provider does not accept; nothing is created then.
   */
  async callback(query: URLSearchParams, cookies: Record<string, string>, request: { requestId?: string; source?: string } = {}): Promise<OidcLoginResult> {
    try {
      return await this.finish(query, cookies, request);
    } catch (e) {
      await this.deps.audit?.({
        orgId: LOGIN_ORG_ID,
        actor: 'anonymous',
        action: 'oidcLogin',
        target: null,
        result: e instanceof DomainError && e.code === 'unavailable' ? 'error' : 'denied',
        requestId: request.requestId ?? null,
        source: request.source ?? null,
        detail: { reason: (e as Error).message.slice(0, 300) },
      });
      throw e;
    }
  }

  private async finish(query: URLSearchParams, cookies: Record<string, string>, request: { requestId?: string; source?: string }): Promise<OidcLoginResult> {
    const state = query.get('state');
    if (!state) throw invalid('the sign-in answer has no state; start again with `devyard login`', { field: 'state' });
    const flow = this.pending.get(state);
    // Used once: a replayed or failed callback cannot be retried with the same state.
    this.pending.delete(state);
    if (!flow || flow.expiresAt <= this.deps.now()) {
      throw invalid('this sign-in is unknown, expired or already used; start again with `devyard login`', { field: 'state' });
    }
    const cookieName = flowCookieName(state);
    if (cookies[cookieName] !== flow.browserKey) {
      throw invalid('this sign-in was started in another browser; start again with `devyard login` and finish it in the same browser', { field: 'state' });
    }
    const providerError = query.get('error');
    if (providerError) {
      const desc = query.get('error_description');
      throw invalid(`the identity provider refused the sign-in: ${providerError}${desc ? ` (${desc})` : ''}`, { providerError });
    }
    if (!query.get('code')) throw invalid('the sign-in answer has no authorization code', { field: 'code' });

    const config = await this.configuration();
    const current = new URL(this.redirectUri);
    current.search = query.toString();
    let tokens: Awaited<ReturnType<typeof client.authorizationCodeGrant>>;
    try {
      tokens = await client.authorizationCodeGrant(config, current, { pkceCodeVerifier: flow.verifier, expectedState: state, expectedNonce: flow.nonce, idTokenExpected: true });
    } catch (e) {
      throw providerFailure(e, this.opts.issuer);
    }
    const idClaims = tokens.claims();
    if (!idClaims) throw invalid('the identity provider returned no ID token');
    const usernameClaim = this.opts.claims?.username ?? 'preferred_username';
    const emailClaim = this.opts.claims?.email ?? 'email';
    let claims: Record<string, unknown> = { ...idClaims };
    // Providers often keep profile claims out of the ID token and answer them at userinfo.
    if ((claims[usernameClaim] === undefined || claims[emailClaim] === undefined) && config.serverMetadata().userinfo_endpoint && tokens.access_token) {
      try {
        const info = await client.fetchUserInfo(config, tokens.access_token, idClaims.sub);
        claims = { ...info, ...claims };
      } catch (e) {
        throw providerFailure(e, this.opts.issuer);
      }
    }
    const str = (v: unknown) => (typeof v === 'string' && v.trim() !== '' ? v.trim() : undefined);
    const email = str(claims[emailClaim]) ?? null;
    const preferredName = str(claims[usernameClaim]) ?? email ?? idClaims.sub;

    const before = this.deps.now();
    const user = await this.deps.tenancy.upsertOidcUser({ issuer: idClaims.iss, subject: idClaims.sub, preferredName, email });
    if (user.disabled_at !== null && user.disabled_at !== undefined) throw new DomainError('forbidden', `the Devyard user "${user.name}" is disabled`, { user: user.name });
    if (!(await this.deps.tenancy.principal(user, LOGIN_ORG_ID))) {
      throw new DomainError('forbidden', `the Devyard user "${user.name}" is not a member of the organization; ask an admin to add them`, { user: user.name });
    }
    const firstLogin = Number(user.created_at) >= before;
    let cli: OidcLoginResult['cli'];
    let token = '';
    if (flow.cli) {
      // The token is issued when the CLI redeems the code with its verifier, not here.
      const code = randomBytes(24).toString('base64url');
      this.prune();
      this.redeemable.set(code, { user, challenge: flow.cli.challenge, expiresAt: this.deps.now() + CLI_CODE_TTL_MS });
      cli = { url: flow.cli.url, code };
    } else token = await this.deps.tenancy.issueLoginToken(user, LOGIN_ORG_ID, LOGIN_TOKEN_TTL_SECONDS);
    await this.deps.audit?.({
      orgId: LOGIN_ORG_ID,
      actor: user.name,
      action: 'oidcLogin',
      target: `user/${user.name}`,
      result: 'ok',
      requestId: request.requestId ?? null,
      source: request.source ?? null,
      detail: { issuer: idClaims.iss, firstLogin, cli: flow.cli !== undefined },
    });
    return { token, user: user.name, firstLogin, expiresAt: this.deps.now() + LOGIN_TOKEN_TTL_SECONDS * 1000, cli, cookieName };
  }

  /**
   * The CLI redeems its one-time code with its PKCE verifier: the login token, once. An unknown,
   * expired or spent code, or a wrong verifier (the code is spent then too), is refused (400).
   */
  async redeem(code: string, verifier: string, request: { requestId?: string; source?: string } = {}): Promise<OidcCliToken> {
    const entry = this.redeemable.get(code);
    this.redeemable.delete(code);
    const refuse = async (why: string) => {
      await this.deps.audit?.({ orgId: LOGIN_ORG_ID, actor: 'anonymous', action: 'redeemOidcLogin', target: null, result: 'denied', requestId: request.requestId ?? null, source: request.source ?? null, detail: { reason: why } });
      return invalid(`${why}; run \`devyard login\` again`, { field: 'code' });
    };
    if (!entry || entry.expiresAt <= this.deps.now()) throw await refuse('this sign-in code is unknown, expired or already used');
    if (createHash('sha256').update(verifier).digest('base64url') !== entry.challenge) throw await refuse('the verifier does not match the sign-in that produced this code');
    const token = await this.deps.tenancy.issueLoginToken(entry.user, LOGIN_ORG_ID, LOGIN_TOKEN_TTL_SECONDS);
    await this.deps.audit?.({ orgId: LOGIN_ORG_ID, actor: entry.user.name, action: 'redeemOidcLogin', target: `user/${entry.user.name}`, result: 'ok', requestId: request.requestId ?? null, source: request.source ?? null, detail: {} });
    return { token, user: entry.user.name, expiresAt: this.deps.now() + LOGIN_TOKEN_TTL_SECONDS * 1000 };
  }

  /** Number of sign-ins started and not yet finished or expired (for tests and metrics). */
  get pendingCount(): number {
    this.prune();
    return this.pending.size;
  }

  private prune(): void {
    const now = this.deps.now();
    for (const map of [this.pending, this.redeemable] as Array<Map<string, { expiresAt: number }>>) {
      for (const [k, f] of map) if (f.expiresAt <= now) map.delete(k);
      // Oldest first (insertion order): under a flood the newest sign-ins keep working.
      for (const k of map.keys()) {
        if (map.size < MAX_PENDING) break;
        map.delete(k);
      }
    }
  }
}

/** The flow's cookie name: derived from the state without revealing it. */
export function flowCookieName(state: string): string {
  return FLOW_COOKIE_PREFIX + createHash('sha256').update(state).digest('base64url').slice(0, 16);
}

/** Maps what openid-client throws to a domain error: the provider said no (400), or is unreachable (503). */
function providerFailure(e: unknown, issuer: string): DomainError {
  if (e instanceof DomainError) return e;
  if (e instanceof client.AuthorizationResponseError) {
    return invalid(`the identity provider refused the sign-in: ${e.error}${e.error_description ? ` (${e.error_description})` : ''}`, { providerError: e.error });
  }
  if (e instanceof client.ResponseBodyError) {
    return invalid(`the identity provider did not accept the authorization code: ${e.error}${e.error_description ? ` (${e.error_description})` : ''}`, { providerError: e.error });
  }
  if (e instanceof client.ClientError) return invalid(`the identity provider's answer failed validation: ${e.message}`);
  return new DomainError('unavailable', `cannot complete the sign-in with the OpenID provider ${issuer} (${(e as Error).message})`, { issuer });
}
