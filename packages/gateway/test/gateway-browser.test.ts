/**
 * The gateway's browser front door in headless Chromium (Debian's, driven by playwright-core):
 * the terminal runs a command in the box, a preview URL shows a page served inside the box, and
 * both are refused to a browser that has not signed in. Port visibility is checked for another
 * user with plain HTTP. Attacks on the boundary between the two are in gateway-origin.test.ts.
 */
import { request as httpRequest } from 'node:http';
import { PassThrough } from 'node:stream';
import type { Browser } from 'playwright-core';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { execInBox } from '@devyard/sdk/exec-client';
import { DevyardClient } from '@devyard/sdk/devyard-client';
import { launchChromium, startAccessStack, waitFor, type AccessStack } from './access-test-stack.js';

let stack: AccessStack;
let browser: Browser;

async function inBox(cmd: string): Promise<string> {
  const out = new PassThrough();
  let text = '';
  out.on('data', (d: Buffer) => (text += d.toString()));
  const code = await execInBox(await stack.client.createExecSession('web'), { argv: ['/bin/sh', '-c', cmd], stdout: out, stderr: out }).exited;
  if (code !== 0) throw new Error(`${cmd}: exit ${code}: ${text}`);
  return text;
}

beforeAll(async () => {
  stack = await startAccessStack('gwb', 245);
  await stack.runningBox('web');
  await inBox('mkdir -p /tmp/www && echo "<h1>hello from the box</h1>" > /tmp/www/index.html && (busybox httpd -p 127.0.0.1:8080 -h /tmp/www &)');
  browser = await launchChromium();
}, 240_000);

afterAll(async () => {
  await browser?.close();
  await stack?.close();
}, 120_000);

/** A sign-in link as `devyard open` prints it: for the terminal of `box`, or the preview of `port`. */
async function signInLink(box: string, port?: number): Promise<string> {
  const token = encodeURIComponent((await stack.client.createSignInToken(box, port)).token);
  const base = port === undefined ? stack.gateway.endpoint.url : `http://${port}--${box}.localhost:${new URL(stack.gateway.endpoint.url).port}`;
  return `${base}/__devyard/auth?token=${token}&next=${encodeURIComponent(port === undefined ? `/boxes/${box}/terminal` : '/')}`;
}

describe('browser terminal', () => {
  it('runs a command in the box and shows its output', async () => {
    const ctx = await browser.newContext();
    try {
      const page = await ctx.newPage();
      await page.goto(await signInLink('web'));
      await page.waitForSelector('.xterm-rows');
      await waitFor(async () => page.textContent('#status'), (s) => s === 'connected', 30_000);
      expect(await page.textContent('#subject')).toBe('admin');
      await page.keyboard.type('echo $((6*7))-$(cat /etc/hostname)\n');
      await page.waitForFunction(() => document.querySelector('.xterm-rows')?.textContent?.includes('42-web'), undefined, { timeout: 30_000 });
    } finally {
      await ctx.close();
    }
  });

  it('is refused to a browser that has not signed in', async () => {
    const ctx = await browser.newContext();
    try {
      const page = await ctx.newPage();
      const res = await page.goto(`${stack.gateway.endpoint.url}/boxes/web/terminal`);
      expect(res?.status()).toBe(401);
      expect(await page.textContent('h1')).toBe('Sign in to Devyard');
    } finally {
      await ctx.close();
    }
  });
});

describe('port previews', () => {
  const hostForm = () => `http://8080--web.localhost:${new URL(stack.gateway.endpoint.url).port}`;

  it("shows a page served inside the box on the preview's own host, never under the gateway's", async () => {
    const ctx = await browser.newContext();
    try {
      const page = await ctx.newPage();
      await page.goto(await signInLink('web', 8080));
      expect(page.url()).toBe(`${hostForm()}/`);
      expect(await page.textContent('h1')).toBe('hello from the box');
      const pathForm = await page.goto(`${stack.gateway.endpoint.url}/p/web/8080/`);
      expect(pathForm?.status()).toBe(404);
    } finally {
      await ctx.close();
    }
  });

  it('refuses an unauthenticated browser', async () => {
    const ctx = await browser.newContext();
    try {
      const page = await ctx.newPage();
      const res = await page.goto(`${hostForm()}/`);
      expect(res?.status()).toBe(401);
      expect(await page.content()).not.toContain('hello from the box');
    } finally {
      await ctx.close();
    }
  });

  it('is private to the owner until the port is made org-visible; a closed port is a clear 502', async () => {
    // Another member of the organization (a service account is a real user).
    const bob = new DevyardClient({ url: stack.cp.url, token: (await stack.client.createServiceAccount('bob', 'member')).token });
    const bobToken = (await bob.createAccessToken(600)).token;
    const gatewayPort = Number(new URL(stack.gateway.endpoint.url).port);
    /** GET with a bearer token on the gateway's port; `host` picks a preview (Node does not resolve *.localhost). */
    const get = (path: string, token: string, host = `127.0.0.1:${gatewayPort}`) =>
      new Promise<{ status: number; body: string }>((resolve, reject) => {
        const req = httpRequest({ host: '127.0.0.1', port: gatewayPort, path, headers: { host, authorization: `Bearer ${token}` } }, (res) => {
          let body = '';
          res.on('data', (d: Buffer) => (body += d.toString()));
          res.on('end', () => resolve({ status: res.statusCode ?? 0, body }));
        });
        req.on('error', reject);
        req.end();
      });
    const preview = (port: number, token: string) => get('/', token, `${port}--web.localhost:${gatewayPort}`);
    expect((await preview(8080, bobToken)).status).toBe(404);
    expect((await get('/boxes/web/terminal', bobToken)).status).toBe(404);
    await stack.client.setBoxPort('web', 8080, 'org');
    await stack.gateway.cache.refresh();
    expect(await preview(8080, bobToken)).toEqual({ status: 200, body: '<h1>hello from the box</h1>\n' });
    // Org-visible opens the preview only, not the box.
    expect((await get('/boxes/web/terminal', bobToken)).status).toBe(404);
    await stack.client.resetBoxPort('web', 8080);
    await stack.gateway.cache.refresh();
    expect((await preview(8080, bobToken)).status).toBe(404);
    const mine = (await stack.client.createAccessToken(600)).token;
    expect(await preview(9999, mine)).toEqual({ status: 502, body: 'nothing is listening on port 9999 in box "web"\n' });
  });
});
