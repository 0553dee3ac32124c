/**
 * In-process HTTP tests of publishing templates with the full spec: the app is assembled as the
 * control plane assembles it, but with a scripted image resolver, so pinning is tested without a
 * registry (the registry client has its own tests against a real one).
 */
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { FastifyInstance } from 'fastify';
import { Kysely, Migrator, SqliteDialect } from 'kysely';
import SqliteDb from 'better-sqlite3';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { CreateTemplateInput } from '@devyard/api/template-schemas';
import { ensureBootstrapTokens } from '@devyard/server/bootstrap-tokens';
import { ChangeFeed } from '@devyard/server/change-feed';
import { createApp } from '@devyard/server/http/create-app';
import { createHandlers, type HandlerDeps } from '@devyard/server/http/api-handlers';
import { TenancyService } from '@devyard/server/services/tenancy-service';
import { TenancyStore } from '@devyard/server/store/tenancy-store';
import { BoxService } from '@devyard/server/services/box-service';
import { NodeService } from '@devyard/server/services/node-service';
import { TemplateService, type ImageDigestResolver } from '@devyard/server/services/template-service';
import type { Database } from '@devyard/server/store/database-schema';
import { migrationProvider } from '@devyard/server/store/migrations';
import { openSqliteDatabase } from '@devyard/server/store/sqlite-database';
import { Store } from '@devyard/server/store/store';

const D1 = `sha256:${'1'.repeat(64)}`;
const D2 = `sha256:${'2'.repeat(64)}`;

/** A registry in a map: tags point at digests, and any reference may be made to fail or hang. */
class FakeResolver implements ImageDigestResolver {
  tags = new Map<string, string>([['ghcr.io/acme/dev:1', D1], ['localhost:5000/tools:latest', D2], [`ghcr.io/acme/dev@${D1}`, D1]]);
  calls: string[] = [];
  hang = new Set<string>();
  async resolve(ref: string): Promise<string> {
    this.calls.push(ref);
    if (this.hang.has(ref)) return new Promise(() => {});
    if (ref === 'unreachable.example.com/x:1') throw new Error('connect ECONNREFUSED 10.0.0.1:443');
    const d = this.tags.get(ref);
    if (!d) throw new Error(`manifest unknown: ${ref}`);
    return d;
  }
}

let dir: string;
let app: FastifyInstance;
let store: Store;
let token: string;
const resolver = new FakeResolver();

async function call(method: string, path: string, body?: unknown) {
  const res = await app.inject({ method: method as 'GET', url: path, headers: { authorization: `Bearer ${token}`, ...(body !== undefined ? { 'content-type': 'application/json' } : {}) }, payload: body === undefined ? undefined : JSON.stringify(body) });
  return { status: res.statusCode, type: res.headers['content-type'], body: res.body ? JSON.parse(res.body) : undefined };
}
const push = (t: CreateTemplateInput) => call('POST', '/v1/templates', t);

beforeAll(async () => {
  dir = mkdtempSync(join(tmpdir(), 'devyard-templates-'));
  store = new Store(await openSqliteDatabase(join(dir, 'devyard.db')));
  const now = Date.now;
  const feed = new ChangeFeed();
  const templates = new TemplateService(store, now, { imageResolver: resolver, resolveTimeoutMs: 200 });
  await templates.seedBuiltins();
  token = (await ensureBootstrapTokens(store, dir, now())).adminToken;
  // Only the template routes are exercised; the other services are not needed for them.
  const tenancyStore = new TenancyStore(store.db);
  const tenancy = new TenancyService(store, tenancyStore, now);
  const handlers = createHandlers({ store, feed, templates, boxes: new BoxService(store, feed, now), nodes: new NodeService(store, feed, now), now, tenancy, tenancyStore } as unknown as HandlerDeps);
  app = createApp({ store, handlers, principal: (row) => tenancy.principalForToken(row) });
  await app.ready();
});

afterAll(async () => {
  await app.close();
  await store.close();
  rmSync(dir, { recursive: true, force: true });
});

