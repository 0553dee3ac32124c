/**
 * `devyard secrets set|list|delete` and `devyard server rotate-kek`. A value is read from a file or
 * from stdin, never from the command line (it would land in the shell history and in `ps`), and
 * from a terminal only without echo. Nothing here ever prints a value: the API never returns one.
 */
import { readFileSync } from 'node:fs';
import { resolve } from 'node:path';
import type { Command } from 'commander';
import { SECRET_VALUE_MAX_BYTES, SecretNameSchema } from '@devyard/api/secret-schemas';
import { rotateKek } from '@devyard/server/secrets/kek-rotation';
import { CliUsageError, clientFromEnv } from '../cli-config.js';
import { age, printJson, table } from '../output-format.js';

interface ScopeFlags {
  org?: boolean;
  team?: string;
  template?: string;
}

/** The API scope segment the flags select: the caller's own (`user`) unless one says otherwise. */
export function scopeFromFlags(o: ScopeFlags): string {
  const chosen = [o.org ? 'org' : null, o.team !== undefined ? `team:${o.team}` : null, o.template !== undefined ? `template:${o.template}` : null].filter((x): x is string => x !== null);
  if (chosen.length > 1) throw new CliUsageError('choose one scope: --org, --team TEAM or --template TEMPLATE (default: your own)');
  return chosen[0] ?? 'user';
}

function checkName(name: string): void {
  const r = SecretNameSchema.safeParse(name);
  if (!r.success) throw new CliUsageError(`secret name "${name}" ${r.error.issues[0]?.message ?? 'is invalid'}`);
}

/**
 * A value as text: valid UTF-8, no NUL byte, at most 64 KiB, one final newline dropped (what
 * `echo`, editors and `cat <<EOF` add is not part of a token).
 */
export function valueFromBytes(bytes: Buffer, source: string): string {
  let text: string;
  try {
    text = new TextDecoder('utf-8', { fatal: true }).decode(bytes);
  } catch {
    throw new CliUsageError(`${source} is not UTF-8 text; secrets are text (base64-encode binary data first)`);
  }
  text = text.replace(/\r?\n$/, '');
  if (text.includes('\0')) throw new CliUsageError(`${source} contains a NUL byte, which an environment variable cannot hold`);
  if (Buffer.byteLength(text) > SECRET_VALUE_MAX_BYTES) throw new CliUsageError(`${source} is larger than ${SECRET_VALUE_MAX_BYTES / 1024} KiB`);
  return text;
}

async function readAll(stream: NodeJS.ReadableStream): Promise<Buffer> {
  const chunks: Buffer[] = [];
  for await (const c of stream) chunks.push(typeof c === 'string' ? Buffer.from(c) : (c as Buffer));
  return Buffer.concat(chunks);
}

/** Reads one line from the terminal with echo off (raw mode), like a password prompt. */
function readHidden(prompt: string): Promise<string> {
  const stdin = process.stdin;
  if (typeof stdin.setRawMode !== 'function') throw new CliUsageError('cannot turn terminal echo off here: pass the value with --from-file FILE or on stdin');
  process.stderr.write(prompt);
  return new Promise((resolvePromise, reject) => {
    let value = '';
    const finish = (err?: Error) => {
      stdin.setRawMode(false);
      stdin.pause();
      stdin.off('data', onData);
      process.stderr.write('\n');
      if (err) reject(err);
      else resolvePromise(value);
    };
    const onData = (chunk: Buffer) => {
      for (const ch of chunk.toString('utf8')) {
        if (ch === '\r' || ch === '\n') return finish();
        if (ch === '\u0003') return finish(new CliUsageError('cancelled'));
        if (ch === '\u0004') return value === '' ? finish(new CliUsageError('cancelled')) : finish();
        if (ch === '\u007f' || ch === '\b') value = Array.from(value).slice(0, -1).join('');
        else if (ch >= ' ') value += ch;
      }
    };
    stdin.setRawMode(true);
    stdin.resume();
    stdin.on('data', onData);
  });
}

