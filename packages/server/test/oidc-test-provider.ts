/**
 * A real OpenID provider on loopback for the sign-in tests: the `oidc-provider` package with its
 * built-in development interactions (a login form and a consent form), and a small cookie-keeping
 * HTTP "browser" that follows redirects by hand and submits the provider's real forms.
 */
import { generateKeyPairSync } from 'node:crypto';
import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
// @ts-expect-error -- oidc-provider ships no types; the tests use a small part of it
import Provider from 'oidc-provider';

/** Claims of a test account, by account id (the `sub`). */
export type TestAccounts = Record<string, { preferred_username?: string; email?: string; name?: string; nickname?: string }>;

export interface TestIdp {
  issuer: string;
  /** Confidential client (client_secret_basic). */
  clientId: string;
  clientSecret: string;
  /** Public client (token_endpoint_auth_method none; PKCE only). */
  publicClientId: string;
  /** Registers the redirect URIs and starts answering; call once the Devyard servers' URLs are known. */
  register(redirectUris: string[]): void;
  close(): Promise<void>;
}

export async function startTestIdp(accounts: TestAccounts): Promise<TestIdp> {
  let handler: ((req: IncomingMessage, res: ServerResponse) => void) | undefined;
  const server: Server = createServer((req, res) => {
    if (handler) return handler(req, res);
    res.writeHead(503).end('not configured yet');
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  const issuer = `http://127.0.0.1:${(server.address() as { port: number }).port}`;
  const jwk = { ...generateKeyPairSync('rsa', { modulusLength: 2048 }).privateKey.export({ format: 'jwk' }), kid: 'test-1', use: 'sig', alg: 'RS256' };
  const idp: TestIdp = {
    issuer,
    clientId: 'devyard',
    clientSecret: 'devyard-test-secret-0123456789abcdef',
    publicClientId: 'devyard-public',
    register(redirectUris) {
      const provider = new Provider(issuer, {
        clients: [
          { client_id: idp.clientId, client_secret: idp.clientSecret, redirect_uris: redirectUris, response_types: ['code'], grant_types: ['authorization_code'], token_endpoint_auth_method: 'client_secret_basic' },
          { client_id: idp.publicClientId, redirect_uris: redirectUris, response_types: ['code'], grant_types: ['authorization_code'], token_endpoint_auth_method: 'none' },
        ],
        pkce: { methods: ['S256'], required: () => true },
        features: { devInteractions: { enabled: true } },
        claims: { openid: ['sub'], profile: ['preferred_username', 'name', 'nickname'], email: ['email', 'email_verified'] },
        jwks: { keys: [jwk] },
        ttl: { AccessToken: 600, AuthorizationCode: 60, IdToken: 600, Interaction: 600, Session: 3600, Grant: 3600 },
        cookies: { keys: ['devyard-test-cookie-key'] },
        async findAccount(_ctx: unknown, id: string) {
          const a = accounts[id];
          if (!a) return undefined;
          return { accountId: id, claims: async () => ({ sub: id, ...a, ...(a.email ? { email_verified: true } : {}) }) };
        },
      });
      handler = provider.callback();
    },
    async close() {
      server.closeAllConnections();
      await new Promise((r) => server.close(r));
    },
  };
  return idp;
}

interface StoredCookie {
  value: string;
  path: string;
}

export interface Hop {
  url: string;
  status: number;
  location?: string;
  body: string;
}

/** A cookie jar and redirect follower: what a browser does in a sign-in, minus rendering. */
export class HttpBrowser {
  /** The `prompt` of every provider form submitted (login, consent), in order. */
  readonly submitted: string[] = [];
  /** host → "name path" → cookie */
  private readonly jar = new Map<string, Map<string, StoredCookie & { name: string }>>();

  cookies(url: string): Record<string, string> {
    const u = new URL(url);
    const out: Record<string, string> = {};
    for (const c of this.jar.get(u.host)?.values() ?? []) if (u.pathname.startsWith(c.path)) out[c.name] = c.value;
    return out;
  }

  setCookie(url: string, name: string, value: string, path = '/'): void {
    const host = new URL(url).host;
    if (!this.jar.has(host)) this.jar.set(host, new Map());
    this.jar.get(host)!.set(`${name} ${path}`, { name, value, path });
  }

  private remember(url: string, res: Response): void {
    const u = new URL(url);
    for (const line of res.headers.getSetCookie()) {
      const [pair, ...attrs] = line.split(';');
      const i = pair!.indexOf('=');
      const name = pair!.slice(0, i).trim();
      const value = pair!.slice(i + 1).trim();
      let path = u.pathname.replace(/\/[^/]*$/, '') || '/';
      let expired = false;
      for (const a of attrs) {
        const [k, v = ''] = a.trim().split('=');
        if (k!.toLowerCase() === 'path') path = v;
        if (k!.toLowerCase() === 'max-age' && Number(v) <= 0) expired = true;
        if (k!.toLowerCase() === 'expires' && Date.parse(v) < Date.now()) expired = true;
      }
      const host = u.host;
      if (!this.jar.has(host)) this.jar.set(host, new Map());
      if (expired) this.jar.get(host)!.delete(`${name} ${path}`);
      else this.jar.get(host)!.set(`${name} ${path}`, { name, value, path });
    }
  }

  /** One request, no redirect following. */
  async request(url: string, init: { method?: string; form?: Record<string, string>; accept?: string } = {}): Promise<Hop> {
    const cookie = Object.entries(this.cookies(url))
      .map(([k, v]) => `${k}=${v}`)
      .join('; ');
    const res = await fetch(url, {
      method: init.method ?? (init.form ? 'POST' : 'GET'),
      redirect: 'manual',
      headers: {
        accept: init.accept ?? 'text/html,application/xhtml+xml',
        ...(cookie ? { cookie } : {}),
        ...(init.form ? { 'content-type': 'application/x-www-form-urlencoded' } : {}),
      },
      body: init.form ? new URLSearchParams(init.form).toString() : undefined,
    });
    this.remember(url, res);
    const location = res.headers.get('location');
    return { url, status: res.status, location: location ? new URL(location, url).href : undefined, body: await res.text() };
  }

  /**
   * Follows redirects from `url`, and submits the provider's forms (login, then consent) with the
   * given login, until a page that is not a form, or a redirect to a URL `stop` accepts (not fetched).
   */
  async signIn(url: string, o: { login: string; stop?: (url: string) => boolean; maxHops?: number }): Promise<Hop> {
    let hop = await this.request(url);
    for (let i = 0; i < (o.maxHops ?? 20); i++) {
      if (hop.location) {
        if (o.stop?.(hop.location)) return hop;
        hop = await this.request(hop.location);
        continue;
      }
      const form = parseForm(hop.body, hop.url);
      if (hop.status !== 200 || !form) return hop;
      const fields = { ...form.fields };
      if ('login' in fields) Object.assign(fields, { login: o.login, password: 'any password' });
      this.submitted.push(fields.prompt ?? '?');
      hop = await this.request(form.action, { method: form.method, form: fields });
    }
    throw new Error(`sign-in did not finish; last: ${hop.status} ${hop.url}`);
  }
}

/** The first form of a page: its action, method and the values of its inputs. */
export function parseForm(html: string, base: string): { action: string; method: string; fields: Record<string, string> } | undefined {
  const m = /<form\b([^>]*)>([\s\S]*?)<\/form>/i.exec(html);
  if (!m) return undefined;
  const attr = (s: string, name: string) => new RegExp(`\\b${name}="([^"]*)"`, 'i').exec(s)?.[1];
  const fields: Record<string, string> = {};
  for (const input of m[2]!.matchAll(/<input\b([^>]*)>/gi)) {
    const name = attr(input[1]!, 'name');
    if (name) fields[name] = attr(input[1]!, 'value') ?? '';
  }
  const unescape = (s: string) => s.replace(/&amp;/g, '&').replace(/&#x2F;/gi, '/').replace(/&#47;/g, '/');
  return { action: new URL(unescape(attr(m[1]!, 'action') ?? ''), base).href, method: (attr(m[1]!, 'method') ?? 'get').toUpperCase(), fields };
}
