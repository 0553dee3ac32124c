/**
 * Pure text work behind `devyard config-ssh` and `devyard ssh`: the ProxyCommand line, the marked
 * block of `Host devyard.<box>` entries merged into an ssh_config, and the devyard-managed
 * known_hosts file. No I/O here, so every edge case is unit-tested.
 */

export const BLOCK_START = '# ------------START-DEVYARD-----------';
export const BLOCK_END = '# ------------END-DEVYARD------------';

/** Thrown when a file cannot be edited safely (damaged markers); the message says what to fix. */
export class SshConfigError extends Error {}

/** Quotes a word for /bin/sh (ssh runs ProxyCommand through the shell); plain words stay bare. */
export function shellQuote(word: string): string {
  if (/^[A-Za-z0-9_@%+=:,./-]+$/.test(word)) return word;
  return `'${word.replace(/'/g, `'\\''`)}'`;
}

/** ssh expands `%x` tokens in ProxyCommand and file options: a literal `%` must be `%%`. */
export function escapeSshTokens(s: string): string {
  return s.replace(/%/g, '%%');
}

/** An ssh_config argument: double-quoted when it has blanks or quotes (ssh's own word splitting). */
export function configArg(value: string): string {
  const v = escapeSshTokens(value);
  return /[\s"'\\]/.test(v) ? `"${v.replace(/(["\\])/g, '\\$1')}"` : v;
}

export interface ProxyCommandParts {
  /** Absolute path of the node binary. */
  node: string;
  /** Absolute path of the `devyard` script. */
  script: string;
  box: string;
  /** A CLI config other than the default one, passed with `env DEVYARD_CONFIG=…`. */
  configFile?: string;
}

/** `[env DEVYARD_CONFIG=…] node devyard ssh --stdio BOX`, quoted for the shell and escaped for ssh. */
export function proxyCommand(p: ProxyCommandParts): string {
  const words = [...(p.configFile ? ['env', `DEVYARD_CONFIG=${p.configFile}`] : []), p.node, p.script, 'ssh', '--stdio', p.box];
  return escapeSshTokens(words.map(shellQuote).join(' '));
}

export interface HostEntry {
  box: string;
  /** `devyard.<box>`: the Host name, the HostName and the HostKeyAlias. */
  alias: string;
  proxyCommand: string;
}

export interface BlockOptions {
  knownHostsFile: string;
  /** Named in the block's header comment. */
  serverUrl: string;
}

/** The marked block, ending in a newline. */
export function renderBlock(hosts: HostEntry[], opts: BlockOptions): string {
  const lines = [
    BLOCK_START,
    `# Written by \`devyard config-ssh\` for ${opts.serverUrl}; run it again to refresh. Edits inside`,
    '# these markers are replaced; the rest of this file is left alone.',
  ];
  if (hosts.length === 0) lines.push('# (no boxes yet)');
  for (const h of [...hosts].sort((a, b) => a.alias.localeCompare(b.alias))) {
    lines.push(
      '',
      `Host ${h.alias}`,
      `  HostName ${h.alias}`,
      `  User ${h.box}`,
      `  ProxyCommand ${h.proxyCommand}`,
      `  HostKeyAlias ${h.alias}`,
      `  UserKnownHostsFile ${configArg(opts.knownHostsFile)}`,
      '  StrictHostKeyChecking yes',
      '  UpdateHostKeys no',
      // A stopped box is started on connect: let that take its time; keepalives notice dead links.
      '  ConnectTimeout 0',
      '  ServerAliveInterval 30',
      '  ServerAliveCountMax 4',
      '  LogLevel ERROR',
    );
  }
  lines.push(BLOCK_END);
  return `${lines.join('\n')}\n`;
}

/** Where the block is in `text` (line-based), or null; refuses damaged or repeated markers. */
function findBlock(lines: string[]): { start: number; end: number } | null {
  const starts = lines.flatMap((l, i) => (l.trim() === BLOCK_START ? [i] : []));
  const ends = lines.flatMap((l, i) => (l.trim() === BLOCK_END ? [i] : []));
  if (starts.length === 0 && ends.length === 0) return null;
  if (starts.length !== 1 || ends.length !== 1 || ends[0]! < starts[0]!) {
    throw new SshConfigError('the file has a damaged or repeated DEVYARD block (START/END markers); fix or remove it by hand and run again');
  }
  return { start: starts[0]!, end: ends[0]! };
}

/** `existing` with the block replaced in place, or appended (after a blank line) when absent. */
export function mergeBlock(existing: string, block: string): string {
  const lines = existing.split('\n');
  const found = findBlock(lines);
  const blockLines = block.replace(/\n$/, '').split('\n');
  if (found) return [...lines.slice(0, found.start), ...blockLines, ...lines.slice(found.end + 1)].join('\n');
  if (existing.trim() === '') return block;
  const base = existing.endsWith('\n') ? existing : `${existing}\n`;
  return `${base}${base.endsWith('\n\n') ? '' : '\n'}${block}`;
}

/** `existing` without the block (for tests and a future `--remove`). */
export function removeBlock(existing: string): string {
  const lines = existing.split('\n');
  const found = findBlock(lines);
  if (!found) return existing;
  return [...lines.slice(0, found.start), ...lines.slice(found.end + 1)].join('\n');
}

export interface KnownHost {
  alias: string;
  /** OpenSSH public key line (`ssh-ed25519 AAAA… [comment]`). */
  hostKey: string;
}

/**
 * The devyard known_hosts with `entries` set: their old lines replaced, other lines kept; with
 * `prune`, also drops `devyard.*` lines of boxes not in `entries` (a full refresh).
 */
export function mergeKnownHosts(existing: string, entries: KnownHost[], opts: { prune?: boolean } = {}): string {
  const aliases = new Set(entries.map((e) => e.alias));
  const kept = existing.split('\n').filter((line) => {
    const host = line.trim().split(/\s+/)[0] ?? '';
    if (!host || host.startsWith('#')) return line.trim() !== '';
    if (aliases.has(host)) return false;
    return !(opts.prune && host.startsWith('devyard.'));
  });
  const added = entries.map((e) => `${e.alias} ${e.hostKey.trim().split(/\s+/).slice(0, 2).join(' ')}`);
  const all = [...kept, ...added];
  return all.length ? `${all.join('\n')}\n` : '';
}

export interface PortSpec {
  local: number;
  remote: number;
}

/** `LOCAL:REMOTE` or `PORT` (same on both sides); LOCAL 0 picks a free port. */
export function parsePortSpec(spec: string): PortSpec {
  const m = /^(\d{1,5})(?::(\d{1,5}))?$/.exec(spec.trim());
  const local = m ? Number(m[1]) : NaN;
  const remote = m ? Number(m[2] ?? m[1]) : NaN;
  if (!m || local > 65535 || remote < 1 || remote > 65535) throw new SshConfigError(`expected LOCAL:REMOTE or PORT (1-65535), got "${spec}"`);
  return { local, remote };
}