describe('publishing full template specs', () => {
  it('stores every field and answers it back, the built-ins unchanged and unpinned', async () => {
    const r = await push({
      name: 'web',
      description: 'web app',
      image: 'ghcr.io/acme/dev:1',
      runtime: 'sandbox',
      defaultResources: { cpu: 2, memory: '2GiB', gpu: 1 },
      maxResources: { cpu: 4, memory: '8GiB', gpu: 2 },
      repository: { url: 'https://github.com/acme/web.git', ref: 'main', credentialsSecret: 'gh' },
      hooks: { onCreate: 'make deps', postCreate: { db: 'make db', web: ['make', 'web'] }, postStart: ['npm', 'start'] },
      env: { A: '1' },
      user: 'dev',
      ports: [3000, { port: 8080, label: 'api' }],
      idleTimeout: '30m',
      maxLifetime: '8h',
      warmPoolSize: 3,
    });
    expect(r.status).toBe(201);
    expect(r.body).toMatchObject({
      name: 'web',
      version: 1,
      image: 'ghcr.io/acme/dev:1',
      imageDigest: D1,
      build: null,
      defaultResources: { cpuMillis: 2000, memoryBytes: 2 * 1024 ** 3, gpu: 1 },
      maxResources: { cpuMillis: 4000, gpu: 2 },
      repository: { url: 'https://github.com/acme/web.git', ref: 'main', credentialsSecret: 'gh' },
      hooks: { onCreate: 'make deps', postCreate: { db: 'make db', web: ['make', 'web'] }, postStart: ['npm', 'start'] },
      user: 'dev',
      ports: [{ port: 3000, label: null }, { port: 8080, label: 'api' }],
      idleTimeout: '30m',
      maxLifetime: '8h',
      warmPoolSize: 3,
    });
    expect((await call('GET', '/v1/templates/web')).body).toEqual(r.body);
    const base = (await call('GET', '/v1/templates/base')).body;
    expect(base).toMatchObject({ image: 'base', imageDigest: null, build: null, hooks: {}, ports: [], warmPoolSize: 0, idleTimeout: null, defaultResources: { gpu: 0 } });
  });

  it('pins build recipes by their base image, and leaves built-in bases unpinned', async () => {
    const oci = await push({ name: 'tools', build: { from: 'localhost:5000/tools:latest', packages: ['jq'], run: ['echo hi > /etc/motd'] } });
    expect(oci.status).toBe(201);
    expect(oci.body).toMatchObject({ image: 'localhost:5000/tools:latest', imageDigest: D2, build: { from: 'localhost:5000/tools:latest', packages: ['jq'] } });
    const builtin = await push({ name: 'tools2', build: { from: 'base', packages: ['jq'] } });
    expect(builtin.body).toMatchObject({ image: 'base', imageDigest: null });
  });

  it('checks references that already carry a digest', async () => {
    expect((await push({ name: 'pinned', image: `ghcr.io/acme/dev@${D1}` })).body.imageDigest).toBe(D1);
    resolver.tags.set(`ghcr.io/acme/dev:1@${D2}`, D1);
    const moved = await push({ name: 'pinned', image: `ghcr.io/acme/dev:1@${D2}` });
    expect(moved.status).toBe(400);
    expect(moved.body.errors[0].field).toBe('image');
  });

  it.each([
    ['an image the registry does not have', { image: 'ghcr.io/acme/missing:1' }, 'image', /manifest unknown/],
    ['an unreachable registry', { image: 'unreachable.example.com/x:1' }, 'image', /ECONNREFUSED/],
    ['a registry that never answers', { image: 'ghcr.io/acme/slow:1' }, 'image', /did not answer within 200 ms/],
    ['a build base the registry does not have', { build: { from: 'ghcr.io/acme/missing:1' } }, 'build.from', /manifest unknown/],
  ])('answers %s with a 400 naming the field, and stores nothing', async (_what, fields, field, detail) => {
    resolver.hang.add('ghcr.io/acme/slow:1');
    const r = await push({ name: 'broken', ...fields });
    expect(r.status).toBe(400);
    expect(r.type).toContain('application/problem+json');
    expect(r.body.code).toBe('invalid-input');
    expect(r.body.detail).toMatch(detail);
    expect(r.body.detail.startsWith(`${field}: cannot resolve`)).toBe(true);
    expect(r.body.errors[0].field).toBe(field);
    expect((await call('GET', '/v1/templates/broken')).status).toBe(404);
  });

  it('refuses invalid specs at the edge without calling the registry', async () => {
    const before = resolver.calls.length;
    for (const [body, field] of [
      [{ name: 'bad', image: 'tiny', build: { from: 'base' } }, 'build'],
      [{ name: 'bad', image: 'ubuntu:22.04' }, 'image'],
      [{ name: 'bad', image: 'tiny', idleTimeout: 'soon' }, 'idleTimeout'],
      [{ name: 'bad', image: 'tiny', warmPoolSize: -1 }, 'warmPoolSize'],
      [{ name: 'bad', image: 'tiny', hooks: { postStart: 1 } }, 'hooks.postStart'],
      [{ name: 'bad', image: 'tiny', defaultResources: { gpu: 2 }, maxResources: { gpu: 1 } }, 'defaultResources.gpu'],
    ] as const) {
      const r = await push(body as CreateTemplateInput);
      expect(r.status, JSON.stringify(body)).toBe(400);
      expect(r.body.errors[0].field).toBe(field);
    }
    expect(resolver.calls.length).toBe(before);
    expect((await call('GET', '/v1/templates/bad')).status).toBe(404);
  });

  it('keeps versions immutable: a moved tag makes a new version, the old one keeps its digest', async () => {
    resolver.tags.set('ghcr.io/acme/dev:1', D2);
    const v2 = await push({ name: 'web', image: 'ghcr.io/acme/dev:1', idleTimeout: '1h' });
    expect(v2.body).toMatchObject({ version: 2, imageDigest: D2, idleTimeout: '1h', repository: null, warmPoolSize: 0 });
    expect((await call('GET', '/v1/templates/web?version=1')).body).toMatchObject({ version: 1, imageDigest: D1, idleTimeout: '30m', warmPoolSize: 3 });
    expect((await call('GET', '/v1/templates/web/versions')).body.items.map((t: { imageDigest: string }) => t.imageDigest)).toEqual([D1, D2]);
  });

  it('publishes OCI references unpinned when no resolver is configured', async () => {
    const t = await new TemplateService(store, Date.now).create({ name: 'unpinned', image: 'ghcr.io/acme/dev:1', runtime: 'sandbox' });
    expect(t.imageDigest).toBeNull();
    const d = await new TemplateService(store, Date.now).create({ name: 'unpinned', image: `ghcr.io/acme/dev@${D1}`, runtime: 'sandbox' });
    expect(d.imageDigest).toBe(D1);
  });
});

