/**
 * The browser boundary of the gateway, attacked the way a member of another organization would: she
 * controls a box and the app it previews, and her victim is signed in to the terminal of a box of
 * his own. Where a browser is the attacker's tool the attack runs in headless Chromium (Debian's,
 * driven by playwright-core); where the gateway must refuse what no browser would send, plain HTTP
 * and WebSocket clients make the requests.
 */
import { request as httpRequest } from 'node:http';
import { PassThrough } from 'node:stream';
import type { Browser, BrowserContext } from 'playwright-core';
import WebSocket from 'ws';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { execInBox } from '@devyard/sdk/exec-client';
import { DevyardClient } from '@devyard/sdk/devyard-client';
import { startGateway } from '@devyard/gateway/gateway-process';
import { launchChromium, startAccessStack, type AccessStack } from './access-test-stack.js';

let stack: AccessStack;
let browser: Browser;
/** The attacker: a member of another organization, with a box "evil" that serves her app on 8080. */
let mallory: DevyardClient;
/** The gateway's own origin (`http://127.0.0.1:PORT`) and its HTTP port. */
let gw: string;
let port: number;

async function inBox(client: DevyardClient, box: string, cmd: string): Promise<string> {
  const out = new PassThrough();
  let text = '';
  out.on('data', (d: Buffer) => (text += d.toString()));
  const code = await execInBox(await client.createExecSession(box), { argv: ['/bin/sh', '-c', cmd], stdout: out, stderr: out }).exited;
  if (code !== 0) throw new Error(`${cmd}: exit ${code}: ${text}`);
  return text;
}

const previewOrigin = (box: string, p: number) => `http://${p}--${box}.localhost:${port}`;

/** A sign-in link as `devyard open` makes it: for a box's terminal, or for the preview of a port. */
async function signInLink(client: DevyardClient, box: string, opts: { port?: number; next?: string; at?: string } = {}): Promise<string> {
  const tok = await client.createSignInToken(box, opts.port);
  const origin = opts.at ?? (opts.port !== undefined ? previewOrigin(box, opts.port) : gw);
  const next = opts.next ?? (opts.port !== undefined ? '/' : `/boxes/${box}/terminal`);
  return `${origin}/__devyard/auth?token=${encodeURIComponent(tok.token)}&next=${encodeURIComponent(next)}`;
}

interface Answer {
  status: number;
  headers: Record<string, string | string[] | undefined>;
  body: string;
}

/** One HTTP request to the gateway's port with any Host header (Node does not resolve `*.localhost`). */
function http(path: string, opts: { host?: string; headers?: Record<string, string> } = {}): Promise<Answer> {
  return new Promise((resolve, reject) => {
    const req = httpRequest({ host: '127.0.0.1', port, path, headers: { host: opts.host ?? `127.0.0.1:${port}`, ...opts.headers } }, (res) => {
      let body = '';
      res.on('data', (d: Buffer) => (body += d.toString()));
      res.on('end', () => resolve({ status: res.statusCode ?? 0, headers: res.headers, body }));
    });
    req.on('error', reject);
    req.end();
  });
}

/** Follows a sign-in link without a browser: its status, Location and our session cookie (name=value). */
async function signIn(link: string): Promise<{ status: number; location: string | undefined; cookie: string | undefined }> {
  const u = new URL(link);
  const r = await http(u.pathname + u.search, { host: u.host });
  const set = ([] as string[]).concat(r.headers['set-cookie'] ?? []);
  return { status: r.status, location: r.headers.location as string | undefined, cookie: set.map((c) => c.split(';')[0]!).find((c) => c.startsWith('devyard_session=')) };
}

/** Opens a WebSocket to the gateway; resolves with how it went: 'open' or the refusal's HTTP status. */
async function wsOutcome(path: string, headers: Record<string, string>, origin?: string): Promise<'open' | number> {
  return (await wsAnswer(path, headers, origin)).outcome;
}

/** Like wsOutcome, with the Set-Cookie headers of a refusal (what a box answered to an upgrade). */
function wsAnswer(path: string, headers: Record<string, string>, origin?: string): Promise<{ outcome: 'open' | number; setCookie: string[] }> {
  return new Promise((resolve) => {
    const ws = new WebSocket(`ws://127.0.0.1:${port}${path}`, { headers, ...(origin ? { origin } : {}) });
    ws.on('open', () => {
      ws.terminate();
      resolve({ outcome: 'open', setCookie: [] });
    });
    ws.on('unexpected-response', (_req, res) => {
      res.resume();
      resolve({ outcome: res.statusCode ?? 0, setCookie: res.headers['set-cookie'] ?? [] });
    });
    ws.on('error', () => resolve({ outcome: 0, setCookie: [] }));
  });
}

