import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { loadTemplateFile } from '@devyard/cli/template-files';

const dir = mkdtempSync(join(tmpdir(), 'devyard-template-files-'));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

describe('loadTemplateFile', () => {
  it('finds .devcontainer.json in a folder and names the template after the folder', () => {
    const project = join(dir, 'My_Service');
    mkdirSync(project);
    writeFileSync(join(project, '.devcontainer.json'), '{ "image": "ghcr.io/acme/svc:1", /* c */ }');
    const r = loadTemplateFile(project);
    expect(r).toMatchObject({ format: 'devcontainer', file: join(project, '.devcontainer.json'), request: { name: 'my-service', image: 'ghcr.io/acme/svc:1' }, warnings: [] });
  });

  it('reads JSON templates and applies --name', () => {
    writeFileSync(join(dir, 't.json'), JSON.stringify({ name: 'a', image: 'tiny', warmPoolSize: 1 }));
    expect(loadTemplateFile(join(dir, 't.json'), { name: 'b' }).request).toEqual({ name: 'b', image: 'tiny', runtime: 'sandbox', warmPoolSize: 1 });
  });

  it('names the file and the field in every error', () => {
    writeFileSync(join(dir, 'x.yaml'), 'name: x\nimage: tiny\nidleTimeout: [1\n');
    expect(() => loadTemplateFile(join(dir, 'x.yaml'))).toThrow(/x\.yaml: not valid YAML/);
    writeFileSync(join(dir, 'y.yml'), 'name: y\nimage: tiny\nextra: 1\n');
    expect(() => loadTemplateFile(join(dir, 'y.yml'))).toThrow(/y\.yml: \(top level\): Unrecognized key: "extra"$/);
    writeFileSync(join(dir, 'z.txt'), '{}');
    expect(() => loadTemplateFile(join(dir, 'z.txt'))).toThrow(/expected a \.yaml, \.yml or \.json template/);
    expect(() => loadTemplateFile(join(dir, 'missing.yaml'))).toThrow(/cannot read .*missing\.yaml: ENOENT/);
    expect(() => loadTemplateFile(dir)).toThrow(/no \.devcontainer\/devcontainer\.json or \.devcontainer\.json/);
  });
});
