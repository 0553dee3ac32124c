/**
 * Single sign-on end to end: a real OpenID provider (`oidc-provider`) on loopback, the control plane
 * configured with it, and the browser's part played by plain HTTP that follows redirects, keeps
 * cookies and submits the provider's login and consent forms. Covers first sign-in (user created,
 * member of the default organization, token works), a second sign-in (same user), and the refusals:
 * non-loopback CLI URLs, unknown, replayed, expired and foreign-browser states, a provider error,
 * and a tampered code — none of which creates anything.
 */
import { createHash } from 'node:crypto';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { startControlPlane, type ControlPlane } from '@devyard/server/control-plane';
import { CLI_CODE_TTL_MS, FLOW_TTL_MS, parseCliCallback } from '@devyard/server/identity/oidc-login';
import { TenancyStore } from '@devyard/server/store/tenancy-store';
import { HttpBrowser, startTestIdp, type TestIdp } from './oidc-test-provider.js';

const ACCOUNTS = {
  'sub-alice': { preferred_username: 'alice', email: 'alice@example.com', name: 'Alice Liddell' },
  'sub-bob': { email: 'Bob.Builder@example.com' },
  'sub-nameless': {},
  'sub-mallory': { preferred_username: 'mallory', email: 'mallory@example.com' },
  'sub-carol': { preferred_username: 'carol', email: 'carol@example.com', nickname: 'caz' },
};

let dir: string;
let idp: TestIdp;
let cp: ControlPlane;
let pub: ControlPlane;
let clockOffset = 0;
const CLI = 'http://127.0.0.1:45678/devyard-login/cb';

/** The CLI's own PKCE pair: the challenge goes into the sign-in link, the verifier redeems the code. */
const VERIFIER = 'v'.repeat(20) + Math.random().toString(36).slice(2).padEnd(30, 'x');
const CHALLENGE = createHash('sha256').update(VERIFIER).digest('base64url');
const loginUrl = (server: ControlPlane, cli?: string, challenge: string | null = CHALLENGE) =>
  `${server.url}/v1/auth/oidc/login${cli ? `?cli=${encodeURIComponent(cli)}${challenge === null ? '' : `&cli_challenge=${challenge}`}` : ''}`;
const redeem = (server: ControlPlane, code: string, verifier = VERIFIER) =>
  fetch(`${server.url}/v1/auth/oidc/token`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ code, verifier }) });
const toCli = (url: string) => url.startsWith('http://127.0.0.1:45678/');
const toCallback = (url: string) => url.includes('/v1/auth/oidc/callback');

async function count(server: ControlPlane, table: 'users' | 'api_tokens'): Promise<number> {
  const r = await server.store.db.selectFrom(table).select((eb) => eb.fn.countAll<number>().as('n')).executeTakeFirstOrThrow();
  return Number(r.n);
}

async function api(server: ControlPlane, token: string, path: string) {
  const res = await fetch(server.url + path, { headers: { authorization: `Bearer ${token}` } });
  return { status: res.status, body: (await res.json()) as Record<string, unknown> };
}

/** Signs in through the whole flow with a CLI URL: the code the loopback listener gets, redeemed with the verifier. */
async function cliSignIn(login: string, browser = new HttpBrowser(), server = cp) {
  const hop = await browser.signIn(loginUrl(server, CLI), { login, stop: toCli });
  expect(hop.status, hop.body).toBe(302);
  const to = new URL(hop.location!);
  expect(`${to.origin}${to.pathname}`).toBe(CLI);
  // Only a one-time code travels to the loopback URL, never the token.
  expect(to.searchParams.get('token')).toBeNull();
  expect(hop.location).not.toContain('dy_u_');
  const res = await redeem(server, to.searchParams.get('code')!);
  expect(res.status).toBe(200);
  const body = (await res.json()) as { token: string; user: string };
  expect(body.user).toBe(to.searchParams.get('user'));
  return { token: body.token, user: body.user, browser };
}