/** The attacker's app: a page whose script tries to drive the victim's terminal, and a cookie planter. */
function evilApp(gatewayOrigin: string): string {
  const page = `<!doctype html><title>evil</title><h1>evil</h1><script>
const target = ${JSON.stringify(gatewayOrigin.replace(/^http/, 'ws'))} + '/boxes/web/terminal/ws?cols=80&rows=24';
function attempt() {
  let ws;
  try { ws = new WebSocket(target); } catch (e) { return setTimeout(attempt, 200); }
  ws.binaryType = 'arraybuffer';
  ws.onopen = () => {
    const cmd = new TextEncoder().encode('echo pwned-by-mallory > /tmp/pwned\\n');
    const f = new Uint8Array(cmd.length + 1);
    f.set(cmd, 1);
    setTimeout(() => ws.send(f), 500);
    document.title = 'opened';
  };
  ws.onclose = () => { if (document.title !== 'opened') setTimeout(attempt, 200); };
}
attempt();
fetch(${JSON.stringify(gatewayOrigin)} + '/boxes/web/terminal', { credentials: 'include' })
  .then((r) => r.text()).then((t) => { if (t.includes('xterm')) document.body.dataset.read = 'yes'; }).catch(() => {});
</script>`;
  const plant = [
    '#!/bin/sh',
    'printf "Set-Cookie: devyard_session=planted; Path=/\\r\\n"',
    'printf "Set-Cookie: devyard_session=planted; Path=/boxes/web/terminal\\r\\n"',
    'printf "Set-Cookie: DEVYARD_SESSION=planted; Path=/\\r\\n"',
    'printf "Set-Cookie: tossed=planted; Path=/; Domain=localhost\\r\\n"',
    `printf "Set-Cookie: tossed2=planted; Path=/; Domain=127.0.0.1\\r\\n"`,
    'printf "Set-Cookie: app=kept; Path=/\\r\\n"',
    'printf "Content-Type: text/html\\r\\n\\r\\n<h1>planted</h1>"',
  ].join('\n');
  return [
    'mkdir -p /tmp/www/cgi-bin',
    `cat > /tmp/www/index.html <<'EOF'\n${page}\nEOF`,
    `cat > /tmp/www/cgi-bin/plant <<'EOF'\n${plant}\nEOF`,
    'chmod +x /tmp/www/cgi-bin/plant',
    '(busybox httpd -p 127.0.0.1:8080 -h /tmp/www &)',
  ].join('\n');
}

beforeAll(async () => {
  stack = await startAccessStack('gwo', 246);
  gw = stack.gateway.endpoint.url;
  port = Number(new URL(gw).port);
  // Mallory: member of another organization, with a box of her own.
  await stack.client.createOrg('rival');
  // Trusted, so her box runs on this stack's sandbox-only node (the browser boundary is the same).
  await stack.client.setOrgTrust('rival', true);
  const rival = new DevyardClient({ url: stack.cp.url, token: (await stack.client.createToken({ name: 'rival', org: 'rival' })).token });
  mallory = new DevyardClient({ url: stack.cp.url, token: (await rival.createServiceAccount('mallory', 'member')).token });
  await stack.runningBox('web');
  await mallory.createBox({ name: 'evil', template: 'tiny', resources: { cpu: 0.5, memory: '256MiB' } });
  for (let i = 0; (await mallory.getBox('evil')).phase !== 'running'; i++) {
    if (i > 600) throw new Error('box evil did not start');
    await new Promise((r) => setTimeout(r, 100));
  }
  await inBox(stack.client, 'web', 'mkdir -p /tmp/www && echo "<h1>hello from the box</h1>" > /tmp/www/index.html && (busybox httpd -p 127.0.0.1:8080 -h /tmp/www &)');
  await inBox(mallory, 'evil', evilApp(gw));
  await stack.gateway.cache.refresh();
  browser = await launchChromium();
}, 240_000);

afterAll(async () => {
  await browser?.close();
  await stack?.close();
}, 120_000);

async function withBrowser(fn: (ctx: BrowserContext) => Promise<void>): Promise<void> {
  const ctx = await browser.newContext();
  try {
    await fn(ctx);
  } finally {
    await ctx.close();
  }
}

