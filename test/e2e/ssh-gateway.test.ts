/**
 * SSH into real boxes with the real OpenSSH client through the gateway `devyard up` runs: keys,
 * `ssh -p PORT box@host`, `devyard ssh`, `devyard config-ssh` (then plain `ssh`, scp, sftp, rsync,
 * `ssh -L`), `devyard port-forward`, waking a stopped box, and — with the roles as separate
 * daemons on the same data dir — an open session surviving the server's death and a new gateway
 * process serving the same host identities. Nothing touches the real ~/.ssh: ssh gets a temp HOME,
 * `-F` and explicit known_hosts files.
 */
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import { mkdirSync, readFileSync, statSync, writeFileSync } from 'node:fs';
import { createServer } from 'node:net';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { DevyardClient } from '@devyard/sdk/devyard-client';
import { BIN, cleanup, cli, cliOk, daemonOutput, kill9, newHarness, startDaemon, startUp, waitUntil, type CliResult, type Harness } from './devyard-harness.js';

let h: Harness;
let client: DevyardClient;
let home: string;
let key: string;
let otherKey: string;
let knownHosts: string;
let sshConfig: string;
const daemons: ChildProcess[] = [];
const BOX = 'web';

const T = 240_000;

function run(cmd: string, args: string[], input?: string): CliResult {
  const r = spawnSync(cmd, args, { cwd: h.dir, env: h.env, input: input ?? '', encoding: 'utf8', timeout: T });
  return { code: r.status ?? -1, stdout: r.stdout ?? '', stderr: r.stderr ?? (r.error ? String(r.error) : '') };
}

/** `ssh` straight to the gateway's SSH port with the test key (no user or system config). */
function sshArgs(identity = key, strict = 'accept-new'): string[] {
  return [
    '-F', '/dev/null',
    '-p', String(h.sshPort),
    '-i', identity,
    '-o', 'IdentitiesOnly=yes',
    '-o', 'BatchMode=yes',
    '-o', `UserKnownHostsFile=${knownHosts}`,
    '-o', 'GlobalKnownHostsFile=/dev/null',
    '-o', `StrictHostKeyChecking=${strict}`,
  ];
}

const HOST_KEY_TROUBLE = /WARNING|IDENTIFICATION HAS CHANGED|Host key verification failed|authenticity of host|Permanently added/;

const sha256 = (file: string) => createHash('sha256').update(readFileSync(file)).digest('hex');

const freePort = () =>
  new Promise<number>((resolve) => {
    const s = createServer().listen(0, '127.0.0.1', () => {
      const p = (s.address() as { port: number }).port;
      s.close(() => resolve(p));
    });
  });

const until = <T>(fn: () => Promise<T>, ok: (v: T) => boolean, ms = 60_000) => waitUntil(h, fn, ok, ms);

/** GET through a local forward, retried while the forward comes up. */
async function fetchText(url: string): Promise<string> {
  return until(
    async () => {
      const res = await fetch(url, { signal: AbortSignal.timeout(10_000) });
      return res.ok ? res.text() : undefined;
    },
    (t) => typeof t === 'string',
    60_000,
  ) as Promise<string>;
}

/** A child whose output is collected, with a way to wait for some of it. */
function watch(proc: ChildProcess): { out: () => string; err: () => string; waitFor: (s: string | RegExp, ms?: number) => Promise<void>; exited: Promise<number> } {
  let out = '';
  let err = '';
  proc.stdout?.on('data', (d: Buffer) => (out += d.toString()));
  proc.stderr?.on('data', (d: Buffer) => (err += d.toString()));
  const exited = new Promise<number>((resolve) => proc.on('exit', (code, signal) => resolve(code ?? (signal ? 128 : -1))));
  const waitFor = async (s: string | RegExp, ms = 60_000) => {
    const end = Date.now() + ms;
    while (!(typeof s === 'string' ? out.includes(s) : s.test(out))) {
      if (Date.now() > end) throw new Error(`did not see ${String(s)}; stdout: ${out}\nstderr: ${err}`);
      await new Promise((r) => setTimeout(r, 50));
    }
  };
  return { out: () => out, err: () => err, waitFor, exited };
}

