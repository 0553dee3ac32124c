/**
 * Runs the real `bin/devyard secrets …` and `devyard server rotate-kek` commands (the compiled CLI)
 * against an in-process control plane: values from stdin, from a file and from a terminal without
 * echo; listing never prints a value; rotating the KEK next to the running server.
 */
import { execFile, spawnSync } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import pty from 'node-pty';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { startControlPlane, type ControlPlane } from '@devyard/server/control-plane';
import { keyringFile } from '@devyard/server/secrets/secret-envelope';
import { DEFAULT_ORG_ID } from '@devyard/server/services/box-service';

const root = fileURLToPath(new URL('../../..', import.meta.url));
let dir: string;
let cp: ControlPlane;

function env(): NodeJS.ProcessEnv {
  const e: NodeJS.ProcessEnv = { ...process.env, DEVYARD_URL: cp.url, DEVYARD_TOKEN: cp.tokens.adminToken, DEVYARD_CONFIG: join(dir, 'no-config.json') };
  delete e.DEVYARD_KEK;
  return e;
}

function devyard(args: string[], stdin?: string): Promise<{ code: number; stdout: string; stderr: string }> {
  return new Promise((resolve) => {
    const child = execFile(process.execPath, [join(root, 'bin/devyard'), ...args], { cwd: dir, env: env() }, (err, stdout, stderr) =>
      resolve({ code: err ? ((err as { code?: number }).code ?? 1) : 0, stdout, stderr }),
    );
    child.stdin!.end(stdin ?? '');
  });
}

/** What a box of the admin would get, straight from the service (the only way a value comes back). */
async function delivered(): Promise<Record<string, string>> {
  const box = { id: 'b_cli', owner: 'admin', orgId: DEFAULT_ORG_ID, templateName: 'tiny' } as Parameters<ControlPlane['secrets']['forBoxes']>[0][number];
  return Object.fromEntries(((await cp.secrets.forBoxes([box])).get('b_cli') ?? []).map((s) => [s.name, s.value]));
}

beforeAll(async () => {
  // The test runs the compiled CLI, so compile what it is about to run. Type errors elsewhere in the
  // tree (work in progress) do not stop tsc -b from emitting; what this test runs must exist.
  spawnSync(process.execPath, [join(root, 'node_modules/typescript/bin/tsc'), '-b', 'packages/cli'], { cwd: root, stdio: 'inherit' });
  expect(existsSync(join(root, 'packages/cli/dist/commands/secret-commands.js'))).toBe(true);
  dir = mkdtempSync(join(tmpdir(), 'devyard-cli-secrets-'));
  cp = await startControlPlane({ dataDir: join(dir, 'data') });
}, 180_000);

afterAll(async () => {
  await cp?.close();
  if (dir) rmSync(dir, { recursive: true, force: true });
});

