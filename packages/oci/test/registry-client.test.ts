import { createServer as createHttpServer, type Server } from 'node:http';
import { createServer as createTcpServer, type Socket } from 'node:net';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createHash } from 'node:crypto';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { DomainError } from '@devyard/core/domain-error';
import { parseOciReference } from '@devyard/oci/oci-reference';
import { parseWwwAuthenticate, RegistryClient } from '@devyard/oci/registry-client';
import { OciLayoutBuilder, tarLayer } from './oci-layout-builder.js';
import { freePort, TestRegistry } from './registry-test-host.js';

const loopback = () => true;

async function expectDomainError(p: Promise<unknown>, code: string, message: RegExp): Promise<DomainError> {
  const err = await p.then(
    () => undefined,
    (e: unknown) => e,
  );
  expect(err).toBeInstanceOf(DomainError);
  expect((err as DomainError).code).toBe(code);
  expect((err as DomainError).message).toMatch(message);
  return err as DomainError;
}

describe('WWW-Authenticate parsing', () => {
  it('reads Bearer parameters, including quoted commas', () => {
    expect(parseWwwAuthenticate('Bearer realm="https://auth.example/token",service="registry.example",scope="repository:a/b:pull,push"')).toEqual([
      { scheme: 'bearer', params: { realm: 'https://auth.example/token', service: 'registry.example', scope: 'repository:a/b:pull,push' } },
    ]);
    expect(parseWwwAuthenticate('Basic realm="x"')).toEqual([{ scheme: 'basic', params: { realm: 'x' } }]);
  });
});

describe('RegistryClient against docker-registry', () => {
  let registry: TestRegistry;
  let secured: TestRegistry;
  let work: string;
  let amd64Digest: string;
  let layerDigest: string;
  let layerBytes: Buffer;

  beforeAll(async () => {
    work = await mkdtemp(join(tmpdir(), 'devyard-oci-test-'));
    [registry, secured] = await Promise.all([TestRegistry.start(), TestRegistry.start({ auth: { username: 'alice', password: 's3cret' } })]);
    const layout = new OciLayoutBuilder(join(work, 'layout'));
    const amd = await layout.image([await tarLayer([{ path: 'hello.txt', content: 'amd64\n' }])]);
    const arm = await layout.image([await tarLayer([{ path: 'hello.txt', content: 'arm64\n' }])], { architecture: 'arm64' });
    amd64Digest = amd.digest;
    await layout.tag('single', amd);
    await layout.tag('multi', await layout.multiPlatform([arm, amd]));
    layerBytes = await tarLayer([{ path: 'hello.txt', content: 'amd64\n' }]);
    layerDigest = `sha256:${createHash('sha256').update((await import('node:zlib')).gzipSync(layerBytes)).digest('hex')}`;
    await registry.push(layout.dir, 'single', 'team/app:1');
    await registry.push(layout.dir, 'multi', 'team/multi:1', { all: true });
    await secured.push(layout.dir, 'single', 'private/app:1');
  });

  afterAll(async () => {
    await Promise.all([registry?.stop(), secured?.stop()]);
    if (work) await rm(work, { recursive: true, force: true });
  });

  it('resolves a tag anonymously to a verified manifest and config', async () => {
    const client = new RegistryClient({ insecure: loopback });
    const image = await client.resolve(parseOciReference(`${registry.host}/team/app:1`));
    expect(image.digest).toBe(amd64Digest);
    expect(image.indexDigest).toBeUndefined();
    expect(image.manifest.layers).toHaveLength(1);
    expect(image.manifest.layers[0]!.digest).toBe(layerDigest);
    expect(image.config.architecture).toBe('amd64');
    expect(image.config.config?.Cmd).toEqual(['/bin/sh']);
  });

  it('follows an index to the linux/amd64 manifest', async () => {
    const client = new RegistryClient({ insecure: loopback });
    const image = await client.resolve(parseOciReference(`${registry.host}/team/multi:1`));
    expect(image.digest).toBe(amd64Digest);
    expect(image.indexDigest).toMatch(/^sha256:/);
    expect(image.indexDigest).not.toBe(amd64Digest);
    const arm = await new RegistryClient({ insecure: loopback, platform: { os: 'linux', architecture: 'arm64' } }).resolve(parseOciReference(`${registry.host}/team/multi:1`));
    expect(arm.digest).not.toBe(amd64Digest);
    await expectDomainError(
      new RegistryClient({ insecure: loopback, platform: { os: 'linux', architecture: 's390x' } }).resolve(parseOciReference(`${registry.host}/team/multi:1`)),
      'invalid-input',
      /no linux\/s390x variant \(has: linux\/arm64, linux\/amd64\)/,
    );
  });

  it('resolves a reference pinned by digest and streams a blob', async () => {
    const client = new RegistryClient({ insecure: loopback });
    const ref = parseOciReference(`${registry.host}/team/app@${amd64Digest}`);
    expect((await client.resolve(ref)).digest).toBe(amd64Digest);
    const blob = await client.fetchBlob(ref, layerDigest);
    const chunks: Buffer[] = [];
    for await (const c of blob.stream) chunks.push(c as Buffer);
    const bytes = Buffer.concat(chunks);
    expect(blob.size).toBe(bytes.length);
    expect(`sha256:${createHash('sha256').update(bytes).digest('hex')}`).toBe(layerDigest);
  });

  it('gives invalid-input "not found" for a missing tag or repository', async () => {
    const client = new RegistryClient({ insecure: loopback });
    await expectDomainError(client.resolve(parseOciReference(`${registry.host}/team/app:nope`)), 'invalid-input', /image .*team\/app:nope not found .*MANIFEST_UNKNOWN/);
    await expectDomainError(client.resolve(parseOciReference(`${registry.host}/no/such:1`)), 'invalid-input', /image .*no\/such:1 not found in /);
    await expectDomainError(client.fetchBlob(parseOciReference(`${registry.host}/team/app:1`), `sha256:${'0'.repeat(64)}`), 'invalid-input', /blob .* not found/);
  });

  it('uses Basic credentials from the callback, and refuses without them', async () => {
    const ref = parseOciReference(`${secured.host}/private/app:1`);
    const asked: string[] = [];
    const client = new RegistryClient({
      insecure: loopback,
      credentials: (host) => {
        asked.push(host);
        return { username: 'alice', password: 's3cret' };
      },
    });
    expect((await client.resolve(ref)).digest).toBe(amd64Digest);
    expect(asked[0]).toBe(secured.host);
    await expectDomainError(new RegistryClient({ insecure: loopback }).resolve(ref), 'forbidden', /requires credentials/);
    await expectDomainError(
      new RegistryClient({ insecure: loopback, credentials: () => ({ username: 'alice', password: 'wrong' }) }).resolve(ref),
      'forbidden',
      /rejected the credentials/,
    );
  });

  it('reports a refused connection as unavailable', async () => {
    const port = await freePort();
    const client = new RegistryClient({ insecure: loopback });
    await expectDomainError(client.resolve(parseOciReference(`127.0.0.1:${port}/app:1`)), 'unavailable', new RegExp(`cannot reach registry 127\\.0\\.0\\.1:${port} .*ECONNREFUSED`));
  });
});