describe('a previewed app against the gateway origin (Chromium)', () => {
  it("cannot reach the victim's terminal: no preview runs script on the gateway origin", async () => {
    await withBrowser(async (ctx) => {
      // The victim follows Mallory's links (a chat message, a README): her app, wherever the gateway
      // will serve it — under the gateway's own origin (path form) or on its preview host.
      const tabs = [];
      for (const link of [await signInLink(mallory, 'evil', { next: '/p/evil/8080/' }), await signInLink(mallory, 'evil', { port: 8080 })]) {
        const tab = await ctx.newPage();
        await tab.goto(link);
        tabs.push(tab);
      }
      // Then he signs in to his own terminal, as every day.
      const term = await ctx.newPage();
      await term.goto(await signInLink(stack.client, 'web'));
      await term.waitForFunction(() => document.getElementById('status')?.textContent === 'connected', undefined, { timeout: 30_000 });
      // Her script retried all along; give it a few seconds with his cookie in the jar.
      await new Promise((r) => setTimeout(r, 4000));
      for (const tab of tabs) {
        expect(await tab.title()).not.toBe('opened');
        expect(await tab.evaluate(() => document.body?.dataset.read ?? 'no')).toBe('no');
      }
      expect(await inBox(stack.client, 'web', 'cat /tmp/pwned 2>/dev/null || echo absent')).toBe('absent\n');
    });
  });

  it('cannot plant cookies for the gateway, nor replace the session cookie of its own preview host', async () => {
    await withBrowser(async (ctx) => {
      const page = await ctx.newPage();
      await page.goto(await signInLink(mallory, 'evil', { next: '/p/evil/8080/cgi-bin/plant' })).catch(() => undefined);
      await page.goto(await signInLink(mallory, 'evil', { port: 8080, next: '/cgi-bin/plant' }));
      expect(await page.textContent('h1')).toBe('planted');
      const onGateway = await ctx.cookies(gw);
      expect(onGateway.filter((c) => c.value === 'planted')).toEqual([]);
      const onPreview = await ctx.cookies(previewOrigin('evil', 8080));
      expect(onPreview.filter((c) => c.value === 'planted')).toEqual([]);
      // The app's own cookies stay the app's business.
      expect(onPreview.find((c) => c.name === 'app')?.value).toBe('kept');
    });
  });
});

describe('the gateway refuses what a browser would not send (HTTP and WebSocket clients)', () => {
  it('strips Set-Cookie for our cookie and for any Domain wider than the preview host', async () => {
    const bearer = (await mallory.createAccessToken(600)).token;
    const r = await http('/cgi-bin/plant', { host: `8080--evil.localhost:${port}`, headers: { authorization: `Bearer ${bearer}` } });
    expect(r.status).toBe(200);
    expect(r.headers['set-cookie']).toEqual(['app=kept; Path=/']);
  });

  it('opens the terminal WebSocket only with the gateway Origin and the CSRF token of the page', async () => {
    const { cookie } = await signIn(await signInLink(stack.client, 'web'));
    expect(cookie).toBeDefined();
    const headers = { cookie: cookie! };
    const ws = '/boxes/web/terminal/ws?cols=80&rows=24';
    // A page of another origin (a preview) that makes the browser send the cookie.
    expect(await wsOutcome(ws, headers, previewOrigin('evil', 8080))).toBe(403);
    expect(await wsOutcome(ws, headers, 'null')).toBe(403);
    expect(await wsOutcome(ws, headers)).toBe(403);
    // The right Origin without the page's CSRF token, or with a wrong one.
    expect(await wsOutcome(ws, headers, gw)).toBe(403);
    expect(await wsOutcome(`${ws}&csrf=AAAA`, headers, gw)).toBe(403);
    // What the terminal page itself does.
    const page = await http('/boxes/web/terminal', { headers });
    const csrf = /"csrf":\s*"([A-Za-z0-9_-]+)"/.exec(page.body)?.[1];
    expect(csrf).toBeDefined();
    expect(await wsOutcome(`${ws}&csrf=${csrf}`, headers, gw)).toBe('open');
  });

  it('accepts only a bearer token on the CLI tunnels, never the browser cookie or a sign-in link', async () => {
    const link = await signInLink(stack.client, 'web');
    const linkToken = new URL(link).searchParams.get('token')!;
    const { cookie } = await signIn(await signInLink(stack.client, 'web'));
    for (const path of ['/v1/boxes/web/ssh', '/v1/boxes/web/tcp/8080']) {
      expect(await wsOutcome(path, { cookie: cookie! }, gw)).toBe(401);
      expect(await wsOutcome(path, { cookie: cookie! })).toBe(401);
      expect(await wsOutcome(path, { authorization: `Bearer ${cookie!.slice('devyard_session='.length)}` })).toBe(401);
      expect(await wsOutcome(path, { authorization: `Bearer ${linkToken}` })).toBe(401);
    }
    const cli = (await stack.client.createAccessToken(600)).token;
    expect(await wsOutcome('/v1/boxes/web/tcp/8080', { authorization: `Bearer ${cli}` })).toBe('open');
  });

  it("opens a preview's WebSocket with its cookie only from pages of the same box, and filters the box's answer", async () => {
    const { cookie } = await signIn(await signInLink(mallory, 'evil', { port: 8080 }));
    const headers = { cookie: cookie!, host: `8080--evil.localhost:${port}` };
    // Another user's preview (same site as this one under a real preview domain), the gateway, no Origin.
    expect(await wsOutcome('/', headers, previewOrigin('web', 8080))).toBe(403);
    expect(await wsOutcome('/', headers, gw)).toBe(403);
    expect(await wsOutcome('/', headers)).toBe(403);
    // From the box's own pages the upgrade reaches the box (busybox httpd answers it like a GET),
    // and a cookie in its answer passes the same filter as in a plain response.
    for (const from of [previewOrigin('evil', 8080), previewOrigin('evil', 3000)]) {
      expect(await wsAnswer('/cgi-bin/plant', headers, from)).toEqual({ outcome: 200, setCookie: ['app=kept; Path=/'] });
    }
  });
});