beforeAll(async () => {
  dir = mkdtempSync(join(tmpdir(), 'devyard-oidc-'));
  idp = await startTestIdp(ACCOUNTS);
  cp = await startControlPlane({
    dataDir: join(dir, 'a'),
    now: () => Date.now() + clockOffset,
    oidc: { issuer: idp.issuer, clientId: idp.clientId, clientSecret: idp.clientSecret },
  });
  // A second server: a public client (no secret, PKCE only) and a custom username claim.
  pub = await startControlPlane({ dataDir: join(dir, 'b'), oidc: { issuer: idp.issuer, clientId: idp.publicClientId, claims: { username: 'nickname' } } });
  idp.register([`${cp.url}/v1/auth/oidc/callback`, `${pub.url}/v1/auth/oidc/callback`]);
}, 60_000);

afterAll(async () => {
  await cp?.close();
  await pub?.close();
  await idp?.close();
  if (dir) rmSync(dir, { recursive: true, force: true });
});

describe('the loopback CLI URL', () => {
  it('accepts http://127.0.0.1:PORT/… and http://localhost:PORT/… only', () => {
    expect(parseCliCallback('http://127.0.0.1:5000/cb').href).toBe('http://127.0.0.1:5000/cb');
    expect(parseCliCallback('http://localhost:5000/x?y=1#frag').href).toBe('http://localhost:5000/x?y=1');
    for (const bad of ['https://127.0.0.1:5000/cb', 'http://127.0.0.1/cb', 'http://evil.example:5000/cb', 'http://127.0.0.1.evil.example:5000/', 'http://10.0.0.1:5000/', 'http://user:pw@127.0.0.1:5000/', 'javascript:alert(1)', 'not a url']) {
      expect(() => parseCliCallback(bad), bad).toThrow(/cli/);
    }
  });

  it('refuses a non-loopback cli URL with 400 before anything reaches the provider', async () => {
    const before = cp.oidc!.pendingCount;
    for (const bad of ['https://evil.example/cb', 'http://evil.example:8080/cb', 'http://127.0.0.1/no-port', 'http://[::1]:9000/cb']) {
      const res = await fetch(loginUrl(cp, bad), { redirect: 'manual', headers: { accept: 'application/json' } });
      expect(res.status, bad).toBe(400);
      expect(res.headers.get('content-type')).toContain('application/problem+json');
      expect(((await res.json()) as { errors: Array<{ field: string }> }).errors[0]!.field).toBe('cli');
    }
    // A browser gets a readable page instead of JSON.
    const page = await new HttpBrowser().request(loginUrl(cp, 'https://evil.example/cb'));
    expect(page.status).toBe(400);
    expect(page.body).toContain('Sign-in failed');
    expect(page.body).toContain('loopback');
    expect(cp.oidc!.pendingCount).toBe(before);
  });

  it('refuses a CLI sign-in without the CLI\'s PKCE challenge, or with a malformed one', async () => {
    const before = cp.oidc!.pendingCount;
    for (const challenge of [null, 'short', `${CHALLENGE}!`]) {
      const res = await fetch(loginUrl(cp, CLI, challenge), { redirect: 'manual', headers: { accept: 'application/json' } });
      expect(res.status, String(challenge)).toBe(400);
      expect(((await res.json()) as { errors: Array<{ field: string }> }).errors[0]!.field).toBe('cli_challenge');
    }
    expect(cp.oidc!.pendingCount).toBe(before);
  });
});

