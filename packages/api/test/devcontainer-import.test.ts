import { describe, expect, it } from 'vitest';
import { DevcontainerImportError, importDevcontainer, slugifyTemplateName } from '@devyard/api/devcontainer-import';
import { CreateTemplateRequestSchema } from '@devyard/api/template-schemas';

const FILE = 'proj/.devcontainer/devcontainer.json';

function convert(text: string, files: Record<string, string> = {}, extra: { name?: string; fallbackName?: string } = {}) {
  return importDevcontainer(text, { file: FILE, readRelative: (p) => files[p], ...extra });
}

function errorOf(fn: () => unknown): string {
  try {
    fn();
  } catch (e) {
    expect(e).toBeInstanceOf(DevcontainerImportError);
    return (e as Error).message;
  }
  throw new Error('expected an import error');
}

// Shaped like the Microsoft "typescript-node" definition, with the usual edits people make.
const NODE_DEVCONTAINER = `// For format details, see https://aka.ms/devcontainer.json.
{
  "name": "Node.js & TypeScript",
  // Or use a Dockerfile or Docker Compose file.
  "image": "mcr.microsoft.com/devcontainers/typescript-node:1-20-bullseye",
  /* Features to add to the dev container. */
  "features": {
    "ghcr.io/devcontainers/features/docker-in-docker:2": {}
  },
  "forwardPorts": [3000, 5432, "db:6379"],
  "portsAttributes": { "3000": { "label": "app", "onAutoForward": "notify" } },
  "containerEnv": { "NODE_ENV": "development", "HOME_DIR": "\${containerEnv:HOME}" },
  "remoteEnv": { "NODE_ENV": "test", "EDITOR": "vim" },
  "onCreateCommand": "npm ci",
  "updateContentCommand": ["npm", "run", "build"],
  "postCreateCommand": { "deps": "npm install", "hooks": ["npx", "husky", "install"] },
  "postStartCommand": "npm run dev",
  "postAttachCommand": "echo attached",
  "customizations": { "vscode": { "extensions": ["dbaeumer.vscode-eslint"] } },
  "mounts": ["source=node_modules,target=/workspace/node_modules,type=volume"],
  "runArgs": ["--cap-add=SYS_PTRACE"],
  "remoteUser": "node",
  "hostRequirements": { "cpus": 4, "memory": "8gb", "storage": "32gb" },
}
`;

