/**
 * `devyard login` end to end: the compiled CLI (a child process) against an in-process control plane
 * and a real OpenID provider (`oidc-provider`) on loopback. The browser is played by plain HTTP
 * that opens the URL the CLI prints, signs in with the provider's forms and follows the redirect
 * back to the CLI's loopback listener.
 */
import { execFileSync, spawn } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { startControlPlane, type ControlPlane } from '@devyard/server/control-plane';
import { HttpBrowser, startTestIdp, type TestIdp } from '../../server/test/oidc-test-provider.js';

const root = fileURLToPath(new URL('../../..', import.meta.url));
let dir: string;
let idp: TestIdp;
let cp: ControlPlane;
let plain: ControlPlane;

/** Runs the CLI asynchronously (the server and provider live in this process); `onOut` sees stdout as it comes. */
function devyard(args: string[], env: Record<string, string>, onOut?: (text: string) => void): Promise<{ code: number; stdout: string; stderr: string }> {
  return new Promise((resolve, reject) => {
    const childEnv: NodeJS.ProcessEnv = { ...process.env, ...env };
    delete childEnv.DEVYARD_URL;
    delete childEnv.DEVYARD_TOKEN;
    const child = spawn(process.execPath, [join(root, 'bin/devyard'), ...args], { cwd: dir, env: childEnv, stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (d: Buffer) => {
      stdout += d.toString();
      onOut?.(stdout);
    });
    child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
    const timer = setTimeout(() => child.kill('SIGKILL'), 60_000);
    child.on('error', reject);
    child.on('close', (code) => {
      clearTimeout(timer);
      resolve({ code: code ?? 1, stdout, stderr });
    });
  });
}

beforeAll(async () => {
  // The test runs the compiled CLI, so compile what it is about to run.
  execFileSync(process.execPath, [join(root, 'node_modules/typescript/bin/tsc'), '-b', 'packages/cli'], { cwd: root, stdio: 'inherit' });
  dir = mkdtempSync(join(tmpdir(), 'devyard-cli-login-'));
  idp = await startTestIdp({ 'sub-dana': { preferred_username: 'dana', email: 'dana@example.com' } });
  cp = await startControlPlane({ dataDir: join(dir, 'data'), oidc: { issuer: idp.issuer, clientId: idp.clientId, clientSecret: idp.clientSecret } });
  plain = await startControlPlane({ dataDir: join(dir, 'plain') });
  idp.register([`${cp.url}/v1/auth/oidc/callback`]);
}, 180_000);

afterAll(async () => {
  await cp?.close();
  await plain?.close();
  await idp?.close();
  if (dir) rmSync(dir, { recursive: true, force: true });
});

describe('devyard login', () => {
  it('--no-browser prints the URL, receives the token on loopback and saves it, keeping other settings', async () => {
    const config = join(dir, 'config.json');
    writeFileSync(config, JSON.stringify({ url: 'http://127.0.0.1:1', token: 'dy_old', sshConfig: 'kept' }));
    let browsed: Promise<{ status: number; body: string }> | undefined;
    const result = await devyard(['login', '--server', cp.url, '--no-browser'], { DEVYARD_CONFIG: config }, (out) => {
      const url = /^\s+(http:\/\/\S+\/v1\/auth\/oidc\/login\?cli=\S+)$/m.exec(out)?.[1];
      if (url && !browsed) {
        browsed = (async () => {
          // The whole browser part, including the last redirect into the CLI's listener.
          const hop = await new HttpBrowser().signIn(url, { login: 'sub-dana' });
          return { status: hop.status, body: hop.body };
        })();
      }
    });
    expect(browsed, result.stdout + result.stderr).toBeDefined();
    const page = await browsed!;
    expect(result.stderr).toBe('');
    expect(result.code).toBe(0);
    expect(page.status).toBe(200);
    expect(page.body).toContain('you can close this tab');
    expect(result.stdout).toContain('open this URL in a browser');
    expect(result.stdout).toContain(`Logged in to ${cp.url} as dana (member in`);

    const saved = JSON.parse(readFileSync(config, 'utf8')) as { url: string; token: string; sshConfig: string };
    expect(saved.url).toBe(cp.url);
    expect(saved.token).toMatch(/^dy_u_/);
    expect(saved.sshConfig).toBe('kept');
    const me = await fetch(`${cp.url}/v1/users/me`, { headers: { authorization: `Bearer ${saved.token}` } });
    expect(me.status).toBe(200);
    expect(await me.json()).toMatchObject({ user: 'dana' });
  });

  it('--token stores a token after checking it with the server', async () => {
    const config = join(dir, 'config-token.json');
    const ok = await devyard(['login', '--server', cp.url, '--token', cp.tokens.adminToken], { DEVYARD_CONFIG: config });
    expect(ok.code, ok.stderr).toBe(0);
    expect(JSON.parse(readFileSync(config, 'utf8'))).toEqual({ url: cp.url, token: cp.tokens.adminToken });

    const bad = await devyard(['login', '--server', cp.url, '--token', 'dy_u_forged'], { DEVYARD_CONFIG: join(dir, 'config-bad.json') });
    expect(bad.code).not.toBe(0);
    expect(bad.stderr).toContain('refused this token');
  });

  it('says so when the server has no single sign-on', async () => {
    const r = await devyard(['login', '--server', plain.url, '--no-browser'], { DEVYARD_CONFIG: join(dir, 'config-plain.json') });
    expect(r.code).not.toBe(0);
    expect(r.stderr).toContain('does not offer single sign-on');
  });
});