beforeAll(async () => {
  h = newHarness('ssh', 224);
  await startUp(h);
  home = join(h.dir, 'home');
  mkdirSync(join(home, '.ssh'), { recursive: true, mode: 0o700 });
  h.env = { ...h.env, HOME: home };
  key = join(home, '.ssh', 'id_ed25519');
  otherKey = join(h.dir, 'not-registered');
  knownHosts = join(h.dir, 'gateway_known_hosts');
  sshConfig = join(h.dir, 'ssh', 'config');
  for (const k of [key, otherKey]) expect(run('ssh-keygen', ['-q', '-t', 'ed25519', '-N', '', '-C', 'e2e', '-f', k]).code).toBe(0);
  const cfg = JSON.parse(readFileSync(join(h.dir, 'config.json'), 'utf8')) as { url: string; token: string };
  client = new DevyardClient({ url: cfg.url, token: cfg.token });
  const r = cli(h, ['create', BOX, '--template', 'tiny', '--memory', '512MiB', '--wait']);
  expect(r.code, r.stderr).toBe(0);
}, T);

afterAll(async () => {
  for (const d of daemons) await kill9(d);
  if (h) await cleanup(h);
}, T);

describe('SSH through the gateway of devyard up', { timeout: T }, () => {
  it('prints how to reach the gateway', () => {
    expect(daemonOutput(h)).toMatch(/Gateway\s+http:\/\/127\.0\.0\.1:\d+/);
    expect(daemonOutput(h)).toContain(`ssh -p ${h.sshPort} NAME@127.0.0.1`);
    expect(daemonOutput(h)).toContain('devyard ssh demo');
    // Previews on hosts of their own, a site apart from the gateway's 127.0.0.1.
    expect(daemonOutput(h)).toMatch(/Previews\s+http:\/\/PORT--NAME\.localhost:\d+\//);
  });

  it('registers the default public key and lists it', () => {
    const out = cliOk(h, ['keys', 'add']);
    const fingerprint = run('ssh-keygen', ['-l', '-f', `${key}.pub`]).stdout.split(' ')[1]!;
    expect(out).toContain(fingerprint);
    expect(out).toContain(`${key}.pub`);
    // Another key through stdin, then removed by fingerprint.
    const third = join(h.dir, 'third');
    run('ssh-keygen', ['-q', '-t', 'ed25519', '-N', '', '-C', 'third', '-f', third]);
    const viaStdin = cli(h, ['keys', 'add', '-', '--name', 'spare']);
    expect(viaStdin.stderr).toBe('devyard: error: stdin holds no public key\n'); // nothing on stdin
    // A public key alone proves nothing: without its private key (or ssh-agent) it is not registered.
    const unproven = cli(h, ['keys', 'add', '-', '--name', 'spare'], readFileSync(`${third}.pub`, 'utf8'));
    expect(unproven.code).not.toBe(0);
    expect(unproven.stderr).toMatch(/could not sign the registration challenge with ssh-agent/);
    const added = JSON.parse(cli(h, ['keys', 'add', '-', '--name', 'spare', '--identity', third, '--json'], readFileSync(`${third}.pub`, 'utf8')).stdout) as { fingerprint: string };
    let list = JSON.parse(cliOk(h, ['keys', 'list', '--json'])) as Array<{ name: string; fingerprint: string }>;
    expect(list.map((k) => k.name).sort()).toEqual(['e2e', 'spare']);
    cliOk(h, ['keys', 'remove', added.fingerprint]);
    list = JSON.parse(cliOk(h, ['keys', '--json'])) as Array<{ name: string; fingerprint: string }>;
    expect(list).toEqual([expect.objectContaining({ name: 'e2e', fingerprint })]);
    expect(cliOk(h, ['keys'])).toMatch(/ID\s+NAME\s+FINGERPRINT/);
    const bad = cli(h, ['keys', 'remove', 'SHA256:nope']);
    expect(bad.code).not.toBe(0);
    expect(bad.stderr).toMatch(/^devyard: error: .*SHA256:nope.*\n$/);
  });

  it('ssh -p PORT box@host: output and exit code, and a quiet second connect', async () => {
    const first = run('ssh', [...sshArgs(), `${BOX}@127.0.0.1`, 'echo hi; exit 3']);
    expect(first.stdout, first.stderr).toBe('hi\n');
    expect(first.code).toBe(3);
    // The gateway presents the installation's gateway host key.
    const conn = await client.getBoxConnection(BOX);
    expect(readFileSync(knownHosts, 'utf8')).toContain(conn.gatewayHostKey.split(' ')[1]!);
    const second = run('ssh', [...sshArgs(key, 'yes'), `${BOX}@127.0.0.1`, 'echo again']);
    expect(second).toMatchObject({ code: 0, stdout: 'again\n' });
    expect(second.stderr).not.toMatch(HOST_KEY_TROUBLE);
  });

  it('refuses a key that is not registered', () => {
    const r = run('ssh', [...sshArgs(otherKey), `${BOX}@127.0.0.1`, 'true']);
    expect(r.code).not.toBe(0);
    expect(r.stderr).toContain('Permission denied');
  });

  it('says so for an unknown box, in one line', () => {
    const r = run('ssh', [...sshArgs(), 'nope@127.0.0.1', 'true']);
    expect(r.code).toBe(255);
    expect(r.stderr).toContain('devyard: no box "nope"');
    const c = cli(h, ['ssh', 'nope', '--', 'true']);
    expect(c.code).not.toBe(0);
    expect(c.stderr).toMatch(/^devyard: error: [^\n]*nope[^\n]*\n$/);
    // The ProxyCommand side: one line and 255, like ssh's own failures.
    const p = cli(h, ['ssh', '--stdio', 'nope']);
    expect(p.code).toBe(255);
    expect(p.stderr).toMatch(/^devyard: error: [^\n]*nope[^\n]*\n$/);
  });

  it('devyard ssh gives an interactive shell a terminal', () => {
    // script(1) runs the CLI on a pseudo-terminal, as a user's shell would.
    const r = run('script', ['-qec', `${BIN} ssh ${BOX}`, '/dev/null'], 'test -t 0 && echo "tty-$((6*7))"\nexit 7\n');
    expect(r.stdout, r.stderr).toContain('tty-42');
    expect(r.code).toBe(7);
  });

  it('devyard ssh runs commands with exit codes and stdin, pinning the box host key', async () => {
    const r = cli(h, ['ssh', BOX, '--', 'uname', '-a']);
    expect(r.code, r.stderr).toBe(0);
    expect(r.stdout).toMatch(/^Linux web /);
    expect(cli(h, ['ssh', BOX, '--', 'exit 5']).code).toBe(5);
    expect(cli(h, ['ssh', BOX, '--', 'cat'], 'from stdin\n')).toMatchObject({ code: 0, stdout: 'from stdin\n' });
    const conn = await client.getBoxConnection(BOX);
    expect(readFileSync(join(h.dir, 'known_hosts'), 'utf8')).toContain(`devyard.${BOX} ${conn.hostKey.split(' ').slice(0, 2).join(' ')}`);
  });

  it('config-ssh writes an idempotent block that plain ssh uses with strict host key checking', () => {
    const out = cliOk(h, ['config-ssh', '--ssh-config', sshConfig]);
    expect(out).toContain(`devyard.${BOX}`);
    expect(statSync(sshConfig).mode & 0o777).toBe(0o600);
    expect(statSync(join(h.dir, 'ssh')).mode & 0o777).toBe(0o700);
    // The rest of the file survives, and a second run changes nothing.
    writeFileSync(sshConfig, `Host elsewhere\n  User someone\n\n${readFileSync(sshConfig, 'utf8')}`);
    const before = readFileSync(sshConfig, 'utf8');
    expect(cliOk(h, ['config-ssh', '--ssh-config', sshConfig])).toContain('Unchanged');
    expect(readFileSync(sshConfig, 'utf8')).toBe(before);
    expect(before).toMatch(/^Host elsewhere\n {2}User someone\n\n# -+START-DEVYARD-+\n/);
    expect(cliOk(h, ['config-ssh', '--ssh-config', sshConfig, '--dry-run'])).toContain(`Host devyard.${BOX}`);
    const r = run('ssh', ['-F', sshConfig, '-o', 'BatchMode=yes', `devyard.${BOX}`, 'echo via-config']);
    expect(r, daemonOutput(h).slice(-2000)).toMatchObject({ code: 0, stdout: 'via-config\n' });
    expect(r.stderr).not.toMatch(HOST_KEY_TROUBLE);
  });

  it('keeps the host identity across stop and start', () => {
    cliOk(h, ['stop', BOX, '--wait']);
    cliOk(h, ['start', BOX, '--wait']);
    const r = run('ssh', ['-F', sshConfig, '-o', 'BatchMode=yes', `devyard.${BOX}`, 'true']);
    expect(r.code, r.stderr).toBe(0);
    expect(r.stderr).not.toMatch(HOST_KEY_TROUBLE);
  });

  it('copies 50 MB both ways with scp and sftp', () => {
    const big = join(h.dir, 'big.bin');
    writeFileSync(big, randomBytes(50 * 1024 * 1024));
    const ssh = ['-F', sshConfig, '-o', 'BatchMode=yes'];
    const up = run('scp', [...ssh, big, `devyard.${BOX}:big.bin`]);
    expect(up.code, up.stderr).toBe(0);
    expect(cliOk(h, ['exec', BOX, '--', 'sha256sum', '/root/big.bin']).split(' ')[0]).toBe(sha256(big));
    const down = run('scp', [...ssh, `devyard.${BOX}:big.bin`, join(h.dir, 'big.scp')]);
    expect(down.code, down.stderr).toBe(0);
    expect(sha256(join(h.dir, 'big.scp'))).toBe(sha256(big));
    const batch = join(h.dir, 'sftp.batch');
    writeFileSync(batch, `put ${big} big2.bin\nget big2.bin ${join(h.dir, 'big.sftp')}\nrm big2.bin\nrm big.bin\n`);
    const sftp = run('sftp', [...ssh, '-b', batch, `devyard.${BOX}`]);
    expect(sftp.code, sftp.stderr).toBe(0);
    expect(sha256(join(h.dir, 'big.sftp'))).toBe(sha256(big));
  });

  it('syncs a directory with rsync -e ssh', () => {
    const src = join(h.dir, 'tree');
    mkdirSync(join(src, 'sub', 'deeper'), { recursive: true });
    writeFileSync(join(src, 'a.txt'), 'a\n');
    writeFileSync(join(src, 'sub', 'b.txt'), 'b\n');
    writeFileSync(join(src, 'sub', 'deeper', 'c.bin'), randomBytes(1024 * 1024));
    const e = `ssh -F ${sshConfig} -o BatchMode=yes`;
    const up = run('rsync', ['-a', '-e', e, `${src}/`, `devyard.${BOX}:tree/`]);
    expect(up.code, up.stderr).toBe(0);
    expect(cliOk(h, ['exec', BOX, '--', 'cat', '/root/tree/sub/b.txt'])).toBe('b\n');
    const back = join(h.dir, 'tree-back');
    const down = run('rsync', ['-a', '-e', e, `devyard.${BOX}:tree/`, `${back}/`]);
    expect(down.code, down.stderr).toBe(0);
    for (const f of ['a.txt', 'sub/b.txt', 'sub/deeper/c.bin']) expect(sha256(join(back, f))).toBe(sha256(join(src, f)));
  });

  it('forwards a port with ssh -L and with devyard port-forward', async () => {
    cliOk(h, ['exec', BOX, '--', 'sh', '-c', 'mkdir -p /tmp/www && echo hello-www > /tmp/www/index.html && busybox httpd -p 127.0.0.1:8080 -h /tmp/www']);
    const viaSsh = await freePort();
    const fwd = spawn('ssh', ['-F', sshConfig, '-o', 'BatchMode=yes', '-o', 'ExitOnForwardFailure=yes', '-N', '-L', `127.0.0.1:${viaSsh}:127.0.0.1:8080`, `devyard.${BOX}`], { env: h.env, stdio: ['ignore', 'pipe', 'pipe'] });
    daemons.push(fwd);
    try {
      expect(await fetchText(`http://127.0.0.1:${viaSsh}/`)).toBe('hello-www\n');
    } finally {
      await kill9(fwd);
    }

    const [local, dead] = [await freePort(), await freePort()];
    // host-programs: none (this checkout's devyard CLI)
    const pf = spawn(BIN, ['port-forward', BOX, `${local}:8080`, `${dead}:9`], { cwd: h.dir, env: h.env, stdio: ['ignore', 'pipe', 'pipe'] });
    daemons.push(pf);
    const w = watch(pf);
    await w.waitFor(`Forwarding 127.0.0.1:${dead} -> ${BOX}:9`);
    expect(w.out()).toContain(`Forwarding 127.0.0.1:${local} -> ${BOX}:8080`);
    expect(await fetchText(`http://127.0.0.1:${local}/`)).toBe('hello-www\n');
    expect(await fetchText(`http://127.0.0.1:${local}/index.html`)).toBe('hello-www\n');
    await expect(fetch(`http://127.0.0.1:${dead}/`, { signal: AbortSignal.timeout(30_000) })).rejects.toThrow();
    await until(async () => w.err(), (e) => e.includes('nothing listens on port 9'));
    pf.kill('SIGINT');
    expect(await w.exited).toBe(0);
  });

  it('signs a browser in to the terminal and to a port preview; shares ports', async () => {
    const link = cliOk(h, ['open', BOX]).trim();
    expect(link.startsWith(`${h.gatewayUrl}/__devyard/auth?token=`)).toBe(true);
    expect(link).toMatch(/&next=%2Fboxes%2Fweb%2Fterminal$/);
    const signIn = await fetch(link, { redirect: 'manual' });
    expect(signIn.status).toBe(303);
    expect(signIn.headers.get('location')).toBe(`/boxes/${BOX}/terminal`);
    const cookie = signIn.headers.get('set-cookie')!.split(';')[0]!;
    expect(signIn.headers.get('set-cookie')).toContain(`Path=/boxes/${BOX}/terminal`);
    const page = await fetch(`${h.gatewayUrl}/boxes/${BOX}/terminal`, { headers: { cookie } });
    expect(page.status).toBe(200);
    expect(await page.text()).toContain('terminal');
    // The link worked once.
    expect((await fetch(link, { redirect: 'manual' })).status).toBe(401);

    const shared = cliOk(h, ['ports', 'share', BOX, '8080', '--org']);
    expect(shared).toMatch(/shared with the organization: http:\/\/8080--web\.localhost:\d+\/\n$/);
    expect(JSON.parse(cliOk(h, ['ports', BOX, '--json']))).toEqual([{ port: 8080, visibility: 'org', previewUrl: expect.stringMatching(/^http:\/\/8080--web\.localhost:/) }]);
    expect(cliOk(h, ['ports', BOX])).toMatch(/PORT\s+VISIBILITY\s+PREVIEW *\n8080\s+org\s+http/);
    cliOk(h, ['ports', 'unshare', BOX, '8080']);
    expect(JSON.parse(cliOk(h, ['ports', BOX, '--json']))).toEqual([]);

    // Host-form preview (curl resolves *.localhost to loopback by itself).
    const preview = cliOk(h, ['open', BOX, '--port', '8080']).trim();
    expect(preview).toMatch(/^http:\/\/8080--web\.localhost:\d+\/__devyard\/auth\?token=.+&next=%2F$/);
    const jar = join(h.dir, 'cookies.txt');
    const r = run('curl', ['-sS', '-L', '-c', jar, '-b', jar, preview]);
    expect(r.stdout, r.stderr + daemonOutput(h).slice(-1500)).toBe('hello-www\n');
  });

  it('devyard ssh starts a stopped box first', async () => {
    cliOk(h, ['stop', BOX, '--wait']);
    const r = cli(h, ['ssh', BOX, '--', 'echo woke']);
    expect(r.code, r.stderr).toBe(0);
    expect(r.stdout).toBe('woke\n');
    expect(r.stderr).toContain('starting');
    expect((await client.getBox(BOX)).phase).toBe('running');
  });
});

describe('with the roles as separate daemons', { timeout: T }, () => {
  let server: ChildProcess | null = null;
  let gateway: ChildProcess | null = null;
  let apiPort: number;
  let httpPort: number;

  const startServer = async () => {
    server = (await startDaemon(h, ['server', '--data-dir', join(h.dataDir, 'server'), '--port', String(apiPort)], /devyard server listening/)).proc;
    daemons.push(server);
  };
  const startGateway = async () => {
    gateway = (
      await startDaemon(
        h,
        ['gateway', '--server', h.url, '--token-file', join(h.dataDir, 'server', 'gateway.token'), '--ssh-port', String(h.sshPort), '--http-port', String(httpPort)],
        /"msg":"gateway ready"/,
      )
    ).proc;
    daemons.push(gateway);
  };

  beforeAll(async () => {
    // Same data dir, same ports: the box is adopted and clients keep their configuration.
    apiPort = Number(new URL(h.url).port);
    httpPort = Number(new URL(h.gatewayUrl).port);
    await kill9(h.proc);
    await startServer();
    const token = readFileSync(join(h.dataDir, 'server', 'node.token'), 'utf8').trim();
    const agent = (
      await startDaemon(
        h,
        ['agent', '--server', h.url, '--token', token, '--data-dir', join(h.dataDir, 'node'), '--bridge', h.bridge, '--subnet', h.subnet, '--resync-ms', '1000', '--runtimes', 'sandbox'],
        /"msg":"registered"/,
      )
    ).proc;
    daemons.push(agent);
    await startGateway();
    await until(() => client.getBox(BOX), (b) => b.phase === 'running');
  }, T);

  it('an open SSH session keeps working while the server is down', async () => {
    const session = spawn('ssh', ['-F', sshConfig, '-o', 'BatchMode=yes', `devyard.${BOX}`, 'cat'], { env: h.env, stdio: ['pipe', 'pipe', 'pipe'] });
    daemons.push(session);
    const w = watch(session);
    session.stdin!.write('before\n');
    await w.waitFor('before\n');
    await kill9(server);
    session.stdin!.write('after\n');
    await w.waitFor('before\nafter\n');
    // New connections with a registered key keep working too, from the gateway's cached routes.
    const fresh = run('ssh', [...sshArgs(key, 'yes'), `${BOX}@127.0.0.1`, 'echo still']);
    expect(fresh, w.err()).toMatchObject({ code: 0, stdout: 'still\n' });
    // And through the ProxyCommand, on the access token the CLI cached while the server was up.
    const proxied = run('ssh', ['-F', sshConfig, '-o', 'BatchMode=yes', `devyard.${BOX}`, 'echo proxied']);
    expect(proxied, proxied.stderr).toMatchObject({ code: 0, stdout: 'proxied\n' });
    const viaCli = cli(h, ['ssh', BOX, '--', 'echo via-cli']);
    expect(viaCli, viaCli.stderr).toMatchObject({ code: 0, stdout: 'via-cli\n' });
    expect(viaCli.stderr).toContain('server is unreachable');
    session.stdin!.end();
    expect(await w.exited).toBe(0);
    expect(w.err()).not.toMatch(HOST_KEY_TROUBLE);
  });

  it('a new gateway process serves new connections with the same host keys', async () => {
    await startServer();
    await kill9(gateway);
    // The server still advertises the dead gateway for a while: the ProxyCommand says it is unreachable.
    const down = cli(h, ['ssh', '--stdio', BOX]);
    expect(down.code).toBe(255);
    expect(down.stderr).toMatch(/^devyard: error: cannot reach the gateway at http:\/\/127\.0\.0\.1:\d+ \(ECONNREFUSED\)[^\n]*\n$/);
    await startGateway();
    const direct = run('ssh', [...sshArgs(key, 'yes'), `${BOX}@127.0.0.1`, 'echo direct']);
    expect(direct).toMatchObject({ code: 0, stdout: 'direct\n' });
    expect(direct.stderr).not.toMatch(HOST_KEY_TROUBLE);
    const proxied = run('ssh', ['-F', sshConfig, '-o', 'BatchMode=yes', `devyard.${BOX}`, 'echo proxied']);
    expect(proxied, proxied.stderr).toMatchObject({ code: 0, stdout: 'proxied\n' });
    expect(proxied.stderr).not.toMatch(HOST_KEY_TROUBLE);
    cliOk(h, ['delete', BOX, '--wait']);
  });
});