describe('devyard secrets', () => {
  it('sets from stdin (one final newline dropped) and from a file, lists without values, deletes', async () => {
    const set = await devyard(['secrets', 'set', 'CLI_TOKEN'], 'from-stdin-value\n');
    expect(set).toMatchObject({ code: 0, stderr: '' });
    expect(set.stdout).toContain('secret CLI_TOKEN created (user, version 1)');
    expect((await delivered()).CLI_TOKEN).toBe('from-stdin-value');

    const file = join(dir, 'value.txt');
    writeFileSync(file, 'from-file-value\n', { mode: 0o600 });
    expect((await devyard(['secrets', 'set', 'CLI_TOKEN', '--from-file', file])).stdout).toContain('updated (user, version 2)');
    expect((await devyard(['secrets', 'set', 'ORG_WIDE', '--org'], 'org-value')).stdout).toContain('created (org, version 1)');
    expect(await delivered()).toEqual({ CLI_TOKEN: 'from-file-value', ORG_WIDE: 'org-value' });

    const list = await devyard(['secrets', 'list']);
    expect(list.stdout).toMatch(/CLI_TOKEN\s+user\s+2/);
    expect(list.stdout).toMatch(/ORG_WIDE\s+org\s+1/);
    const json = await devyard(['secrets', 'list', '--json']);
    expect((JSON.parse(json.stdout) as Array<{ name: string }>).map((s) => s.name)).toEqual(['ORG_WIDE', 'CLI_TOKEN']);
    for (const out of [list.stdout, json.stdout]) expect(out).not.toMatch(/from-file-value|org-value/);

    expect((await devyard(['secrets', 'delete', 'ORG_WIDE', '--org'])).stdout).toContain('secret ORG_WIDE deleted (org)');
    const again = await devyard(['secrets', 'delete', 'ORG_WIDE', '--org']);
    expect(again.code).toBe(4);
    expect(again.stderr).toContain('not found');
  });

  it('refuses bad input before sending anything', async () => {
    const cases: Array<[string[], string | undefined, RegExp]> = [
      [['secrets', 'set', 'lower'], 'v', /environment variable name/],
      [['secrets', 'set', 'TWO_SCOPES', '--org', '--team', 'x'], 'v', /choose one scope/],
      [['secrets', 'set', 'BIG'], 'x'.repeat(64 * 1024 + 1), /larger than 64 KiB/],
      [['secrets', 'set', 'NUL'], 'a\0b', /NUL byte/],
      [['secrets', 'set', 'MISSING', '--from-file', join(dir, 'nope')], undefined, /cannot read/],
      [['secrets', 'set', 'NO_TEMPLATE', '--template', 'no-such'], 'v', /template "no-such" not found/],
    ];
    for (const [args, stdin, err] of cases) {
      const r = await devyard(args, stdin);
      expect(r.code, args.join(' ')).not.toBe(0);
      expect(r.stderr).toMatch(err);
    }
    const bin = join(dir, 'binary');
    writeFileSync(bin, Buffer.from([0xff, 0xfe, 0x00, 0x01]));
    expect((await devyard(['secrets', 'set', 'BINARY', '--from-file', bin])).stderr).toMatch(/not UTF-8/);
    expect(Object.keys(await delivered())).toEqual(['CLI_TOKEN']);
  });

  it('reads a value typed at a terminal without echoing it', async () => {
    const p = pty.spawn(process.execPath, [join(root, 'bin/devyard'), 'secrets', 'set', 'TYPED'], { cols: 80, rows: 24, cwd: dir, env: env() as Record<string, string> });
    let screen = '';
    p.onData((d) => (screen += d));
    const exited = new Promise<number>((r) => p.onExit(({ exitCode }) => r(exitCode)));
    const deadline = Date.now() + 20_000;
    while (!screen.includes('input hidden') && Date.now() < deadline) await new Promise((r) => setTimeout(r, 20));
    p.write('typed-secret-value\r');
    expect(await exited).toBe(0);
    expect(screen).toContain('secret TYPED created');
    expect(screen).not.toContain('typed-secret-value');
    expect((await delivered()).TYPED).toBe('typed-secret-value');
  });
});

describe('devyard server rotate-kek', () => {
  it('adds a key, re-wraps every data key next to the running server, then drops the old key', async () => {
    const dataDir = join(dir, 'data');
    const before = readFileSync(keyringFile(dataDir), 'utf8');
    const oldId = /^(kek-[^:]+):/m.exec(before)![1]!;
    const r = await devyard(['server', 'rotate-kek', '--data-dir', dataDir, '--generate']);
    expect(r.code, r.stderr).toBe(0);
    expect(r.stdout).toMatch(/added key kek-\S+ as the current one/);
    expect(r.stdout).toMatch(/re-wrapped 2 data keys under kek-/);
    expect(r.stdout).toContain(`can be removed: ${oldId}`);
    // The running server re-reads the changed keyring: still decrypts, and wraps new secrets with the new key.
    expect(await delivered()).toEqual({ CLI_TOKEN: 'from-file-value', TYPED: 'typed-secret-value' });
    const dropped = await devyard(['server', 'rotate-kek', '-d', dataDir, '--drop-unused']);
    expect(dropped.stdout).toContain(`removed unused keys: ${oldId}`);
    expect(readFileSync(keyringFile(dataDir), 'utf8')).not.toContain(oldId);
    expect(await delivered()).toEqual({ CLI_TOKEN: 'from-file-value', TYPED: 'typed-secret-value' });
    expect((await devyard(['secrets', 'set', 'AFTER'], 'after-rotation')).code).toBe(0);
    expect((await delivered()).AFTER).toBe('after-rotation');
  });
});
