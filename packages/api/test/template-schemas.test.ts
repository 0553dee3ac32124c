import { describe, expect, it } from 'vitest';
import { parseDuration } from '@devyard/api/duration-format';
import { CreateTemplateRequestSchema, parseOciReference } from '@devyard/api/template-schemas';

const DIGEST = `sha256:${'a'.repeat(64)}`;

/** The first issue's field and message, the way the API and the CLI report it. */
function firstError(input: unknown): { field: string; message: string } | undefined {
  const r = CreateTemplateRequestSchema.safeParse(input);
  if (r.success) return undefined;
  const i = r.error.issues[0]!;
  return { field: i.path.map(String).join('.'), message: i.message };
}

describe('OCI references', () => {
  it.each([
    ['ghcr.io/acme/dev:1.4', { registry: 'ghcr.io', repository: 'acme/dev', tag: '1.4' }],
    ['localhost:5000/dev', { registry: 'localhost:5000', repository: 'dev' }],
    ['localhost/dev:latest', { registry: 'localhost', repository: 'dev', tag: 'latest' }],
    [`docker.io/library/debian@${DIGEST}`, { registry: 'docker.io', repository: 'library/debian', digest: DIGEST }],
    [`registry.example.com:443/a/b-c/d_e:v1@${DIGEST}`, { registry: 'registry.example.com:443', repository: 'a/b-c/d_e', tag: 'v1', digest: DIGEST }],
  ])('parses %s', (ref, want) => {
    expect(parseOciReference(ref)).toEqual(want);
  });

  it.each(['ubuntu', 'ubuntu:22.04', 'library/ubuntu', 'ghcr.io/Acme/dev', 'ghcr.io/acme/dev:', `ghcr.io/acme/dev@sha256:${'a'.repeat(10)}`, 'ghcr.io//dev', 'https://ghcr.io/acme/dev', 'ghcr.io/acme/dev:-bad'])(
    'refuses %s',
    (ref) => {
      expect(parseOciReference(ref)).toBeUndefined();
    },
  );
});

describe('durations', () => {
  it('reads the units people write', () => {
    expect(parseDuration('30m')).toBe(30 * 60_000);
    expect(parseDuration('8h')).toBe(8 * 3_600_000);
    expect(parseDuration('1h30m')).toBe(90 * 60_000);
    expect(parseDuration('2d')).toBe(2 * 86_400_000);
    expect(parseDuration('45s')).toBe(45_000);
  });
  it.each(['', '0m', '30', '30min', '1.5h', '30m1h', 'h', '-1h', ' 1h'])('refuses %j', (s) => {
    expect(parseDuration(s)).toBeUndefined();
  });
});

