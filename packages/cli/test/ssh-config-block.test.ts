import { spawnSync } from 'node:child_process';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import fc from 'fast-check';
import {
  BLOCK_END,
  BLOCK_START,
  configArg,
  mergeBlock,
  mergeKnownHosts,
  parsePortSpec,
  proxyCommand,
  removeBlock,
  renderBlock,
  shellQuote,
  SshConfigError,
} from '@devyard/cli/ssh-config-block';
import { browserLink, tunnelUrl } from '@devyard/cli/gateway-links';

const dir = mkdtempSync(join(tmpdir(), 'devyard-ssh-config-'));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

const entry = (box: string, node = '/usr/bin/node') => ({ box, alias: `devyard.${box}`, proxyCommand: proxyCommand({ node, script: '/opt/devyard/bin/devyard', box }) });
const opts = { knownHostsFile: '/root/.config/devyard/known_hosts', serverUrl: 'http://127.0.0.1:7480' };

describe('proxyCommand and quoting', () => {
  it('quotes for the shell only what needs it', () => {
    expect(shellQuote('/usr/bin/node')).toBe('/usr/bin/node');
    expect(shellQuote("/my dir/it's")).toBe(`'/my dir/it'\\''s'`);
    expect(proxyCommand({ node: '/usr/bin/node', script: '/opt/d/bin/devyard', box: 'web' })).toBe('/usr/bin/node /opt/d/bin/devyard ssh --stdio web');
  });

  it('passes a non-default CLI config through env and escapes % for ssh', () => {
    expect(proxyCommand({ node: '/n', script: '/s', box: 'b', configFile: '/tmp/a b/config.json' })).toBe(`env 'DEVYARD_CONFIG=/tmp/a b/config.json' /n /s ssh --stdio b`);
    expect(proxyCommand({ node: '/n%1', script: '/s', box: 'b' })).toBe('/n%%1 /s ssh --stdio b');
  });

  it('round-trips any path through /bin/sh', () => {
    fc.assert(
      fc.property(fc.string({ minLength: 1, maxLength: 20 }).filter((s) => !s.includes('\0')), (s) => {
        const r = spawnSync('/bin/sh', ['-c', `printf %s ${shellQuote(s)}`], { encoding: 'utf8' });
        expect(r.stdout).toBe(s);
      }),
      { numRuns: 50 },
    );
  });

  it('double-quotes ssh_config arguments with blanks', () => {
    expect(configArg('/root/.config/devyard/known_hosts')).toBe('/root/.config/devyard/known_hosts');
    expect(configArg('/home/a b/known_hosts')).toBe('"/home/a b/known_hosts"');
    expect(configArg('/x%y')).toBe('/x%%y');
  });
});

describe('renderBlock / mergeBlock', () => {
  const block = renderBlock([entry('web'), entry('api')], opts);

  it('renders one sorted Host entry per box between the markers', () => {
    const lines = block.trimEnd().split('\n');
    expect(lines[0]).toBe(BLOCK_START);
    expect(lines.at(-1)).toBe(BLOCK_END);
    expect(lines.filter((l) => l.startsWith('Host '))).toEqual(['Host devyard.api', 'Host devyard.web']);
    expect(block).toContain('  ProxyCommand /usr/bin/node /opt/devyard/bin/devyard ssh --stdio web\n');
    expect(block).toContain('  HostKeyAlias devyard.web\n');
    expect(block).toContain('  StrictHostKeyChecking yes\n');
    expect(renderBlock([], opts)).toContain('(no boxes yet)');
  });

  it('appends to a file without a block and leaves the rest untouched', () => {
    expect(mergeBlock('', block)).toBe(block);
    const user = 'Host github.com\n  User git\n';
    expect(mergeBlock(user, block)).toBe(`${user}\n${block}`);
    expect(mergeBlock('Host x', block)).toBe(`Host x\n\n${block}`);
  });

  it('replaces the block in place and is idempotent', () => {
    const before = 'Host a\n  User a\n';
    const after = '\nHost z\n  User z\n';
    const first = mergeBlock(`${before}\n${renderBlock([entry('old')], opts)}${after}`, block);
    expect(first).toBe(`${before}\n${block}${after}`);
    expect(mergeBlock(first, block)).toBe(first);
    expect(removeBlock(first)).toBe(`${before}\n${after}`);
  });

  it('refuses damaged or repeated markers', () => {
    expect(() => mergeBlock(`${BLOCK_START}\nHost x\n`, block)).toThrow(SshConfigError);
    expect(() => mergeBlock(`${block}${block}`, block)).toThrow(/damaged or repeated/);
    expect(() => mergeBlock(`${BLOCK_END}\n${BLOCK_START}\n`, block)).toThrow(SshConfigError);
  });

  it('is what OpenSSH reads (ssh -G)', () => {
    const file = join(dir, 'config');
    const kh = join(dir, 'my known_hosts');
    writeFileSync(file, mergeBlock('Host other\n  User nobody\n', renderBlock([entry('web', '/opt/node 20/bin/node')], { ...opts, knownHostsFile: kh })));
    const r = spawnSync('ssh', ['-G', '-F', file, 'devyard.web'], { encoding: 'utf8' });
    expect(r.status, r.stderr).toBe(0);
    const cfg = new Map(r.stdout.split('\n').map((l) => [l.slice(0, l.indexOf(' ')), l.slice(l.indexOf(' ') + 1)]));
    expect(cfg.get('user')).toBe('web');
    expect(cfg.get('hostname')).toBe('devyard.web');
    expect(cfg.get('hostkeyalias')).toBe('devyard.web');
    expect(cfg.get('stricthostkeychecking')).toBe('true');
    expect(cfg.get('userknownhostsfile')).toBe(kh);
    expect(cfg.get('proxycommand')).toBe(`'/opt/node 20/bin/node' /opt/devyard/bin/devyard ssh --stdio web`);
  });
});