describe('RegistryClient against local fakes', () => {
  const sockets: Socket[] = [];
  const servers: Array<{ close(cb: () => void): unknown }> = [];
  afterAll(async () => {
    for (const s of sockets) s.destroy();
    await Promise.all(servers.map((s) => new Promise<void>((r) => s.close(() => r()))));
  });

  it('times out with a clear error against a listener that never answers', async () => {
    const silent = createTcpServer((socket) => sockets.push(socket));
    servers.push(silent);
    await new Promise<void>((r) => silent.listen(0, '127.0.0.1', r));
    const host = `127.0.0.1:${(silent.address() as { port: number }).port}`;
    const client = new RegistryClient({ insecure: loopback, timeoutMs: 300 });
    const t0 = Date.now();
    await expectDomainError(client.resolve(parseOciReference(`${host}/app:1`)), 'unavailable', new RegExp(`registry ${host} did not answer within 300 ms`));
    expect(Date.now() - t0).toBeLessThan(5000);
  });

  it('fetches a Bearer token from the challenge realm with the scope, then retries', async () => {
    const manifest = JSON.stringify({ schemaVersion: 2, mediaType: 'application/vnd.oci.image.manifest.v1+json', config: { mediaType: 'application/vnd.oci.image.config.v1+json', digest: '', size: 0 }, layers: [] });
    const config = JSON.stringify({ architecture: 'amd64', os: 'linux', rootfs: { type: 'layers', diff_ids: [] } });
    const configDigest = `sha256:${createHash('sha256').update(config).digest('hex')}`;
    const body = manifest.replace('"digest":""', `"digest":"${configDigest}"`);
    const tokenRequests: string[] = [];
    let authorized = 0;
    const server: Server = createHttpServer((req, res) => {
      const url = new URL(req.url!, 'http://x');
      if (url.pathname === '/token') {
        tokenRequests.push(`${url.searchParams.get('service')} ${url.searchParams.get('scope')} ${req.headers.authorization ?? 'anon'}`);
        res.setHeader('content-type', 'application/json');
        res.end(JSON.stringify({ token: 'tok123', expires_in: 300 }));
        return;
      }
      if (req.headers.authorization !== 'Bearer tok123') {
        res.statusCode = 401;
        res.setHeader('www-authenticate', `Bearer realm="http://${req.headers.host}/token",service="fake",scope="repository:team/app:pull"`);
        res.end();
        return;
      }
      authorized++;
      if (url.pathname === '/v2/team/app/manifests/1') {
        res.setHeader('content-type', 'application/vnd.oci.image.manifest.v1+json');
        res.end(body);
      } else if (url.pathname === `/v2/team/app/blobs/${configDigest}`) {
        res.end(config);
      } else {
        res.statusCode = 404;
        res.end();
      }
    });
    servers.push(server);
    await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
    const host = `127.0.0.1:${(server.address() as { port: number }).port}`;
    const client = new RegistryClient({ insecure: loopback, credentials: () => ({ username: 'bob', password: 'pw' }) });
    const image = await client.resolve(parseOciReference(`${host}/team/app:1`));
    expect(image.config.os).toBe('linux');
    expect(authorized).toBe(2);
    // One token for manifest and config: the second request reuses it without a new challenge.
    expect(tokenRequests).toEqual([`fake repository:team/app:pull Basic ${Buffer.from('bob:pw').toString('base64')}`]);
  });
});