describe('sign-in links', () => {
  const evilNexts = ['/\\evil.example', '//evil.example', '/%5Cevil.example', '/%5cevil.example', 'https:evil.example', 'https://evil.example/', '/\t/evil.example', '\t//evil.example', '/\n/evil.example', '/\\/evil.example', 'javascript:alert(1)', ' //evil.example'];

  it('redirect only within the origin they were issued for', async () => {
    for (const next of evilNexts) {
      const r = await signIn(await signInLink(stack.client, 'web', { next }));
      expect([next, r.status]).toEqual([next, 303]);
      expect([next, r.location]).toEqual([next, '/']);
      const p = await signIn(await signInLink(stack.client, 'web', { port: 8080, next }));
      expect([next, p.status, p.location]).toEqual([next, 303, '/']);
    }
    const ok = await signIn(await signInLink(stack.client, 'web', { next: '/boxes/web/terminal?x=1#y' }));
    expect(new URL(ok.location!, gw).href).toBe(`${gw}/boxes/web/terminal?x=1#y`);
  });

  it('work once, at one gateway: a second use, here or at another gateway, is refused', async () => {
    const other = await stack.startGateway();
    const link = await signInLink(stack.client, 'web');
    expect((await signIn(link)).status).toBe(303);
    expect((await signIn(link)).status).toBe(401);
    const elsewhere = new URL(link);
    elsewhere.port = new URL(other.endpoint.url).port;
    const r = await new Promise<number>((resolve, reject) => {
      httpRequest(elsewhere, (res) => (res.resume(), resolve(res.statusCode ?? 0))).on('error', reject).end();
    });
    expect(r).toBe(401);
  });

  it('are valid for a minute', async () => {
    const link = await signInLink(stack.client, 'web');
    const token = new URL(link).searchParams.get('token')!;
    const claims = JSON.parse(Buffer.from(token.slice(4).split('.')[0]!, 'base64url').toString()) as { iat: number; exp: number };
    expect(claims.exp - claims.iat).toBe(60_000);
  });

  it('become a cookie for what they were issued for, and nothing else', async () => {
    const terminal = (await signIn(await signInLink(stack.client, 'web'))).cookie!;
    // A terminal cookie opens no preview, not even of the same box.
    expect((await http('/', { host: `8080--web.localhost:${port}`, headers: { cookie: terminal } })).status).toBe(401);
    const preview = (await signIn(await signInLink(stack.client, 'web', { port: 8080 }))).cookie!;
    expect((await http('/', { host: `8080--web.localhost:${port}`, headers: { cookie: preview } })).status).toBe(200);
    // A preview cookie opens neither another port's preview nor the box's terminal.
    expect((await http('/', { host: `9999--web.localhost:${port}`, headers: { cookie: preview } })).status).toBe(401);
    expect((await http('/boxes/web/terminal', { headers: { cookie: preview } })).status).toBe(401);
  });
});

describe('start-up', () => {
  it('refuses a preview domain of the same site as the gateway, with a clear error', async () => {
    const sameSite = [
      ['http://gw.devyard.test:7100', 'preview.devyard.test'],
      ['https://devyard.example.com', 'example.com'],
      ['https://gw.example.co.uk', 'previews.example.co.uk'],
      ['http://localhost:7100', 'localhost'],
      ['http://localhost:7100', 'previews.localhost'],
      ['https://user.github.io', 'github.io'],
    ];
    const attempt = (publicUrl: string, previewDomain: string) =>
      startGateway({ serverUrl: stack.cp.url, token: stack.cp.tokens.gatewayToken, publicUrl, previewDomain, log: () => undefined }).then(
        async (g) => (await g.close(), g),
        (e: Error) => e,
      );
    for (const [publicUrl, previewDomain] of sameSite) {
      const started = await attempt(publicUrl!, previewDomain!);
      expect(started).toBeInstanceOf(Error);
      expect(started).toMatchObject({ code: 'preview-domain-same-site', message: expect.stringContaining(`"${previewDomain}"`) });
    }
    expect(await attempt('http://127.0.0.1:7100', '127.0.0.2')).toMatchObject({ code: 'invalid-preview-domain' });
  });
});
