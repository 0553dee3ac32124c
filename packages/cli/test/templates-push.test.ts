/**
 * Runs the real `bin/devyard templates …` commands (the compiled CLI) against an in-process control
 * plane: YAML templates and devcontainer.json imports, end to end through the API.
 */
import { execFile, execFileSync } from 'node:child_process';
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { startControlPlane, type ControlPlane } from '@devyard/server/control-plane';

const root = fileURLToPath(new URL('../../..', import.meta.url));
let dir: string;
let cp: ControlPlane;

function devyard(...args: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  return new Promise((resolve) => {
    execFile(
      process.execPath,
      [join(root, 'bin/devyard'), ...args],
      { cwd: dir, env: { ...process.env, DEVYARD_URL: cp.url, DEVYARD_TOKEN: cp.tokens.adminToken, DEVYARD_CONFIG: join(dir, 'no-config.json') } },
      (err, stdout, stderr) => resolve({ code: err ? ((err as { code?: number }).code ?? 1) : 0, stdout, stderr }),
    );
  });
}

beforeAll(async () => {
  // The test runs the compiled CLI, so compile what it is about to run.
  execFileSync(process.execPath, [join(root, 'node_modules/typescript/bin/tsc'), '-b', 'packages/cli'], { cwd: root, stdio: 'inherit' });
  dir = mkdtempSync(join(tmpdir(), 'devyard-cli-templates-'));
  cp = await startControlPlane({ dataDir: join(dir, 'data') });
}, 180_000);

afterAll(async () => {
  await cp?.close();
  rmSync(dir, { recursive: true, force: true });
});

const TEMPLATE_YAML = `# the team's standard box
name: team-web
description: web team box
image: base
runtime: sandbox
defaultResources: { cpu: 1, memory: 1GiB, disk: 10GiB }
maxResources: { cpu: 4, memory: 8GiB, disk: 50GiB, gpu: 1 }
repository:
  url: https://github.com/acme/web.git
  ref: main
  credentialsSecret: github-token
hooks:
  onCreate: npm ci
  postCreate:
    db: make db
    assets: [make, assets]
  postStart: [npm, run, dev]
env:
  NODE_ENV: development
user: dev
ports: [3000, { port: 5432, label: postgres }]
idleTimeout: 30m
maxLifetime: 8h
warmPoolSize: 2
`;

describe('devyard templates push', () => {
  it('publishes a YAML template and shows every field with get, versions and list', async () => {
    writeFileSync(join(dir, 'team-web.yaml'), TEMPLATE_YAML);
    const pushed = await devyard('templates', 'push', 'team-web.yaml');
    expect(pushed).toMatchObject({ code: 0, stderr: '' });
    expect(pushed.stdout).toBe('template team-web v1 published\n');

    const json = JSON.parse((await devyard('templates', 'get', 'team-web', '--json')).stdout);
    expect(json).toMatchObject({ name: 'team-web', version: 1, imageDigest: null, warmPoolSize: 2, idleTimeout: '30m', ports: [{ port: 3000, label: null }, { port: 5432, label: 'postgres' }] });

    const shown = await devyard('templates', 'get', 'team-web');
    expect(shown.code).toBe(0);
    for (const line of [/Image\s+base/, /Digest\s+- \(built-in image\)/, /Repository\s+https:\/\/github.com\/acme\/web.git @ main \(credentials: secret github-token\)/, /Hook onCreate\s+npm ci/, /Hook postCreate\s+db: make db; assets: \["make","assets"\]/, /Ports\s+3000, 5432 \(postgres\)/, /Idle timeout\s+30m/, /Max lifetime\s+8h/, /Warm pool\s+2/, /Maximum\s+.*gpu 1/]) {
      expect(shown.stdout).toMatch(line);
    }

    expect((await devyard('templates', 'push', 'team-web.yaml', '--name', 'team-web')).code).toBe(0);
    const versions = JSON.parse((await devyard('templates', 'versions', 'team-web', '--json')).stdout);
    expect(versions.map((v: { version: number }) => v.version)).toEqual([1, 2]);
    expect((await devyard('templates', 'get', 'team-web', '--version', '1', '--json')).stdout).toContain('"version": 1');
    expect((await devyard('templates', '--json')).stdout).toContain('"team-web"');
  });

  it('imports a devcontainer.json, printing warnings on stderr and including them in --json', async () => {
    const project = join(dir, 'acme-api');
    mkdirSync(join(project, '.devcontainer'), { recursive: true });
    writeFileSync(
      join(project, '.devcontainer/devcontainer.json'),
      `{
        // no name: the project folder names the template
        "build": { "dockerfile": "Dockerfile" },
        "features": { "ghcr.io/devcontainers/features/node:1": {} },
        "forwardPorts": [8000],
        "postCreateCommand": "pip install -e .",
        "remoteUser": "vscode",
      }`,
    );
    writeFileSync(join(project, '.devcontainer/Dockerfile'), 'FROM base\nRUN apt-get update && apt-get install -y --no-install-recommends python3-pip\nWORKDIR /src\n');

    const dry = await devyard('templates', 'push', project, '--dry-run');
    expect(dry.code).toBe(0);
    expect(JSON.parse(dry.stdout)).toMatchObject({ name: 'acme-api', build: { from: 'base', packages: ['python3-pip'] }, ports: [8000], user: 'vscode', hooks: { postCreate: 'pip install -e .' } });
    expect((await devyard('templates', 'get', 'acme-api')).code).toBe(4);

    const r = await devyard('templates', 'push', project, '--json');
    expect(r.code).toBe(0);
    expect(r.stderr).toMatch(/^devyard: warning: .*devcontainer\.json: "features" is not supported/m);
    expect(r.stderr).toMatch(/WORKDIR is not supported/);
    const out = JSON.parse(r.stdout);
    expect(out).toMatchObject({ name: 'acme-api', version: 1, build: { from: 'base', packages: ['python3-pip'] }, user: 'vscode' });
    expect(out.warnings).toEqual([expect.stringContaining('"features"'), expect.stringContaining('WORKDIR')]);
  });

  it('fails with one line and publishes nothing for invalid files', async () => {
    writeFileSync(join(dir, 'devcontainer.json'), '{ "name": "broken", "image": "tiny", ');
    const bad = await devyard('templates', 'push', 'devcontainer.json');
    expect(bad.code).not.toBe(0);
    expect(bad.stderr).toMatch(/^devyard: error: devcontainer\.json: not valid JSON with comments at line 1, column \d+: \w+\n$/);
    expect((await devyard('templates', 'get', 'broken')).code).toBe(4);

    writeFileSync(join(dir, 'bad.yaml'), 'name: bad\nimage: ubuntu\n');
    const badYaml = await devyard('templates', 'push', 'bad.yaml');
    expect(badYaml.code).not.toBe(0);
    expect(badYaml.stderr).toMatch(/^devyard: error: bad\.yaml: image: must be a built-in image .*\n$/);
    expect((await devyard('templates', 'get', 'bad')).code).toBe(4);
  });
});
