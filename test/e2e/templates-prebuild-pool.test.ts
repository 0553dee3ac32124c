/**
 * Templates end to end, as a team would use them: a devcontainer.json with lifecycle commands is
 * pushed as a template whose image comes from a real registry on loopback (pinned to its digest)
 * and whose repository comes from a real git server; boxes are cloned from a prebuild and served
 * from a warm pool of 2 by `devyard up` with the real sandbox runtime.
 */
import { mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { busyboxRootEntries, OciLayoutBuilder, tarLayer } from '../../packages/oci/test/oci-layout-builder.js';
import { TestRegistry } from '../../packages/oci/test/registry-test-host.js';
import { GitFixture } from '../../packages/agent/test/workspace-git-fixture.js';
import { cleanup, cli, cliAsync, cliOk, newHarness, startUp, waitUntil, type Harness } from './devyard-harness.js';

const APPLETS = ['sh', 'cat', 'echo', 'ls', 'hostname', 'env', 'mkdir', 'touch', 'sleep', 'true', 'grep', 'id', 'wc'];

let h: Harness;
let registry: TestRegistry;
let git: GitFixture;
let imageRef: string;

const until = <T>(fn: () => T | Promise<T>, ok: (v: T) => boolean, ms = 60_000) => waitUntil(h, fn, ok, ms);

const runningPoolBoxes = async () => {
  const m = /devyard_boxes\{phase="running"\} (\d+)/.exec(await (await fetch(`${h.url}/metrics`)).text());
  const users = JSON.parse(cliOk(h, ['list', '--json'])) as Array<{ phase: string }>;
  return Number(m?.[1] ?? 0) - users.filter((b) => b.phase === 'running').length;
};

beforeAll(async () => {
  registry = await TestRegistry.start();
  const work = join(registry.dir, 'work');
  const layout = new OciLayoutBuilder(join(work, 'layout'));
  const image = await layout.image([
    await tarLayer(
      busyboxRootEntries(APPLETS, [
        { path: 'etc/group', content: 'root:x:0:\n' },
        { path: 'etc/motd', content: 'from the registry\n' },
      ]),
    ),
  ]);
  await layout.tag('1', image);
  await registry.push(layout.dir, '1', 'devyard/tools:1');
  imageRef = `${registry.host}/devyard/tools:1`;
  git = await GitFixture.start();
  h = newHarness('tpl', 221);
  await startUp(h);
});

afterAll(async () => {
  if (h) await cleanup(h);
  await git?.close();
  await registry?.stop();
});

describe('templates from a devcontainer.json, a registry image, a repository, a prebuild and a warm pool', () => {
  let digest = '';

  it('pushes a devcontainer.json as a template: image pinned, unsupported fields warned about', () => {
    const dir = join(h.dir, 'project', '.devcontainer');
    mkdirSync(dir, { recursive: true });
    writeFileSync(
      join(dir, 'devcontainer.json'),
      `// a project's dev container
{
  "name": "App",
  "image": "${imageRef}",
  "containerEnv": { "GREETING": "hello" },
  "forwardPorts": [3000],
  "onCreateCommand": "echo built-once > /workspace/.oncreate && ./build.sh",
  "postCreateCommand": "echo \\"claimed by $(hostname)\\" > /workspace/.postcreate",
  "postStartCommand": "ls /run/devyard/secrets > /workspace/.secrets-at-start; date > /tmp/started",
  "customizations": { "vscode": { "extensions": ["x.y"] } },
}
`,
    );
    // An organization secret exists before the pool fills: pool boxes must not hold it.
    expect(cli(h, ['secrets', 'set', 'POOL_PROBE', '--org', '--from-file', '-'], 'probe-value').code).toBe(0);
    const r = cli(h, ['templates', 'push', join(h.dir, 'project'), '--repository', `${git.daemonUrl}/app.git`, '--warm-pool', '2', '--json']);
    expect(r.code, r.stderr).toBe(0);
    const t = JSON.parse(r.stdout);
    expect(t).toMatchObject({ name: 'app', version: 1, image: imageRef, warmPoolSize: 2, repository: { url: `${git.daemonUrl}/app.git` } });
    expect(t.imageDigest).toMatch(/^sha256:[0-9a-f]{64}$/);
    digest = t.imageDigest;
    expect(r.stderr).toContain('customizations');
    expect(t.hooks.postCreate).toBeTruthy();
  });

  it('fills a warm pool of 2 from a prebuild (checkout and onCreate done once per commit)', async () => {
    await until(runningPoolBoxes, (n) => n >= 2, 120_000);
  }, 150_000);

  it('create claims a pool box: running at once, renamed, postCreate run for the user', async () => {
    const r = cli(h, ['create', 'mine', '--template', 'app', '--wait', '--json']);
    expect(r.code, r.stderr).toBe(0);
    const box = JSON.parse(r.stdout);
    expect(box).toMatchObject({ name: 'mine', phase: 'running', template: 'app' });
    expect(box.image).toBe(`${imageRef}@${digest}`);
    const events = cliOk(h, ['events', 'mine']);
    expect(events).toContain('Claimed');
    expect(events).toMatch(/prebuild/);
    // The image is the registry's, the repository is checked out, onCreate ran in the prebuild.
    expect(cliOk(h, ['exec', 'mine', '--', 'cat', '/etc/motd'])).toBe('from the registry\n');
    expect(cliOk(h, ['exec', 'mine', '--', 'cat', '/workspace/app/README'])).toBe('v2\n');
    expect(cliOk(h, ['exec', 'mine', '--', 'cat', '/workspace/.oncreate', '/workspace/app/built.txt'])).toBe('built-once\nbuilt\n');
    expect(cliOk(h, ['exec', 'mine', '--', 'sh', '-c', 'echo $GREETING'])).toBe('hello\n');
    // postCreate runs after the claim, under the user's name.
    const post = await until(() => cli(h, ['exec', 'mine', '--', 'cat', '/workspace/.postcreate']).stdout, (s) => s.length > 0, 20_000);
    expect(post).toBe('claimed by mine\n');
    expect(cliOk(h, ['exec', 'mine', '--', 'hostname'])).toBe('mine\n');
    // The pool box started (and ran the template's postStart) without secrets; they came with the claim.
    expect(cliOk(h, ['exec', 'mine', '--', 'cat', '/workspace/.secrets-at-start'])).toBe('');
    expect(cliOk(h, ['exec', 'mine', '--', 'cat', '/run/devyard/secrets/POOL_PROBE'])).toBe('probe-value');
  }, 60_000);

  it('boxes are copy-on-write clones: one box does not see another one\'s changes', async () => {
    await until(runningPoolBoxes, (n) => n >= 2, 120_000);
    cliOk(h, ['create', 'other', '--template', 'app', '--wait']);
    cliOk(h, ['exec', 'mine', '--', 'sh', '-c', 'echo mine > /workspace/app/README']);
    expect(cliOk(h, ['exec', 'other', '--', 'cat', '/workspace/app/README'])).toBe('v2\n');
    // Changes survive stop/start of the box that made them.
    cliOk(h, ['stop', 'mine', '--wait']);
    cliOk(h, ['start', 'mine', '--wait']);
    expect(cliOk(h, ['exec', 'mine', '--', 'cat', '/workspace/app/README'])).toBe('mine\n');
  }, 180_000);

  it('a new commit on the tracked ref triggers a new prebuild, used by new boxes', async () => {
    const commit = await git.pushCommit('README', 'v3\n');
    // The node polls the tracked ref (every 2 s in this test, a minute by default) and prebuilds.
    await until(
      () => JSON.parse(cliOk(h, ['templates', 'prebuilds', 'app', '--json'])) as Array<{ status: string; commit: string }>,
      (l) => l.some((p) => p.commit === commit && p.status === 'ready'),
    );
    // Boxes already in the pool stay at their commit; a create that has no pool box to claim
    // (different resources) is cloned from the new prebuild.
    const r = cli(h, ['create', 'fresh', '--template', 'app', '--memory', '256MiB', '--wait']);
    expect(r.code, r.stderr).toBe(0);
    expect(cliOk(h, ['exec', 'fresh', '--', 'cat', '/workspace/app/README'])).toBe('v3\n');
    cliOk(h, ['delete', 'fresh', '--wait']);
  }, 180_000);

  it('shows the template\'s prebuilds with their logs, one per commit', async () => {
    const list = await until(
      () => JSON.parse(cliOk(h, ['templates', 'prebuilds', 'app', '--json'])) as Array<{ status: string; commit: string; logTail: string[] }>,
      (l) => l.filter((p) => p.status === 'ready').length >= 2,
    );
    expect(new Set(list.map((p) => p.commit)).size).toBeGreaterThanOrEqual(2);
    expect(list.flatMap((p) => p.logTail).join('\n')).toMatch(/onCreate/);
    expect(cliOk(h, ['templates', 'prebuilds', 'app'])).toMatch(/ready/);
  }, 90_000);

  it('builds an image from a recipe once, streaming its log to create --wait', () => {
    writeFileSync(join(h.dir, 'recipe.yaml'), `name: recipe\nbuild:\n  from: tiny\n  run:\n    - echo recipe-step; echo baked > /etc/baked\n`);
    cliOk(h, ['templates', 'push', join(h.dir, 'recipe.yaml')]);
    const r = cli(h, ['create', 'baked', '--template', 'recipe', '--wait']);
    expect(r.code, r.stderr).toBe(0);
    // The build log reaches the box's events (what `create --wait` shows while it waits; a fast
    // build may finish before the watch prints its lines, so look at the timeline).
    expect(cliOk(h, ['events', 'baked'])).toMatch(/Progress\s.*build:/);
    expect(cliOk(h, ['exec', 'baked', '--', 'cat', '/etc/baked'])).toBe('baked\n');
    // A second box reuses the built image: no build log this time.
    const again = cli(h, ['create', 'baked2', '--template', 'recipe', '--wait']);
    expect(again.code, again.stderr).toBe(0);
    expect(again.stderr).not.toContain('recipe-step');
    expect(cliOk(h, ['exec', 'baked2', '--', 'cat', '/etc/baked'])).toBe('baked\n');
    cliOk(h, ['delete', 'baked', '--wait']);
    cliOk(h, ['delete', 'baked2', '--wait']);
  }, 120_000);

  it('checks out a private repository with the credentials secret the template names', async () => {
    const url = `${git.httpUrl}/secret-app.git`;
    writeFileSync(join(h.dir, 'private.yaml'), `name: private\nimage: tiny\nrepository:\n  url: ${url}\n  credentialsSecret: gitcreds\n`);
    cliOk(h, ['templates', 'push', join(h.dir, 'private.yaml')]);
    // Without the secret on the node: a clear error naming where it is expected.
    // (async: the private git server runs in this process and must keep answering)
    const missing = await cliAsync(h, ['create', 'nocreds', '--template', 'private', '--wait']);
    expect(missing.code).not.toBe(0);
    expect(missing.stderr).toContain('secret "gitcreds" is not on this node');
    cliOk(h, ['delete', 'nocreds', '--wait']);
    const secrets = join(h.dataDir, 'node', 'secrets');
    mkdirSync(secrets, { recursive: true });
    writeFileSync(join(secrets, 'gitcreds.json'), JSON.stringify(git.credentials), { mode: 0o600 });
    const r = await cliAsync(h, ['create', 'priv', '--template', 'private', '--wait']);
    expect(r.code, r.stderr).toBe(0);
    expect(cliOk(h, ['exec', 'priv', '--', 'cat', '/workspace/secret-app/README'])).toBe('v3\n');
    // The credential is nowhere in the box.
    expect(cli(h, ['exec', 'priv', '--', 'grep', '-rl', git.credentials.password, '/workspace', '/etc', '/root']).stdout).toBe('');
    cliOk(h, ['delete', 'priv', '--wait']);
  }, 120_000);

  it('a failing hook is a clear error with the log tail, after bounded retries', () => {
    writeFileSync(join(h.dir, 'broken.yaml'), `name: broken\nimage: tiny\nhooks:\n  postCreate: "echo about to fail; exit 3"\n`);
    cliOk(h, ['templates', 'push', join(h.dir, 'broken.yaml')]);
    const r = cli(h, ['create', 'bad', '--template', 'broken', '--wait']);
    expect(r.code).not.toBe(0);
    expect(r.stderr).toContain('postCreate');
    expect(r.stderr).toContain('about to fail');
    expect(JSON.parse(cliOk(h, ['get', 'bad', '--json'])).phase).toBe('failed');
  }, 120_000);

  it('cleans up: deleting the boxes leaves the prebuild for the next ones', () => {
    for (const b of ['mine', 'other', 'bad']) cliOk(h, ['delete', b, '--wait']);
    expect(JSON.parse(cliOk(h, ['list', '--json']))).toEqual([]);
  }, 120_000);
});