describe('sign-in', () => {
  it('redirects to the provider with PKCE S256, state and nonce, and binds the flow to the browser', async () => {
    const browser = new HttpBrowser();
    const hop = await browser.request(loginUrl(cp, CLI));
    expect(hop.status).toBe(302);
    const auth = new URL(hop.location!);
    expect(auth.origin).toBe(idp.issuer);
    expect(auth.searchParams.get('client_id')).toBe(idp.clientId);
    expect(auth.searchParams.get('redirect_uri')).toBe(`${cp.url}/v1/auth/oidc/callback`);
    expect(auth.searchParams.get('code_challenge_method')).toBe('S256');
    expect(auth.searchParams.get('code_challenge')).toMatch(/^[\w-]{43}$/);
    expect(auth.searchParams.get('state')).toBeTruthy();
    expect(auth.searchParams.get('nonce')).toBeTruthy();
    expect(auth.searchParams.get('scope')).toBe('openid profile email');
    expect(Object.keys(browser.cookies(`${cp.url}/v1/auth/oidc/callback`))).toHaveLength(1);
  });

  it('creates the user at first sign-in, in the default organization, and the token works', async () => {
    const users = await count(cp, 'users');
    const { token, user, browser } = await cliSignIn('sub-alice');
    expect(browser.submitted).toEqual(['login', 'consent']); // the provider's real forms
    expect(token).toMatch(/^dy_u_/);
    expect(user).toBe('alice');
    expect(await count(cp, 'users')).toBe(users + 1);

    const tenancy = new TenancyStore(cp.store.db);
    const row = await tenancy.getUserByOidc(idp.issuer, 'sub-alice');
    expect(row).toMatchObject({ name: 'alice', email: 'alice@example.com', kind: 'user' });
    expect(await tenancy.membership('org_default', row!.id)).toMatchObject({ role: 'member' });

    const me = await api(cp, token, '/v1/users/me');
    expect(me.status).toBe(200);
    expect(me.body).toMatchObject({ user: 'alice', role: 'member' });
    expect((await api(cp, token, '/v1/boxes')).status).toBe(200);
    // A 12-hour login token, stored hashed.
    const stored = await cp.store.db.selectFrom('api_tokens').selectAll().where('user_id', '=', row!.id).execute();
    expect(stored).toHaveLength(1);
    expect(JSON.stringify(stored)).not.toContain(token);
    expect(Number(stored[0]!.expires_at) - Number(stored[0]!.created_at)).toBe(12 * 3600 * 1000);

    const audit = await cp.audit.list({ orgId: 'org_default', actor: 'alice' });
    expect(audit.find((e) => e.action === 'oidcLogin')).toMatchObject({ result: 'ok', target: 'user/alice', detail: { firstLogin: true } });
  });

  it('maps a second sign-in to the same user, with a new token', async () => {
    const first = await cliSignIn('sub-alice');
    const users = await count(cp, 'users');
    const browser = first.browser; // the provider remembers this browser: no login form this time
    const forms = browser.submitted.length;
    const second = await cliSignIn('sub-alice', browser);
    expect(browser.submitted.length).toBe(forms);
    expect(second.user).toBe('alice');
    expect(second.token).not.toBe(first.token);
    expect(await count(cp, 'users')).toBe(users);
    expect((await api(cp, second.token, '/v1/users/me')).body).toMatchObject({ user: 'alice' });
    expect((await api(cp, first.token, '/v1/users/me')).status).toBe(200);
  });

  it('falls back to the email, then the subject, for the user name', async () => {
    expect((await cliSignIn('sub-bob')).user).toBe('bob-builder');
    expect((await cliSignIn('sub-nameless')).user).toBe('sub-nameless');
    const bob = await new TenancyStore(cp.store.db).getUserByOidc(idp.issuer, 'sub-bob');
    expect(bob?.email).toBe('Bob.Builder@example.com');
  });

  it('without a CLI URL, shows the token once on a page with the command to store it', async () => {
    const browser = new HttpBrowser();
    const hop = await browser.signIn(loginUrl(cp), { login: 'sub-alice' });
    expect(hop.status).toBe(200);
    expect(hop.url).toContain('/v1/auth/oidc/callback');
    const token = /dy_u_[\w-]+/.exec(hop.body)?.[0];
    expect(token).toBeTruthy();
    expect(hop.body).toContain(`devyard login --server ${cp.url} --token ${token}`);
    expect((await api(cp, token!, '/v1/users/me')).body).toMatchObject({ user: 'alice' });
  });

  it('works with a public client (PKCE only) and a custom username claim', async () => {
    const { token, user } = await cliSignIn('sub-carol', new HttpBrowser(), pub);
    expect(user).toBe('caz');
    expect((await api(pub, token, '/v1/users/me')).body).toMatchObject({ user: 'caz', role: 'member' });
  });
});