describe('migration 0002', () => {
  it('keeps rows written before it readable', async () => {
    const file = join(dir, 'old.db');
    const db = new Kysely<Database>({ dialect: new SqliteDialect({ database: new SqliteDb(file) }) });
    await new Migrator({ db, provider: migrationProvider }).migrateTo('0001_initial');
    await (db as unknown as Kysely<Record<string, Record<string, unknown>>>)
      .insertInto('templates')
      .values({ name: 'base', version: 1, description: 'old', image: 'base', runtime: 'sandbox', default_resources: '{"cpuMillis":1000,"memoryBytes":1,"diskBytes":1}', max_resources: '{"cpuMillis":2000,"memoryBytes":2,"diskBytes":2}', env: '{"A":"1"}', created_at: 1 })
      .execute();
    await db.destroy();
    const upgraded = new Store(await openSqliteDatabase(file));
    const t = await upgraded.getTemplate('base');
    expect(t).toMatchObject({ image: 'base', imageDigest: null, spec: { name: 'base', image: 'base', runtime: 'sandbox', env: { A: '1' } } });
    const next = await new TemplateService(upgraded, Date.now).create({ name: 'base', image: 'tiny', runtime: 'sandbox', warmPoolSize: 1 });
    expect(next.version).toBe(2);
    expect((await upgraded.listTemplateVersions('base')).map((v) => v.spec.warmPoolSize ?? 0)).toEqual([0, 1]);
    await upgraded.close();
  });
});