describe('template spec', () => {
  const full = {
    name: 'web',
    description: 'the web app',
    image: 'ghcr.io/acme/web-dev:2024.06',
    runtime: 'microvm',
    defaultResources: { cpu: 2, memory: '4GiB', disk: '20GiB', gpu: 0 },
    maxResources: { cpu: 8, memory: '16GiB', disk: '100GiB', gpu: 1 },
    repository: { url: 'https://github.com/acme/web.git', ref: 'main', credentialsSecret: 'github-token' },
    hooks: {
      onCreate: 'npm ci',
      updateContent: ['npm', 'run', 'build'],
      postCreate: { db: 'make db', assets: ['make', 'assets'] },
      postStart: 'npm run dev &',
    },
    env: { NODE_ENV: 'development' },
    user: 'dev',
    ports: [3000, { port: 5432, label: 'postgres' }],
    idleTimeout: '30m',
    maxLifetime: '8h',
    warmPoolSize: 2,
  };

  it('accepts every field', () => {
    const r = CreateTemplateRequestSchema.parse(full);
    expect(r).toEqual(full);
  });

  it('accepts the old minimal shape and built-in images, defaulting the runtime', () => {
    expect(CreateTemplateRequestSchema.parse({ name: 'x', image: 'tiny' })).toEqual({ name: 'x', image: 'tiny', runtime: 'sandbox' });
    expect(CreateTemplateRequestSchema.parse({ name: 'x', image: 'base', runtime: 'sandbox' }).image).toBe('base');
  });

  it('accepts a build recipe instead of an image', () => {
    const r = CreateTemplateRequestSchema.parse({ name: 'b', build: { from: 'base', packages: ['build-essential', 'python3.11', 'libssl-dev', 'g++', 'curl=7.88.1-10+deb12u5'], run: ['pip install poetry'] } });
    expect(r.build?.packages).toHaveLength(5);
  });

  it.each<[string, Record<string, unknown>, string, RegExp]>([
    ['both image and build', { image: 'tiny', build: { from: 'base' } }, 'build', /exactly one of image or build/],
    ['neither image nor build', {}, 'image', /exactly one of image or build/],
    ['an image without a registry host', { image: 'ubuntu:22.04' }, 'image', /registry host/],
    ['a malformed OCI reference', { image: 'ghcr.io/Acme/Dev' }, 'image', /OCI reference/],
    ['a bad build base', { build: { from: 'node:20' } }, 'build.from', /registry host/],
    ['a bad Debian package', { build: { from: 'base', packages: ['Curl'] } }, 'build.packages.0', /Debian package/],
    ['a shell injection as a package', { build: { from: 'base', packages: ['curl; rm -rf /'] } }, 'build.packages.0', /Debian package/],
    ['an unknown build field', { build: { from: 'base', copy: ['x'] } }, 'build', /Unrecognized key/],
    ['a bad idle timeout', { image: 'tiny', idleTimeout: '30 minutes' }, 'idleTimeout', /duration/],
    ['a zero lifetime', { image: 'tiny', maxLifetime: '0h' }, 'maxLifetime', /duration/],
    ['a negative warm pool', { image: 'tiny', warmPoolSize: -1 }, 'warmPoolSize', /too small|>=0/],
    ['a fractional warm pool', { image: 'tiny', warmPoolSize: 1.5 }, 'warmPoolSize', /expected int/],
    ['a fractional GPU', { image: 'tiny', defaultResources: { gpu: 0.5 } }, 'defaultResources.gpu', /expected int/],
    ['a negative GPU', { image: 'tiny', maxResources: { gpu: -1 } }, 'maxResources.gpu', /too small|>=0/],
    ['a hook of the wrong type', { image: 'tiny', hooks: { postCreate: 42 } }, 'hooks.postCreate', /shell command string, an exec array/],
    ['an empty named-command object', { image: 'tiny', hooks: { postStart: {} } }, 'hooks.postStart', /.+/],
    ['an unknown hook', { image: 'tiny', hooks: { postAttach: 'x' } }, 'hooks', /Unrecognized key/],
    ['a port out of range', { image: 'tiny', ports: [70000] }, 'ports.0', /<=65535|port number/],
    ['a repeated port', { image: 'tiny', ports: [3000, { port: 3000 }] }, 'ports', /must not repeat/],
    ['a repository URL that is not git', { image: 'tiny', repository: { url: 'not a url' } }, 'repository.url', /https:\/\//],
    ['a bad secret name', { image: 'tiny', repository: { url: 'git@github.com:acme/web.git', credentialsSecret: 'Bad Name' } }, 'repository.credentialsSecret', /lowercase/],
    ['a bad env name', { image: 'tiny', env: { 'BAD-NAME': 'x' } }, 'env.BAD-NAME', /environment variable/],
    ['a bad user', { image: 'tiny', user: 'Root User' }, 'user', /Linux user/],
  ])('refuses %s, naming the field', (_what, fields, field, message) => {
    const e = firstError({ name: 'x', ...fields });
    expect(e?.field).toBe(field);
    expect(e?.message).toMatch(message);
  });
});
