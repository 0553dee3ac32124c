/** Repository checkout and remote ref lookup against real git servers on loopback. */
import { execFileSync } from 'node:child_process';
import { existsSync, statSync } from 'node:fs';
import { mkdtemp, readFile, readdir, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, beforeEach, describe, expect, test } from 'vitest';
import { CheckoutError, checkoutRepository, repoNameFromUrl, resolveRemoteRef } from '@devyard/agent/workspace/repository-checkout';
import { GitFixture } from './workspace-git-fixture.js';

const owner = { uid: 100_000, gid: 100_000 };

describe('repository checkout', () => {
  let fx: GitFixture;
  let ws: string;
  let pub: string;
  let priv: string;

  beforeAll(async () => {
    fx = await GitFixture.start();
    pub = `${fx.daemonUrl}/app.git`;
    priv = `${fx.httpUrl}/secret-app.git`;
  });
  afterAll(async () => {
    await fx.close();
  });
  beforeEach(async () => {
    if (ws) await rm(ws, { recursive: true, force: true });
    ws = await mkdtemp(join(tmpdir(), 'dy-ws-'));
  });
  afterAll(async () => {
    await rm(ws, { recursive: true, force: true });
  });

  const headOf = (dir: string) => execFileSync('git', ['-C', dir, 'rev-parse', 'HEAD'], { encoding: 'utf8', env: { ...process.env, GIT_CONFIG_GLOBAL: '/dev/null', GIT_CONFIG_PARAMETERS: "'safe.directory=*'" } }).trim();

  test('default branch: shallow, owned by box root, progress reported', async () => {
    const lines: string[] = [];
    const t0 = performance.now();
    const r = await checkoutRepository({ url: pub, workspaceDir: ws, owner, onProgress: (l) => lines.push(l) });
    console.log(`checkout (daemon, default branch) ${(performance.now() - t0).toFixed(0)} ms`);
    expect(r).toEqual({ commit: fx.commits.c2, name: 'app', path: join(ws, 'app') });
    expect(await readFile(join(ws, 'app/README'), 'utf8')).toBe('v2\n');
    expect(existsSync(join(ws, 'app/.git/shallow'))).toBe(true);
    expect(headOf(r.path)).toBe(fx.commits.c2);
    for (const p of ['app', 'app/README', 'app/.git', 'app/.git/HEAD']) {
      const st = statSync(join(ws, p));
      expect([p, st.uid, st.gid]).toEqual([p, 100_000, 100_000]);
    }
    expect(statSync(join(ws, 'app/build.sh')).mode & 0o111).not.toBe(0);
    expect(lines.some((l) => l.includes('checked out'))).toBe(true);
    expect(await readdir(ws)).toEqual(['app']);
  });

  test('a branch, a tag and a commit (full and abbreviated)', async () => {
    const branch = await checkoutRepository({ url: pub, ref: 'feature', workspaceDir: ws, owner, name: 'b' });
    expect(branch.commit).toBe(fx.commits.c3);
    expect(await readFile(join(ws, 'b/FEATURE'), 'utf8')).toBe('feature\n');
    const tag = await checkoutRepository({ url: pub, ref: 'v1', workspaceDir: ws, owner, name: 't' });
    expect(tag.commit).toBe(fx.commits.c1);
    expect(await readFile(join(ws, 't/README'), 'utf8')).toBe('v1\n');
    const commit = await checkoutRepository({ url: pub, ref: fx.commits.c3, workspaceDir: ws, owner, name: 'c' });
    expect(commit.commit).toBe(fx.commits.c3);
    expect(headOf(join(ws, 'c'))).toBe(fx.commits.c3);
    expect(existsSync(join(ws, 'c/.git/shallow'))).toBe(true);
    const short = await checkoutRepository({ url: pub, ref: fx.commits.c1.slice(0, 10), workspaceDir: ws, owner, name: 's' });
    expect(short.commit).toBe(fx.commits.c1);
    expect((await readdir(ws)).sort()).toEqual(['b', 'c', 's', 't']);
  });

  test('private repository: the right credential works and is stored nowhere', async () => {
    const { username, password } = fx.credentials;
    const r = await checkoutRepository({ url: priv, ref: 'main', credentials: { username, password }, workspaceDir: ws, owner });
    expect(r.commit).toBe(fx.commits.c2);
    expect(r.name).toBe('secret-app');
    expect(fx.authHeaders.length).toBeGreaterThan(0);
    const b64 = Buffer.from(`${username}:${password}`).toString('base64');
    const grep = (needle: string) => {
      try {
        return execFileSync('grep', ['-rl', '--', needle, ws], { encoding: 'utf8' });
      } catch (e) {
        if ((e as { status?: number }).status === 1) return '';
        throw e;
      }
    };
    expect(grep(password)).toBe('');
    expect(grep(b64)).toBe('');
    expect(await readFile(join(ws, 'secret-app/.git/config'), 'utf8')).not.toMatch(/extraheader|authorization/i);
  });

  test('wrong or missing credentials fail clearly and leave nothing', async () => {
    const wrong = await checkoutRepository({ url: priv, credentials: { username: 'builder', password: 'nope' }, workspaceDir: ws, owner }).catch((e: unknown) => e);
    expect(wrong).toBeInstanceOf(CheckoutError);
    expect((wrong as CheckoutError).code).toBe('AUTH_FAILED');
    expect((wrong as CheckoutError).gitStderr).toMatch(/Username|Authentication|401/);
    expect((wrong as Error).message).not.toContain('nope');
    const none = await checkoutRepository({ url: priv, workspaceDir: ws, owner }).catch((e: unknown) => e);
    expect((none as CheckoutError).code).toBe('AUTH_FAILED');
    await expect(resolveRemoteRef(priv, 'main', { username: 'builder', password: 'nope' })).rejects.toMatchObject({ code: 'AUTH_FAILED' });
    expect(await readdir(ws)).toEqual([]);
  });

  test('unknown refs, missing repositories and bad URLs', async () => {
    const unknown = await checkoutRepository({ url: pub, ref: 'no-such-branch', workspaceDir: ws, owner }).catch((e: unknown) => e);
    expect((unknown as CheckoutError).code).toBe('UNKNOWN_REF');
    expect((unknown as Error).message).toContain('no-such-branch');
    const badSha = await checkoutRepository({ url: pub, ref: 'f'.repeat(40), workspaceDir: ws, owner }).catch((e: unknown) => e);
    expect((badSha as CheckoutError).code).toBe('UNKNOWN_REF');
    const missing = await checkoutRepository({ url: `${fx.daemonUrl}/nope.git`, workspaceDir: ws, owner }).catch((e: unknown) => e);
    expect((missing as CheckoutError).code).toBe('REPO_NOT_FOUND');
    expect((missing as CheckoutError).gitStderr).not.toBe('');
    for (const url of ['file:///etc', '/etc', 'ext::sh -c touch% /tmp/pwned', '-upload-pack=touch', 'https://u:pw@example.invalid/x.git', 'ftp://example.invalid/x.git']) {
      const e = await checkoutRepository({ url, workspaceDir: ws, owner }).catch((x: unknown) => x);
      expect([url, (e as CheckoutError).code]).toEqual([url, 'INVALID_URL']);
    }
    expect(await readdir(ws)).toEqual([]);
    await checkoutRepository({ url: pub, workspaceDir: ws, owner });
    await expect(checkoutRepository({ url: pub, workspaceDir: ws, owner })).rejects.toMatchObject({ code: 'DESTINATION_EXISTS' });
  });

  test('resolveRemoteRef: HEAD, branches, peeled tags, private repositories, new commits', async () => {
    expect(await resolveRemoteRef(pub)).toBe(fx.commits.c2);
    expect(await resolveRemoteRef(pub, 'feature')).toBe(fx.commits.c3);
    expect(await resolveRemoteRef(pub, 'refs/heads/feature')).toBe(fx.commits.c3);
    expect(await resolveRemoteRef(pub, 'v1')).toBe(fx.commits.c1);
    expect(await resolveRemoteRef(priv, 'main', fx.credentials)).toBe(fx.commits.c2);
    await expect(resolveRemoteRef(pub, 'nope')).rejects.toMatchObject({ code: 'UNKNOWN_REF' });
    const c4 = await fx.pushCommit('NEW', 'new\n');
    expect(await resolveRemoteRef(pub, 'main')).toBe(c4);
  });

  test('repoNameFromUrl', () => {
    expect(repoNameFromUrl('https://h/o/app.git')).toBe('app');
    expect(repoNameFromUrl('https://h/o/app/')).toBe('app');
    expect(repoNameFromUrl('git@github.com:o/my.repo.git')).toBe('my.repo');
    expect(() => repoNameFromUrl('https://h/')).toThrow();
  });
});