describe('mergeKnownHosts', () => {
  const key = (n: number) => `ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAI${n} comment`;

  it('sets entries, keeps other lines and drops key comments', () => {
    const existing = `# mine\ngithub.com ssh-ed25519 AAAAgh\ndevyard.web ${key(1)}\n`;
    expect(mergeKnownHosts(existing, [{ alias: 'devyard.web', hostKey: key(2) }])).toBe(
      `# mine\ngithub.com ssh-ed25519 AAAAgh\ndevyard.web ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAI2\n`,
    );
    expect(mergeKnownHosts('', [])).toBe('');
  });

  it('prunes boxes that are gone only when asked, and is idempotent', () => {
    const existing = `devyard.old ${key(1)}\ndevyard.web ${key(1)}\n`;
    const set = [{ alias: 'devyard.web', hostKey: key(3) }];
    expect(mergeKnownHosts(existing, set)).toContain('devyard.old');
    const pruned = mergeKnownHosts(existing, set, { prune: true });
    expect(pruned).toBe('devyard.web ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAI3\n');
    expect(mergeKnownHosts(pruned, set, { prune: true })).toBe(pruned);
  });
});

describe('parsePortSpec', () => {
  it('reads LOCAL:REMOTE and PORT', () => {
    expect(parsePortSpec('8080:80')).toEqual({ local: 8080, remote: 80 });
    expect(parsePortSpec('3000')).toEqual({ local: 3000, remote: 3000 });
    expect(parsePortSpec('0:22')).toEqual({ local: 0, remote: 22 });
  });
  it('refuses anything else', () => {
    for (const bad of ['', 'a', '80:', ':80', '70000', '80:0', '1:2:3', '-1']) expect(() => parsePortSpec(bad), bad).toThrow(/LOCAL:REMOTE/);
  });
});

describe('gateway links', () => {
  const gw = { url: 'http://127.0.0.1:7100', sshHost: '127.0.0.1', sshPort: 2222, previewDomain: 'localhost' };

  it('builds tunnel URLs', () => {
    expect(tunnelUrl(gw, '/v1/boxes/web/ssh')).toBe('ws://127.0.0.1:7100/v1/boxes/web/ssh');
    expect(tunnelUrl({ ...gw, url: 'https://gw.example.com/' }, '/v1/boxes/web/tcp/80')).toBe('wss://gw.example.com/v1/boxes/web/tcp/80');
  });

  it('signs in to the terminal, or to a preview on its own host', () => {
    expect(browserLink(gw, 'dy_a+b', 'web')).toBe('http://127.0.0.1:7100/__devyard/auth?token=dy_a%2Bb&next=%2Fboxes%2Fweb%2Fterminal');
    expect(browserLink(gw, 't', 'web', 3000)).toBe('http://3000--web.localhost:7100/__devyard/auth?token=t&next=%2F');
    expect(browserLink({ ...gw, url: 'https://gw.example.com', previewDomain: 'preview.example.com' }, 't', 'web', 3000)).toBe(
      'https://3000--web.preview.example.com/__devyard/auth?token=t&next=%2F',
    );
    expect(browserLink({ ...gw, url: 'https://example.com/devyard/' }, 't', 'web')).toBe('https://example.com/devyard/__devyard/auth?token=t&next=%2Fdevyard%2Fboxes%2Fweb%2Fterminal');
    // Never under the gateway's origin: a gateway without a preview domain serves no previews.
    expect(() => browserLink({ ...gw, previewDomain: null }, 't', 'web', 3000)).toThrow(/serves no previews: start it with --preview-domain/);
  });
});
