/**
 * The gateway against real clients: the OpenSSH client (ssh, scp, sftp, ssh -L, rsync -e ssh) on
 * the gateway's SSH port, and an ssh2 client through the token-authenticated tunnel that
 * `devyard ssh --stdio` uses, with a real sandbox node and control plane in process.
 */
import { spawn } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import { mkdir, readFile, writeFile } from 'node:fs/promises';
import { createServer, type AddressInfo } from 'node:net';
import { join } from 'node:path';
import ssh2 from 'ssh2';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { DevyardClient } from '@devyard/sdk/devyard-client';
import { openTunnel } from '@devyard/sdk/tunnel-client';
import { addKeyFile } from '../../server/test/ssh-key-proof-fixture.js';
import { startAccessStack, waitFor, type AccessStack } from './access-test-stack.js';

interface Ran {
  code: number | null;
  stdout: string;
  stderr: string;
}

/** Runs a command without blocking the event loop (the server and gateway run in this process). */
function run(cmd: string, args: string[], opts: { input?: string; timeoutMs?: number } = {}): Promise<Ran> {
  return new Promise((resolve, reject) => {
    const p = spawn(cmd, args, { stdio: ['pipe', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    p.stdout.on('data', (d: Buffer) => (stdout += d.toString()));
    p.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
    const t = setTimeout(() => p.kill('SIGKILL'), opts.timeoutMs ?? 60_000);
    p.on('error', reject);
    p.on('close', (code) => {
      clearTimeout(t);
      resolve({ code, stdout, stderr });
    });
    p.stdin.end(opts.input ?? '');
  });
}

let stack: AccessStack;
let knownHosts: string;

const sshOpts = () => [
  '-F', '/dev/null',
  '-i', stack.keyFile,
  '-o', 'IdentitiesOnly=yes',
  '-o', 'BatchMode=yes',
  '-o', `UserKnownHostsFile=${knownHosts}`,
  '-o', 'StrictHostKeyChecking=accept-new',
  '-o', 'LogLevel=ERROR',
];
const ssh = (user: string, ...cmd: string[]) => run('ssh', [...sshOpts(), '-p', String(stack.gateway.endpoint.sshPort), `${user}@127.0.0.1`, ...cmd]);

beforeAll(async () => {
  stack = await startAccessStack('gws', 244);
  knownHosts = join(stack.dir, 'known_hosts');
  await stack.runningBox('dev');
  await stack.gateway.cache.refresh();
}, 240_000);

afterAll(async () => {
  await stack?.close();
}, 120_000);

describe('SSH through the gateway (OpenSSH client)', () => {
  it('an interactive shell names the box and the account it is signed in as; commands stay byte-exact', async () => {
    const shell = await run('ssh', [...sshOpts(), '-tt', '-p', String(stack.gateway.endpoint.sshPort), 'dev@127.0.0.1'], { input: 'exit 4\n' });
    expect(shell.code).toBe(4);
    expect(shell.stdout + shell.stderr).toContain('devyard: box dev of admin, signed in as admin');
    const cmd = await ssh('dev', 'true');
    expect([cmd.stdout, cmd.stderr]).toEqual(['', '']);
  });

  it('runs a command with its output and exit status; the host key stays trusted', async () => {
    const r = await ssh('dev', 'echo hi; echo err >&2; exit 3');
    expect(r.stdout).toBe('hi\n');
    expect(r.stderr).toBe('err\n');
    expect(r.code).toBe(3);
    const again = await ssh('dev', 'true');
    expect([again.code, again.stderr]).toEqual([0, '']);
    expect(await readFile(knownHosts, 'utf8')).toContain('ssh-ed25519');
  });

  it('gives a PTY with the requested size and passes TERM', async () => {
    const r = await run('ssh', [...sshOpts(), '-tt', '-o', 'SetEnv=DEVYARD_TEST=yes', '-p', String(stack.gateway.endpoint.sshPort), 'dev@127.0.0.1', 'test -t 0 && echo "tty $TERM $DEVYARD_TEST"; stty size']);
    expect(r.code).toBe(0);
    // A PTY turns \n into \r\n; ssh -tt with a non-terminal stdin asks for 80x24.
    expect(r.stdout).toBe('tty xterm yes\r\n24 80\r\n');
  });

  it('refuses an unknown box with one clear line, and a key nobody registered', async () => {
    const r = await ssh('nope', 'true');
    expect(r.code).toBe(255);
    expect(r.stderr.trim()).toBe('devyard: no box "nope" (or you may not connect to it); see `devyard list`');
    const wrongKey = join(stack.dir, 'wrong');
    await run('ssh-keygen', ['-q', '-t', 'ed25519', '-N', '', '-f', wrongKey]);
    const w = await run('ssh', ['-F', '/dev/null', '-i', wrongKey, '-o', 'IdentitiesOnly=yes', '-o', 'BatchMode=yes', '-o', `UserKnownHostsFile=${knownHosts}`, '-o', 'StrictHostKeyChecking=accept-new', '-p', String(stack.gateway.endpoint.sshPort), 'dev@127.0.0.1', 'true']);
    expect(w.code).toBe(255);
    expect(w.stderr).toContain('Permission denied (publickey)');
  });

  it('copies a file both ways with scp and sftp, byte for byte', async () => {
    const data = randomBytes(5 * 1024 * 1024);
    const src = join(stack.dir, 'up.bin');
    await writeFile(src, data);
    const port = String(stack.gateway.endpoint.sshPort);
    const up = await run('scp', [...sshOpts(), '-P', port, src, 'dev@127.0.0.1:/workspace/up.bin']);
    expect(up.stderr).toBe('');
    expect(up.code).toBe(0);
    const sum = await ssh('dev', 'sha256sum /workspace/up.bin');
    expect(sum.stdout.split(' ')[0]).toBe(createHash('sha256').update(data).digest('hex'));
    const down = join(stack.dir, 'down.bin');
    expect((await run('scp', [...sshOpts(), '-P', port, 'dev@127.0.0.1:/workspace/up.bin', down])).code).toBe(0);
    expect((await readFile(down)).equals(data)).toBe(true);
    const batch = join(stack.dir, 'batch');
    await writeFile(batch, `mkdir /workspace/sftp-dir\nput ${src} /workspace/sftp-dir/x.bin\nls -l /workspace/sftp-dir\n`);
    const s = await run('sftp', [...sshOpts(), '-P', port, '-b', batch, 'dev@127.0.0.1']);
    expect(s.code).toBe(0);
    expect(s.stdout).toContain('x.bin');
  });

  it('syncs a directory with rsync -e ssh', async () => {
    const src = join(stack.dir, 'tree');
    await mkdir(join(src, 'sub'), { recursive: true });
    await writeFile(join(src, 'a.txt'), 'alpha\n');
    await writeFile(join(src, 'sub', 'b.txt'), 'beta\n');
    const e = ['ssh', ...sshOpts(), '-p', String(stack.gateway.endpoint.sshPort)].join(' ');
    const r = await run('rsync', ['-a', '-e', e, `${src}/`, 'dev@127.0.0.1:/workspace/tree/']);
    expect(r.stderr).toBe('');
    expect(r.code).toBe(0);
    expect((await ssh('dev', 'cat /workspace/tree/a.txt /workspace/tree/sub/b.txt')).stdout).toBe('alpha\nbeta\n');
  });

  it('forwards a local port to a server on the box\'s localhost (ssh -L)', async () => {
    await ssh('dev', 'mkdir -p /tmp/www && echo "hello from the box" > /tmp/www/index.html && (busybox httpd -p 127.0.0.1:8080 -h /tmp/www &) ; true');
    const free = createServer();
    await new Promise<void>((r) => free.listen(0, '127.0.0.1', r));
    const local = (free.address() as AddressInfo).port;
    await new Promise((r) => free.close(r));
    const fwd = spawn('ssh', [...sshOpts(), '-N', '-L', `${local}:127.0.0.1:8080`, '-p', String(stack.gateway.endpoint.sshPort), 'dev@127.0.0.1'], { stdio: 'ignore' });
    try {
      const body = await waitFor(async () => (await fetch(`http://127.0.0.1:${local}/`)).text(), (t) => t.length > 0, 20_000);
      expect(body).toBe('hello from the box\n');
    } finally {
      fwd.kill();
    }
  });
});

describe('the token-authenticated tunnel (devyard ssh --stdio)', () => {
  it('presents the box\'s own host key, the same after a stop and start', async () => {
    const conn = await stack.client.getBoxConnection('dev');
    const hostKeyOf = async (): Promise<{ seen: string; out: string; err: string }> => {
      const token = (await stack.client.createAccessToken(60)).token;
      const sock = openTunnel({ url: `${stack.gateway.endpoint.url.replace(/^http/, 'ws')}/v1/boxes/dev/ssh`, token });
      return new Promise((resolve, reject) => {
        const c = new ssh2.Client();
        let seen = '';
        c.on('ready', () => {
          c.exec('cat /etc/hostname', (execError, stream) => {
            if (execError) return reject(execError);
            let out = '';
            let err = '';
            stream.on('data', (d: Buffer) => (out += d.toString()));
            stream.stderr.on('data', (d: Buffer) => (err += d.toString()));
            stream.on('close', () => {
              c.end();
              resolve({ seen, out, err });
            });
          });
        });
        c.on('error', reject);
        c.connect({
          sock,
          username: 'dev',
          hostVerifier: (key: Buffer) => {
            seen = `ssh-ed25519 ${key.toString('base64')}`;
            return true;
          },
        });
      });
    };
    const first = await hostKeyOf();
    expect(first.out).toBe('dev\n');
    expect(first.seen).toBe(conn.hostKey);
    expect(first.seen).not.toBe(conn.gatewayHostKey);
    await stack.client.boxVerb('dev', 'stop');
    await waitFor(() => stack.client.getBox('dev'), (b) => b.phase === 'stopped');
    // Connecting to a stopped box starts it for its owner.
    const second = await hostKeyOf();
    expect([second.seen, second.out]).toEqual([first.seen, first.out]);
    expect(second.err).toMatch(/devyard: box "dev" is stopp(ed|ing); starting it…/);
    expect((await stack.client.getBox('dev')).phase).toBe('running');
  });

  it('refuses a forged or missing token before any SSH', async () => {
    const sock = openTunnel({ url: `${stack.gateway.endpoint.url.replace(/^http/, 'ws')}/v1/boxes/dev/ssh`, token: 'dya_forged.token' });
    const err = await new Promise<Error & { code?: number }>((resolve) => sock.on('error', resolve));
    expect(err.code).toBe(401);
  });
});

describe('another user', () => {
  it('reaches a box shared with their team as <box>.<owner>, and nothing else', async () => {
    const bobToken = (await stack.client.createServiceAccount('bob', 'member')).token;
    const bob = new DevyardClient({ url: stack.cp.url, token: bobToken });
    const bobKey = join(stack.dir, 'bob_key');
    await run('ssh-keygen', ['-q', '-t', 'ed25519', '-N', '', '-f', bobKey]);
    await addKeyFile(bob, bobKey);
    const asBob = (user: string) =>
      run('ssh', ['-F', '/dev/null', '-i', bobKey, '-o', 'IdentitiesOnly=yes', '-o', 'BatchMode=yes', '-o', `UserKnownHostsFile=${knownHosts}`, '-o', 'StrictHostKeyChecking=accept-new', '-o', 'LogLevel=ERROR', '-p', String(stack.gateway.endpoint.sshPort), `${user}@127.0.0.1`, 'cat /etc/hostname']);
    const denied = await asBob('dev.admin');
    expect([denied.code, denied.stderr.trim()]).toEqual([255, 'devyard: no box "dev.admin" (or you may not connect to it); see `devyard list`']);
    await stack.client.createTeam('pair');
    await stack.client.setTeamMember('pair', 'bob', 'member');
    await stack.client.setBoxShare('dev', 'pair', 'connect');
    await stack.gateway.cache.refresh();
    const shared = await asBob('dev.admin');
    expect([shared.code, shared.stdout]).toEqual([0, 'dev\n']);
    await stack.client.removeBoxShare('dev', 'pair');
    await stack.gateway.cache.refresh();
    expect((await asBob('dev.admin')).code).toBe(255);
  });
});

describe('boxes that stopped or paused a moment ago', () => {
  it('resumes a box paused since the last route sync, and does not claim to start a running one', async () => {
    await stack.client.boxVerb('dev', 'pause');
    await waitFor(() => stack.client.getBox('dev'), (b) => b.phase === 'paused');
    const r = await ssh('dev', 'echo back');
    expect(r.stdout).toBe('back\n');
    expect(r.stderr).toContain('resuming it');
    expect(r.code).toBe(0);
    const again = await ssh('dev', 'true');
    expect([again.code, again.stderr]).toEqual([0, '']);
  });
});

describe('activity and faults', () => {
  it('reports session activity to the server', async () => {
    await ssh('dev', 'true');
    await stack.gateway.cache.refresh();
    const conn = await stack.client.getBoxConnection('dev');
    expect(Date.now() - Date.parse(conn.lastActivityAt!)).toBeLessThan(60_000);
  });

  it('keeps an open session and serves new ones from its cache while the server is down', async () => {
    const p = spawn('ssh', [...sshOpts(), '-p', String(stack.gateway.endpoint.sshPort), 'dev@127.0.0.1', 'cat'], { stdio: ['pipe', 'pipe', 'pipe'] });
    let out = '';
    p.stdout.on('data', (d: Buffer) => (out += d.toString()));
    p.stdin.write('before\n');
    await waitFor(async () => out, (o) => o.includes('before'), 20_000);
    await stack.cp.close();
    p.stdin.write('after\n');
    await waitFor(async () => out, (o) => o.includes('after'), 20_000);
    p.stdin.end();
    await new Promise((r) => p.on('close', r));
    const fresh = await ssh('dev', 'echo still here');
    expect(fresh.stdout).toBe('still here\n');
    expect(fresh.code).toBe(0);
  });
});