describe('refused callbacks create nothing', () => {
  /** Runs the provider's part and stops at the redirect back to Devyard. */
  async function toDevyardCallback(login: string, browser = new HttpBrowser()) {
    const hop = await browser.signIn(loginUrl(cp, CLI), { login, stop: toCallback });
    expect(hop.location).toContain('/v1/auth/oidc/callback');
    return { callback: hop.location!, browser };
  }

  async function nothingCreated(fn: () => Promise<void>) {
    const users = await count(cp, 'users');
    const tokens = await count(cp, 'api_tokens');
    await fn();
    expect(await count(cp, 'users')).toBe(users);
    expect(await count(cp, 'api_tokens')).toBe(tokens);
    expect(await new TenancyStore(cp.store.db).getUserByOidc(idp.issuer, 'sub-mallory')).toBeUndefined();
  }

  it('an unknown state: 400', async () => {
    await nothingCreated(async () => {
      const hop = await new HttpBrowser().request(`${cp.url}/v1/auth/oidc/callback?code=abc&state=never-issued`);
      expect(hop.status).toBe(400);
      expect(hop.body).toContain('unknown, expired or already used');
      expect(hop.location).toBeUndefined();
      const json = await fetch(`${cp.url}/v1/auth/oidc/callback?code=abc&state=never-issued`, { headers: { accept: 'application/json' } });
      expect(json.status).toBe(400);
      expect(((await json.json()) as { code: string }).code).toBe('invalid-input');
      expect((await fetch(`${cp.url}/v1/auth/oidc/callback`)).status).toBe(400);
    });
  });

  it('a tampered code: 400 from the provider, and the state is spent', async () => {
    await nothingCreated(async () => {
      const { callback, browser } = await toDevyardCallback('sub-mallory');
      const tampered = new URL(callback);
      tampered.searchParams.set('code', `${tampered.searchParams.get('code')}x`);
      const hop = await browser.request(tampered.href);
      expect(hop.status).toBe(400);
      expect(hop.body).toContain('did not accept the authorization code');
      // The genuine code cannot be used after that (the flow cookie is still there): the state was used once.
      const genuine = await browser.request(callback);
      expect(genuine.status).toBe(400);
      expect(genuine.location).toBeUndefined();
    });
  });

  it('a replayed callback: 400, no second token', async () => {
    const { callback, browser } = await toDevyardCallback('sub-alice');
    const cookies = browser.cookies(callback);
    const ok = await browser.request(callback);
    expect(ok.status).toBe(302);
    expect(ok.location).toContain('code=');
    await nothingCreated(async () => {
      // Even with the flow's cookie put back, the same state and code are refused.
      for (const [k, v] of Object.entries(cookies)) browser.setCookie(callback, k, v);
      const again = await browser.request(callback);
      expect(again.status).toBe(400);
      expect(again.body).not.toContain('dy_u_');
    });
  });

  it('a callback delivered to another browser (no flow cookie): 400', async () => {
    await nothingCreated(async () => {
      const { callback } = await toDevyardCallback('sub-mallory');
      const hop = await new HttpBrowser().request(callback);
      expect(hop.status).toBe(400);
      expect(hop.body).toContain('another browser');
    });
  });

  it('an expired sign-in: 400', async () => {
    await nothingCreated(async () => {
      const { callback, browser } = await toDevyardCallback('sub-mallory');
      clockOffset = FLOW_TTL_MS + 1000;
      try {
        const hop = await browser.request(callback);
        expect(hop.status).toBe(400);
        expect(hop.body).toContain('expired');
      } finally {
        clockOffset = 0;
      }
    });
  });

  it('the user cancels at the provider: 400 with the provider error', async () => {
    await nothingCreated(async () => {
      const browser = new HttpBrowser();
      // Walk to the provider's login page, then follow its Cancel link.
      let hop = await browser.request(loginUrl(cp, CLI));
      while (hop.location) hop = await browser.request(hop.location);
      const cancel = /href="([^"]*\/abort)"/.exec(hop.body)?.[1];
      expect(cancel, hop.body).toBeTruthy();
      hop = await browser.request(new URL(cancel!, hop.url).href);
      while (hop.location && !toCli(hop.location)) hop = await browser.request(hop.location);
      expect(hop.url).toContain('/v1/auth/oidc/callback');
      expect(hop.url).toContain('error=access_denied');
      expect(hop.status).toBe(400);
      expect(hop.body).toContain('refused the sign-in: access_denied');
    });
  });

  it('records refused callbacks in the audit log', async () => {
    const entries = await cp.audit.list({ orgId: 'org_default', actor: 'anonymous', limit: 1000 });
    const refused = entries.filter((e) => e.action === 'oidcLogin');
    expect(refused.length).toBeGreaterThanOrEqual(5);
    expect(refused.every((e) => e.result === 'denied')).toBe(true);
  });
});