describe('devcontainer.json import', () => {
  it('converts a realistic JSONC file and warns about everything it drops', () => {
    const { request, warnings } = convert(NODE_DEVCONTAINER);
    expect(request).toEqual({
      name: 'node-js-typescript',
      description: 'Node.js & TypeScript (imported from devcontainer.json)',
      image: 'mcr.microsoft.com/devcontainers/typescript-node:1-20-bullseye',
      runtime: 'sandbox',
      env: { NODE_ENV: 'test', EDITOR: 'vim' },
      user: 'node',
      ports: [{ port: 3000, label: 'app' }, 5432],
      hooks: {
        onCreate: 'npm ci',
        updateContent: ['npm', 'run', 'build'],
        postCreate: { deps: 'npm install', hooks: ['npx', 'husky', 'install'] },
        postStart: 'npm run dev',
      },
      defaultResources: { cpu: 4, memory: '8gb', disk: '32gb' },
    });
    expect(CreateTemplateRequestSchema.safeParse(request).success).toBe(true);
    const text = warnings.join('\n');
    for (const field of ['features', 'postAttachCommand', 'customizations', 'mounts', 'runArgs']) expect(text).toContain(`"${field}" is not supported`);
    expect(text).toContain('Dev Container Features are not supported');
    expect(text).toContain('"db:6379"');
    expect(text).toContain('portsAttributes.3000: onAutoForward');
    expect(text).toContain('containerEnv.HOME_DIR uses a variable');
  });

  it('turns a Dockerfile of FROM and RUN lines into a build recipe', () => {
    const dockerfile = [
      '# syntax=docker/dockerfile:1',
      'ARG VARIANT=3.12-bookworm',
      'FROM mcr.microsoft.com/devcontainers/python:1-${VARIANT}',
      '',
      'RUN apt-get update \\',
      '    && export DEBIAN_FRONTEND=noninteractive \\',
      '    # tools for native wheels',
      '    && apt-get -y install --no-install-recommends build-essential libpq-dev \\',
      '    && apt-get clean && rm -rf /var/lib/apt/lists/*',
      'RUN pip install --no-cache-dir poetry==1.8.3',
      'RUN ["/bin/sh", "-c", "echo it\'s done"]',
      'COPY requirements.txt /tmp/',
      'ENV PYTHONUNBUFFERED=1',
    ].join('\n');
    const { request, warnings } = convert(
      JSON.stringify({ name: 'Python 3', build: { dockerfile: 'Dockerfile', context: '..', args: { VARIANT: '3.11-bookworm' } }, postCreateCommand: 'poetry install' }),
      { Dockerfile: dockerfile },
    );
    expect(request.image).toBeUndefined();
    expect(request.build).toEqual({
      from: 'mcr.microsoft.com/devcontainers/python:1-3.11-bookworm',
      packages: ['build-essential', 'libpq-dev'],
      run: ['pip install --no-cache-dir poetry==1.8.3', `/bin/sh -c 'echo it'\\''s done'`],
    });
    expect(request.hooks).toEqual({ postCreate: 'poetry install' });
    expect(warnings).toEqual([expect.stringMatching(/Dockerfile line 12: COPY is not supported/), expect.stringMatching(/Dockerfile line 13: ENV is not supported/)]);
  });

  it('keeps a RUN that mixes apt-get with other commands whole', () => {
    const { request } = convert(JSON.stringify({ name: 'x', dockerFile: 'Dockerfile' }), {
      Dockerfile: 'FROM debian:bookworm\nRUN apt-get update && apt-get install -y curl && curl -fsSL https://deb.nodesource.com/setup_20.x | bash -\n',
    });
    expect(request.build).toEqual({ from: 'docker.io/library/debian:bookworm', run: ['apt-get update && apt-get install -y curl && curl -fsSL https://deb.nodesource.com/setup_20.x | bash -'] });
  });

  it('spells out Docker Hub images, with a warning', () => {
    const { request, warnings } = convert('{ "name": "n", "image": "node:20" }');
    expect(request.image).toBe('docker.io/library/node:20');
    expect(warnings).toEqual([expect.stringContaining('no registry host')]);
    expect(convert('{ "name": "n", "image": "bitnami/redis" }').request.image).toBe('docker.io/bitnami/redis');
  });

  it('names the template from --name, the devcontainer name, or the project folder', () => {
    expect(convert('{ "name": "My App (Node 20)", "image": "tiny" }').request.name).toBe('my-app-node-20');
    expect(convert('{ "name": "My App", "image": "tiny" }', {}, { name: 'chosen' }).request.name).toBe('chosen');
    expect(convert('{ "image": "tiny" }', {}, { fallbackName: 'Acme_Web' }).request.name).toBe('acme-web');
    expect(errorOf(() => convert('{ "image": "tiny" }'))).toMatch(/no usable "name"; pass --name/);
    expect(slugifyTemplateName('2024 Über—Project!')).toBe('uber-project');
  });

  it.each<[string, string, Record<string, string>, RegExp]>([
    ['broken JSONC', '{ "name": "x", "image": }', {}, /^proj\/\.devcontainer\/devcontainer\.json: not valid JSON with comments at line 1, column 25: ValueExpected$/],
    ['a non-object', '[1, 2]', {}, /must contain a JSON object/],
    ['a wrongly typed field', '{ "name": "x", "image": "tiny", "forwardPorts": [true] }', {}, /: forwardPorts\.0: /],
    ['a wrongly typed command', '{ "name": "x", "image": "tiny", "postCreateCommand": 7 }', {}, /: postCreateCommand: /],
    ['neither image nor Dockerfile', '{ "name": "x", "dockerComposeFile": "compose.yml" }', {}, /neither an image nor a build\.dockerfile/],
    ['both image and Dockerfile', '{ "name": "x", "image": "tiny", "build": { "dockerfile": "Dockerfile" } }', { Dockerfile: 'FROM debian' }, /both image and build\.dockerfile/],
    ['a missing Dockerfile', '{ "name": "x", "build": { "dockerfile": "Dockerfile" } }', {}, /build\.dockerfile: cannot read "Dockerfile"/],
    ['a Dockerfile with no FROM', '{ "name": "x", "build": { "dockerfile": "Dockerfile" } }', { Dockerfile: 'RUN echo hi\n' }, /no FROM line, so nothing usable remains/],
    ['a FROM with an unset build argument', '{ "name": "x", "build": { "dockerfile": "Dockerfile" } }', { Dockerfile: 'ARG V\nFROM debian:${V}\n' }, /uses a build argument with no value/],
    ['an invalid image', '{ "name": "x", "image": "ghcr.io/Bad/Name" }', {}, /: image: must be a built-in image/],
    ['an invalid user', '{ "name": "x", "image": "tiny", "remoteUser": "Not A User" }', {}, /: remoteUser: must be a Linux user name/],
  ])('refuses %s with one line naming the file', (_what, text, files, message) => {
    const msg = errorOf(() => convert(text, files));
    expect(msg).toMatch(message);
    expect(msg.startsWith(`${FILE}: `)).toBe(true);
    expect(msg).not.toContain('\n');
  });
});
