/**
 * `devyard audit`: read the organization's audit log, export it as JSON Lines and verify its hash
 * chain. Read-only by design: the API offers no way to change an entry.
 */
import { createWriteStream } from 'node:fs';
import { once } from 'node:events';
import type { Command } from 'commander';
import type { AuditEntry } from '@devyard/api/audit-schemas';
import { parseDuration } from '@devyard/api/duration-format';
import { CliUsageError, clientFromEnv } from '../cli-config.js';
import { printJson, table } from '../output-format.js';

/** `--since`: a duration back from now (30m, 1h, 2d) or an RFC 3339 time, as RFC 3339. */
export function sinceArg(text: string | undefined, now = Date.now()): string | undefined {
  if (text === undefined) return undefined;
  const ms = parseDuration(text);
  if (ms !== undefined) return new Date(now - ms).toISOString();
  if (/^\d{4}-\d\d-\d\dT\d\d:\d\d(:\d\d(\.\d+)?)?(Z|[+-]\d\d:\d\d)$/i.test(text) && !Number.isNaN(Date.parse(text))) return text;
  throw new CliUsageError(`--since takes a duration (30m, 1h, 2d) or an RFC 3339 time (2025-01-31T09:00:00Z), not "${text}"`);
}

function limitArg(text: string): number {
  const n = Number(text);
  if (!Number.isInteger(n) || n < 1 || n > 1000) throw new CliUsageError(`--limit takes a number from 1 to 1000, not "${text}"`);
  return n;
}

function resultText(e: AuditEntry): string {
  if (e.result === 'ok') return 'ok';
  const status = e.detail?.status;
  return typeof status === 'number' ? `${e.result} ${status}` : e.result;
}

export function auditTable(entries: AuditEntry[]): string {
  return table(
    ['TIME', 'ACTOR', 'ACTION', 'TARGET', 'RESULT', 'SOURCE'],
    entries.map((e) => [e.time.replace(/\.\d+Z$/, 'Z'), e.actor, e.action, e.target ?? '-', resultText(e), e.source ?? '-']),
  );
}

export function registerAuditCommands(program: Command): void {
  const audit = program
    .command('audit')
    .description("the organization's audit log: the newest entries, oldest first")
    .enablePositionalOptions()
    .option('--since <when>', 'only entries since a duration ago (30m, 1h, 2d) or an RFC 3339 time')
    .option('--actor <name>', 'only entries of this actor (a user, or system:box-reconciler, system:warm-pool)')
    .option('--limit <n>', 'at most this many entries, the newest (default 100, at most 1000)', limitArg)
    .option('--json', 'print JSON')
    .action(async (o: { since?: string; actor?: string; limit?: number; json?: boolean }) => {
      const limit = o.limit ?? 100;
      // Newest first from the server, so the limit keeps the latest; shown oldest first like a log.
      const entries = (await clientFromEnv().listAudit({ since: sinceArg(o.since), actor: o.actor, limit, order: 'desc' })).reverse();
      if (o.json) return printJson(entries);
      if (entries.length === 0) {
        process.stdout.write('no audit entries\n');
        return;
      }
      process.stdout.write(`${auditTable(entries)}\n`);
      if (entries.length === limit) process.stderr.write(`(the newest ${limit} entries; --limit or --since for others, \`devyard audit export\` for all)\n`);
    });

  audit
    .command('export')
    .description('every entry as JSON Lines (one JSON object per line, oldest first), with its hashes')
    .option('--output <file>', 'write to this file instead of stdout')
    .option('--since <when>', 'only entries since a duration ago or an RFC 3339 time')
    .option('--actor <name>', 'only entries of this actor')
    .action(async (o: { output?: string; since?: string; actor?: string }) => {
      const lines = clientFromEnv().exportAudit({ since: sinceArg(o.since), actor: o.actor });
      if (!o.output) {
        for await (const line of lines) process.stdout.write(`${line}\n`);
        return;
      }
      const out = createWriteStream(o.output, { mode: 0o600 });
      let n = 0;
      try {
        for await (const line of lines) {
          if (!out.write(`${line}\n`)) await once(out, 'drain');
          n++;
        }
      } finally {
        out.end();
        await once(out, 'close');
      }
      process.stderr.write(`wrote ${n} audit entries to ${o.output}\n`);
    });

  audit
    .command('verify')
    .description("check the organization's hash chain; exits 1 naming the first edited or deleted entry")
    .option('--json', 'print JSON')
    .action(async (o: { json?: boolean }) => {
      const v = await clientFromEnv().verifyAudit();
      if (o.json) printJson(v);
      if (!v.ok) throw new Error(`audit log tampered with at entry ${v.seq}: ${v.reason}`);
      if (!o.json) process.stdout.write(`audit log intact: ${v.entries} entries verified\n`);
    });
}