describe('without a provider configured', () => {
  it('the sign-in routes answer 404', async () => {
    const plain = await startControlPlane({ dataDir: join(dir, 'c') });
    try {
      expect((await fetch(`${plain.url}/v1/auth/oidc/login`, { redirect: 'manual' })).status).toBe(404);
      expect((await fetch(`${plain.url}/v1/auth/oidc/callback?state=x&code=y`, { redirect: 'manual' })).status).toBe(404);
    } finally {
      await plain.close();
    }
  });

  it('refuses a non-https issuer off loopback at start-up', async () => {
    await expect(startControlPlane({ dataDir: join(dir, 'd'), oidc: { issuer: 'http://idp.example.com', clientId: 'x' } })).rejects.toThrow(/https/);
  });
});

describe('the one-time code sent to the loopback URL', () => {
  /** A sign-in up to the redirect to the loopback URL: what a process listening there would catch. */
  async function caughtCode(login: string) {
    const hop = await new HttpBrowser().signIn(loginUrl(cp, CLI), { login, stop: toCli });
    return new URL(hop.location!).searchParams.get('code')!;
  }

  it('is worth nothing without the verifier: a wrong one spends it, and no token is issued', async () => {
    const code = await caughtCode('sub-alice');
    const tokens = await count(cp, 'api_tokens');
    const stolen = await redeem(cp, code, 'x'.repeat(43));
    expect(stolen.status).toBe(400);
    expect(JSON.stringify(await stolen.json())).not.toContain('dy_u_');
    // The legitimate CLI comes second: the code is spent, and the user signs in again.
    expect((await redeem(cp, code)).status).toBe(400);
    expect(await count(cp, 'api_tokens')).toBe(tokens);
  });

  it('is redeemed once, within two minutes', async () => {
    const code = await caughtCode('sub-alice');
    const ok = await redeem(cp, code);
    expect(ok.status).toBe(200);
    expect(((await ok.json()) as { token: string }).token).toMatch(/^dy_u_/);
    expect((await redeem(cp, code)).status).toBe(400);
    const late = await caughtCode('sub-alice');
    clockOffset = CLI_CODE_TTL_MS + 1000;
    try {
      expect((await redeem(cp, late)).status).toBe(400);
    } finally {
      clockOffset = 0;
    }
    const audit = await cp.audit.list({ orgId: 'org_default', limit: 1000 });
    expect(audit.filter((e) => e.action === 'redeemOidcLogin' && e.result === 'denied').length).toBeGreaterThanOrEqual(2);
    expect(audit.find((e) => e.action === 'redeemOidcLogin' && e.result === 'ok')).toMatchObject({ actor: 'alice' });
  });
});
