/** Registry credentials from secret files, against a real docker-registry with Basic auth. */
import { chmod, mkdir, mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { parseOciReference } from '@devyard/oci/oci-reference';
import { RegistryClient } from '@devyard/oci/registry-client';
import { registryCredentialFiles } from '@devyard/oci/registry-credential-files';
import { OciLayoutBuilder, tarLayer } from './oci-layout-builder.js';
import { TestRegistry } from './registry-test-host.js';

describe('registry credential files', () => {
  let registry: TestRegistry;
  let dir: string;

  beforeAll(async () => {
    dir = await mkdtemp(join(tmpdir(), 'devyard-regcreds-'));
    registry = await TestRegistry.start({ auth: { username: 'alice', password: 's3cret' } });
    const layout = new OciLayoutBuilder(join(dir, 'layout'));
    await layout.tag('1', await layout.image([await tarLayer([{ path: 'hello', content: 'hi' }])]));
    await registry.push(layout.dir, '1', 'team/app:1');
  });

  afterAll(async () => {
    await registry?.stop();
    await rm(dir, { recursive: true, force: true });
  });

  const client = (secrets: string) => new RegistryClient({ insecure: () => true, credentials: registryCredentialFiles(secrets) });
  const ref = () => parseOciReference(`${registry.host}/team/app:1`);

  it('uses the file named after the registry host', async () => {
    const secrets = join(dir, 'ok');
    await mkdir(join(secrets, 'registry'), { recursive: true });
    await writeFile(join(secrets, 'registry', `${registry.host}.json`), JSON.stringify({ username: 'alice', password: 's3cret' }), { mode: 0o600 });
    expect((await client(secrets).resolve(ref())).digest).toMatch(/^sha256:/);
  });

  it('goes anonymous without a file, and the registry refuses', async () => {
    await expect(client(join(dir, 'none')).resolve(ref())).rejects.toMatchObject({ code: 'forbidden' });
  });

  it('refuses a file others can read, and a malformed one', async () => {
    const open = join(dir, 'open');
    await mkdir(join(open, 'registry'), { recursive: true });
    const file = join(open, 'registry', `${registry.host}.json`);
    await writeFile(file, JSON.stringify({ username: 'alice', password: 's3cret' }));
    await chmod(file, 0o644);
    await expect(client(open).resolve(ref())).rejects.toThrow(/chmod 600/);
    await writeFile(file, '{"user": "alice"}', { mode: 0o600 });
    await chmod(file, 0o600);
    await expect(client(open).resolve(ref())).rejects.toThrow(/must hold/);
  });
});