async function readValue(name: string, fromFile: string | undefined): Promise<string> {
  if (fromFile !== undefined) {
    let bytes: Buffer;
    try {
      bytes = fromFile === '-' ? await readAll(process.stdin) : readFileSync(resolve(fromFile));
    } catch (e) {
      throw new CliUsageError(`cannot read ${fromFile} (${(e as { code?: string }).code ?? (e as Error).message})`);
    }
    return valueFromBytes(bytes, fromFile === '-' ? 'stdin' : fromFile);
  }
  if (process.stdin.isTTY) return valueFromBytes(Buffer.from(await readHidden(`Value for ${name} (input hidden): `)), 'the value');
  return valueFromBytes(await readAll(process.stdin), 'stdin');
}

function addScopeOptions(cmd: Command): Command {
  return cmd
    .option('--org', "the organization's secret (every box of the org gets it)")
    .option('--team <team>', "a team's secret (boxes of the team's members get it)")
    .option('--template <template>', "a template's secret (every box of the template gets it)");
}

export function registerSecretCommands(program: Command): void {
  const secrets = program.command('secrets').description('secrets delivered to boxes at /run/devyard/secrets/NAME and as environment variables of sessions');

  addScopeOptions(
    secrets
      .command('set')
      .description('set a secret: the value comes from --from-file, stdin, or a hidden prompt; default scope: your own')
      .argument('<name>', 'environment-variable style name, e.g. NPM_TOKEN')
      .option('--from-file <file>', 'read the value from a file ("-": stdin)'),
  ).action(async (name: string, o: ScopeFlags & { fromFile?: string }) => {
    checkName(name);
    const scope = scopeFromFlags(o);
    const value = await readValue(name, o.fromFile);
    const { secret, created } = await clientFromEnv().putSecret(scope, name, value);
    process.stdout.write(`secret ${secret.name} ${created ? 'created' : 'updated'} (${secret.scope}, version ${secret.version}); running boxes get it within seconds\n`);
  });

  secrets
    .command('list')
    .description('the secrets you may see: names, scopes and versions (values are never shown)')
    .option('--json', 'print JSON')
    .action(async (o: { json?: boolean }) => {
      const list = await clientFromEnv().listSecrets();
      if (o.json) return printJson(list);
      if (list.length === 0) {
        process.stdout.write('no secrets (devyard secrets set NAME)\n');
        return;
      }
      process.stdout.write(`${table(['NAME', 'SCOPE', 'VERSION', 'UPDATED', 'CREATED BY'], list.map((s) => [s.name, s.scope, s.version, `${age(s.updatedAt)} ago`, s.createdBy]))}\n`);
    });

  addScopeOptions(
    secrets
      .command('delete')
      .description('delete a secret; running boxes lose it within seconds')
      .argument('<name>'),
  ).action(async (name: string, o: ScopeFlags) => {
    checkName(name);
    const scope = scopeFromFlags(o);
    await clientFromEnv().deleteSecret(scope, name);
    process.stdout.write(`secret ${name} deleted (${scope})\n`);
  });

  // Under `devyard server` (registered before this), next to what it maintains.
  const server = program.commands.find((c) => c.name() === 'server') ?? program;
  // `server -d DIR` and `server rotate-kek -d DIR` both have -d: each command parses its own.
  server.enablePositionalOptions();
  server
    .command('rotate-kek')
    .description('re-wrap every secret data key under the current key-encryption key (the first of the keyring)')
    .option('-d, --data-dir <dir>', 'the server data dir (database and secrets/kek.keyring)', './.devyard/server')
    .option('--generate', 'first add a new random key to secrets/kek.keyring as the current one')
    .option('--drop-unused', 'afterwards remove from the keyring file the old keys no secret uses any more')
    .action(async (o: { dataDir: string; generate?: boolean; dropUnused?: boolean }) => {
      const r = await rotateKek({ dataDir: resolve(o.dataDir), env: process.env.DEVYARD_KEK, generate: o.generate, dropUnused: o.dropUnused });
      const lines = [
        ...(r.generatedKekId ? [`added key ${r.generatedKekId} as the current one`] : []),
        `re-wrapped ${r.rewrapped} data key${r.rewrapped === 1 ? '' : 's'} under ${r.currentKekId} (keys from ${r.origin})`,
        ...(r.dropped.length ? [`removed unused keys: ${r.dropped.join(', ')}`] : []),
        ...(r.unused.length ? [`no secret uses these keys any more; they can be removed: ${r.unused.join(', ')}`] : []),
      ];
      process.stdout.write(`${lines.join('\n')}\n`);
    });
}
