/**
 * Access commands: SSH keys, `ssh` (and the `ssh --stdio` ProxyCommand), `config-ssh`,
 * `port-forward`, `open` (browser terminal and previews) and port sharing. Everything goes through
 * a gateway; the server only says which one and signs the short-lived access tokens.
 */
import { spawn, spawnSync } from 'node:child_process';
import { chmodSync, existsSync, mkdirSync, readFileSync, realpathSync, renameSync, statSync, writeFileSync } from 'node:fs';
import { createServer, type Server, type Socket } from 'node:net';
import { homedir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import type { Command } from 'commander';
import type { AccessToken, GatewayEndpoint } from '@devyard/api/access-schemas';
import type { Box } from '@devyard/api/box-schemas';
import { ApiError } from '@devyard/sdk/api-error';
import type { DevyardClient } from '@devyard/sdk/devyard-client';
import { openTunnel, TunnelError } from '@devyard/sdk/tunnel-client';
import { CliUsageError, clientFromEnv, configPath } from '../cli-config.js';
import { browserLink, tunnelUrl } from '../gateway-links.js';
import { cliScript } from '../cli-script.js';
import { age, printJson, table } from '../output-format.js';
import { configArg, mergeBlock, mergeKnownHosts, parsePortSpec, proxyCommand, renderBlock, type KnownHost } from '../ssh-config-block.js';
import { waitForBox } from '../wait-for-box.js';
import { signKeyChallenge } from '../ssh-key-proof.js';

const NO_GATEWAY = 'no gateway is running for this server: start one with `devyard gateway --server URL --token-file <server data dir>/gateway.token` (`devyard up` runs one)';

function requireGateway(g: GatewayEndpoint | null | undefined): GatewayEndpoint {
  if (!g) throw new CliUsageError(NO_GATEWAY);
  return g;
}

// ---- files ----

/** The devyard-managed known_hosts: next to the CLI config (default ~/.config/devyard/known_hosts). */
export function knownHostsPath(): string {
  return join(dirname(configPath()), 'known_hosts');
}

function defaultConfigPath(): string {
  return join(homedir(), '.config', 'devyard', 'config.json');
}

/** Writes through a temp file and a rename, so a reader (ssh) never sees half a file. */
function writeFileAtomic(file: string, content: string, mode: number): void {
  let target = file;
  try {
    target = realpathSync(file); // a symlinked ~/.ssh/config (dotfile managers) stays a symlink
  } catch {}
  const tmp = `${target}.devyard-${process.pid}.tmp`;
  writeFileSync(tmp, content, { mode });
  chmodSync(tmp, mode);
  renameSync(tmp, target);
}

function readOr(file: string, fallback: string): string {
  try {
    return readFileSync(file, 'utf8');
  } catch {
    return fallback;
  }
}

function updateKnownHosts(entries: KnownHost[], prune = false): string {
  const file = knownHostsPath();
  mkdirSync(dirname(file), { recursive: true, mode: 0o700 });
  const before = readOr(file, '');
  const after = mergeKnownHosts(before, entries, { prune });
  if (after !== before || !existsSync(file)) writeFileAtomic(file, after, 0o600);
  return file;
}

/**
 * The last access token `ssh --stdio` got, with its gateway: while the server is unreachable, new
 * SSH connections use it until it expires (the gateway serves on from its cached route table).
 */
interface CachedAccess {
  server: string;
  token: string;
  expiresAt: string;
  gateway: GatewayEndpoint;
}

function accessCachePath(): string {
  return join(dirname(configPath()), 'access-token.json');
}

function saveAccess(server: string, tok: AccessToken): void {
  if (!tok.gateway) return;
  try {
    mkdirSync(dirname(accessCachePath()), { recursive: true, mode: 0o700 });
    writeFileAtomic(accessCachePath(), `${JSON.stringify({ server, token: tok.token, expiresAt: tok.expiresAt, gateway: tok.gateway } satisfies CachedAccess)}\n`, 0o600);
  } catch {}
}

function cachedAccess(server: string): CachedAccess | undefined {
  try {
    const c = JSON.parse(readFileSync(accessCachePath(), 'utf8')) as CachedAccess;
    return c.server === server && c.gateway && Date.parse(c.expiresAt) > Date.now() + 30_000 ? c : undefined;
  } catch {
    return undefined;
  }
}

const unreachable = (e: unknown) => e instanceof ApiError && e.status === 0;

function proxyCommandFor(box: string, withConfigEnv: boolean): string {
  const cfg = configPath();
  return proxyCommand({ node: process.execPath, script: cliScript(), box, configFile: withConfigEnv && resolve(cfg) !== defaultConfigPath() ? resolve(cfg) : undefined });
}

// ---- boxes ----

/** Starts a stopped box or resumes a paused one and waits until it runs (progress on stderr). */
async function ensureRunning(client: DevyardClient, name: string): Promise<Box> {
  let box = await client.getBox(name);
  if (box.desiredState === 'running' && box.phase === 'running') return box;
  if (box.desiredState === 'deleted') throw new CliUsageError(`box ${name} is being deleted`);
  if (box.desiredState === 'stopped' || box.desiredState === 'paused') {
    const verb = box.desiredState === 'paused' ? 'resume' : 'start';
    process.stderr.write(`${name} is ${box.phase}: ${verb === 'resume' ? 'resuming' : 'starting'} it\n`);
    box = await client.boxVerb(name, verb);
  }
  return waitForBox(client, box);
}

// ---- tunnels ----

function tunnelErrorText(e: Error, what: string, gateway: GatewayEndpoint): string {
  if (e instanceof TunnelError) {
    if (e.code === 401) return `the gateway at ${gateway.url} refused the access token (${e.message}); is it connected to this server?`;
    if (e.code === 404) return `the gateway at ${gateway.url} knows no ${what} (${e.message})`;
    if (e.code === 4404) return `nothing listens on ${what}`;
    return `${what}: ${e.message}`;
  }
  const code = (e as { code?: string }).code;
  if (code === 'ECONNREFUSED' || code === 'ENOTFOUND' || code === 'EHOSTUNREACH' || code === 'ETIMEDOUT') {
    return `cannot reach the gateway at ${gateway.url} (${code}); is it running? (\`devyard up\` runs one, or \`devyard gateway\`)`;
  }
  return `${what}: ${e.message}`;
}

/** `ssh --stdio`: stdin/stdout ↔ the gateway's SSH tunnel of the box. Any failure: one line, exit 255. */
async function sshStdio(name: string): Promise<void> {
  const die = (msg: string): never => {
    process.stderr.write(`devyard: error: ${msg}\n`);
    process.exit(255);
  };
  let gateway: GatewayEndpoint;
  let token: string;
  let client: DevyardClient | undefined;
  try {
    client = clientFromEnv();
    const [conn, tok] = await Promise.all([client.getBoxConnection(name), client.createAccessToken(900)]);
    // The server is the trust anchor for box host keys: keep our known_hosts current (a re-created
    // box has a new key) before ssh verifies the one the gateway presents.
    try {
      updateKnownHosts([{ alias: conn.hostKeyAlias, hostKey: conn.hostKey }]);
    } catch {}
    gateway = requireGateway(tok.gateway ?? conn.gateway);
    token = tok.token;
    saveAccess(client.url, tok);
  } catch (e) {
    const cached = client && unreachable(e) ? cachedAccess(client.url) : undefined;
    if (!cached) return die((e as Error).message);
    gateway = cached.gateway;
    token = cached.token;
  }
  const tunnel = openTunnel({ url: tunnelUrl(gateway, `/v1/boxes/${encodeURIComponent(name)}/ssh`), token });
  tunnel.on('error', (e) => die(tunnelErrorText(e, `box "${name}"`, gateway)));
  process.stdout.on('error', () => process.exit(0)); // ssh went away
  process.stdin.pipe(tunnel);
  tunnel.on('data', (d: Buffer) => {
    if (!process.stdout.write(d)) {
      tunnel.pause();
      process.stdout.once('drain', () => tunnel.resume());
    }
  });
  tunnel.on('end', () => process.stdout.write('', () => process.exit(0)));
}

/** `devyard ssh NAME [-- CMD…]`: the system ssh with the ProxyCommand above and pinned host key. */
async function sshInteractive(name: string, command: string[]): Promise<void> {
  const client = clientFromEnv();
  let alias = `devyard.${name}`;
  let user = name;
  let knownHosts = knownHostsPath();
  try {
    await ensureRunning(client, name);
    const conn = await client.getBoxConnection(name);
    requireGateway(conn.gateway);
    knownHosts = updateKnownHosts([{ alias: conn.hostKeyAlias, hostKey: conn.hostKey }]);
    alias = conn.hostKeyAlias;
    user = conn.sshUser;
  } catch (e) {
    // With the server away, a running box is still reachable through the gateway we used last.
    const known = readOr(knownHosts, '').split('\n').some((l) => l.startsWith(`${alias} `));
    if (!unreachable(e) || !known || !cachedAccess(client.url)) throw e;
    process.stderr.write(`devyard: the server is unreachable; connecting through the last gateway used\n`);
  }
  const args = [
    '-o', `ProxyCommand=${proxyCommandFor(name, false)}`,
    '-o', `HostKeyAlias=${alias}`,
    '-o', `UserKnownHostsFile=${configArg(knownHosts)}`,
    '-o', 'StrictHostKeyChecking=yes',
    '-o', 'UpdateHostKeys=no',
    '-o', 'LogLevel=ERROR',
    '-l', user,
  ];
  if (command.length === 0 && process.stdin.isTTY) args.push('-t');
  args.push('--', alias, ...command);
  // ssh owns the terminal now: Ctrl-C is for it (and the remote side), not for us.
  const ignore = () => {};
  process.on('SIGINT', ignore);
  process.on('SIGQUIT', ignore);
  try {
    process.exitCode = await new Promise<number>((resolvePromise, reject) => {
      const child = spawn('ssh', args, { stdio: 'inherit', env: { ...process.env, DEVYARD_CONFIG: resolve(configPath()) } });
      child.on('error', (e: Error & { code?: string }) =>
        reject(e.code === 'ENOENT' ? new CliUsageError('the OpenSSH client (`ssh`) is not installed or not on PATH (Debian/Ubuntu: apt-get install openssh-client)') : e),
      );
      child.on('exit', (code, signal) => resolvePromise(code ?? (signal ? 255 : 0)));
    });
  } finally {
    process.off('SIGINT', ignore);
    process.off('SIGQUIT', ignore);
  }
}

/** `devyard port-forward`: one local listener per spec; each connection is its own tunnel. */
async function portForward(name: string, specs: string[]): Promise<void> {
  const client = clientFromEnv();
  const parsed = specs.map(parsePortSpec);
  await client.getBox(name); // an unknown box fails here, not on the first connection
  let token: Promise<AccessToken> | undefined;
  const freshToken = async (): Promise<AccessToken> => {
    const cur = token && (await token.catch(() => undefined));
    if (!cur || Date.parse(cur.expiresAt) - Date.now() < 60_000) token = client.createAccessToken(3600);
    return token!;
  };
  let waking: Promise<unknown> | undefined;
  const running = async () => {
    let box: Box;
    try {
      box = await client.getBox(name);
    } catch (e) {
      // With the server away the gateway still serves running boxes (and the token is cached).
      if (e instanceof ApiError && e.status === 0) return;
      throw e;
    }
    if (box.desiredState === 'running' && box.phase === 'running') return;
    waking ??= ensureRunning(client, name).finally(() => (waking = undefined));
    await waking;
  };
  const servers: Server[] = [];
  const onConnection = (sock: Socket, local: number, remote: number) => {
    sock.pause();
    const label = `127.0.0.1:${local} -> ${name}:${remote}`;
    void (async () => {
      let gateway: GatewayEndpoint | undefined;
      try {
        await running();
        const tok = await freshToken();
        gateway = requireGateway(tok.gateway);
        const g = gateway;
        const tunnel = openTunnel({ url: tunnelUrl(g, `/v1/boxes/${encodeURIComponent(name)}/tcp/${remote}`), token: tok.token });
        tunnel.on('error', (e) => {
          process.stderr.write(`devyard: port-forward ${label}: ${tunnelErrorText(e, `port ${remote} of ${name}`, g)}\n`);
          sock.destroy();
        });
        tunnel.on('close', () => sock.end());
        sock.on('error', () => tunnel.destroy());
        sock.on('close', () => tunnel.destroy());
        sock.pipe(tunnel).pipe(sock);
        sock.resume();
      } catch (e) {
        process.stderr.write(`devyard: port-forward ${label}: ${gateway ? tunnelErrorText(e as Error, `port ${remote} of ${name}`, gateway) : (e as Error).message}\n`);
        sock.destroy();
      }
    })();
  };
  try {
    for (const { local, remote } of parsed) {
      const server = createServer({ allowHalfOpen: true });
      servers.push(server);
      await new Promise<void>((resolvePromise, reject) => {
        server.once('error', (e: Error & { code?: string }) => reject(e.code === 'EADDRINUSE' ? new CliUsageError(`127.0.0.1:${local} is already in use; pick another local port`) : e));
        server.listen(local, '127.0.0.1', () => resolvePromise());
      });
      const bound = (server.address() as { port: number }).port;
      server.on('connection', (sock) => onConnection(sock, bound, remote));
      process.stdout.write(`Forwarding 127.0.0.1:${bound} -> ${name}:${remote}\n`);
    }
  } catch (e) {
    for (const s of servers) s.close();
    throw e;
  }
  await new Promise<void>((resolvePromise) => {
    const stop = () => {
      for (const s of servers) s.close();
      resolvePromise();
    };
    process.once('SIGINT', stop);
    process.once('SIGTERM', stop);
  });
  process.exit(0); // open tunnels end with us
}

// ---- registration ----

function readPublicKey(file: string | undefined): { text: string; source: string; file?: string } {
  if (file === '-') return { text: readFileSync(0, 'utf8'), source: 'stdin' };
  if (file) {
    const text = readFileSync(file, 'utf8');
    return { text, source: file, file };
  }
  const dir = join(homedir(), '.ssh');
  for (const n of ['id_ed25519.pub', 'id_ecdsa.pub', 'id_rsa.pub']) {
    const f = join(dir, n);
    if (existsSync(f)) return { text: readFileSync(f, 'utf8'), source: f, file: f };
  }
  throw new CliUsageError(`no public key found in ${dir} (id_ed25519.pub, id_ecdsa.pub, id_rsa.pub): create one with \`ssh-keygen -t ed25519\` or name a file`);
}

export function registerAccessCommands(program: Command): void {
  // ---- keys ----
  const keys = program
    .command('keys')
    .description('your SSH public keys, for `ssh -p PORT <box>@<gateway>` (list them; add, remove)')
    .enablePositionalOptions()
    .option('--json', 'print JSON')
    .action(async (o) => listKeys(Boolean(o.json)));
  const listKeys = async (json: boolean) => {
    const list = await clientFromEnv().listSshKeys();
    if (json) return printJson(list);
    if (list.length === 0) return void process.stdout.write('no SSH keys yet: `devyard keys add` (reads ~/.ssh/id_ed25519.pub)\n');
    process.stdout.write(`${table(['ID', 'NAME', 'FINGERPRINT', 'AGE'], list.map((k) => [k.id, k.name, k.fingerprint, age(k.createdAt)]))}\n`);
  };
  const keysJson = (o: { json?: boolean }) => Boolean(o.json ?? keys.opts().json);
  keys
    .command('list')
    .description('list your SSH keys')
    .option('--json', 'print JSON')
    .action(async (o) => listKeys(keysJson(o)));
  keys
    .command('add')
    .description('register a public key (default: the first of ~/.ssh/id_ed25519.pub, id_ecdsa.pub, id_rsa.pub; - reads stdin), signing a server challenge with it to prove you hold it')
    .argument('[file]', 'public key file, or - for stdin')
    .option('--name <name>', 'label (default: the key comment)')
    .option('--identity <file>', 'private key to sign with (default: the file without .pub, else ssh-agent)')
    .option('--json', 'print the key as JSON')
    .action(async (file: string | undefined, o) => {
      const { text, source, file: publicKeyFile } = readPublicKey(file);
      const line = text
        .split('\n')
        .map((l) => l.trim())
        .filter((l) => l && !l.startsWith('#'))
        .join('\n');
      if (!line) throw new CliUsageError(`${source} holds no public key`);
      const client = clientFromEnv();
      const { challenge } = await client.sshKeyChallenge();
      const signature = signKeyChallenge(challenge, line, { identity: o.identity, publicKeyFile });
      const key = await client.addSshKey(line, { challenge, signature }, o.name);
      if (keysJson(o)) return printJson(key);
      process.stdout.write(`added SSH key ${key.name} (${key.fingerprint}) from ${source}\n`);
    });
  keys
    .command('remove')
    .alias('rm')
    .description('remove one of your SSH keys')
    .argument('<id-or-fingerprint>')
    .action(async (id: string) => {
      await clientFromEnv().removeSshKey(id);
      process.stdout.write(`removed SSH key ${id}\n`);
    });

  // ---- ssh ----
  program
    .command('ssh')
    .description("open a shell in a box (starting it if needed) with the system ssh, or run a command: devyard ssh NAME -- CMD…")
    .argument('<name>')
    .argument('[command...]', 'command to run instead of a shell (after --)')
    .option('--stdio', 'connect stdin/stdout to the box\'s SSH server (what ssh runs as ProxyCommand)')
    .action(async (name: string, command: string[], o) => {
      if (o.stdio) return sshStdio(name);
      await sshInteractive(name, command);
    });

  program
    .command('config-ssh')
    .description('write `Host devyard.<box>` entries into ~/.ssh/config, for ssh, scp, rsync, VS Code Remote-SSH and JetBrains Gateway')
    .option('--ssh-config <file>', 'ssh config file to edit', join(homedir(), '.ssh', 'config'))
    .option('--dry-run', 'print the block instead of writing it')
    .action(async (o) => {
      const client = clientFromEnv();
      const boxes = (await client.listBoxes()).filter((b) => b.desiredState !== 'deleted');
      const conns = (
        await Promise.all(
          boxes.map((b) =>
            client.getBoxConnection(b.name).catch((e: unknown) => {
              if (e instanceof ApiError && e.status === 404) return null; // deleted meanwhile
              throw e;
            }),
          ),
        )
      ).filter((c) => c !== null);
      const file = resolve(o.sshConfig as string);
      const kh = knownHostsPath();
      const block = renderBlock(
        conns.map((c) => ({ box: c.box, alias: c.hostKeyAlias, proxyCommand: proxyCommandFor(c.box, true) })),
        { knownHostsFile: kh, serverUrl: client.url },
      );
      if (o.dryRun) {
        process.stdout.write(`# would write to ${file} (and ${conns.length} host keys to ${kh}):\n${block}`);
        return;
      }
      const before = readOr(file, '');
      const after = mergeBlock(before, block);
      if (!existsSync(dirname(file))) mkdirSync(dirname(file), { recursive: true, mode: 0o700 });
      const mode = existsSync(file) ? statSync(file).mode & 0o777 : 0o600;
      if (after !== before || !existsSync(file)) writeFileAtomic(file, after, mode);
      updateKnownHosts(
        conns.map((c) => ({ alias: c.hostKeyAlias, hostKey: c.hostKey })),
        true,
      );
      const lines = [
        `${after !== before ? 'Wrote' : 'Unchanged:'} ${conns.length} host${conns.length === 1 ? '' : 's'} in ${file} (between the DEVYARD markers)`,
        ...conns.map((c) => `  ${c.hostKeyAlias}`),
        `Host keys: ${kh}`,
      ];
      if (conns.length > 0) lines.push(`Connect with \`ssh ${conns[0]!.hostKeyAlias}\`, or pick it in VS Code Remote-SSH / JetBrains Gateway.`);
      if (!process.env.DEVYARD_CONFIG && process.env.DEVYARD_TOKEN && !existsSync(configPath())) {
        lines.push(`note: the entries read the CLI config ${configPath()}, which does not exist; DEVYARD_URL/DEVYARD_TOKEN from this shell are not written into ${file}`);
      }
      if (conns[0] && !conns[0].gateway) lines.push(`note: ${NO_GATEWAY}`);
      process.stdout.write(`${lines.join('\n')}\n`);
    });

  // ---- ports ----
  program
    .command('port-forward')
    .description('forward local ports to ports inside a box (LOCAL:REMOTE, or PORT for the same on both sides) until Ctrl-C')
    .argument('<name>')
    .argument('<ports...>', 'LOCAL:REMOTE or PORT')
    .action(async (name: string, specs: string[]) => portForward(name, specs));

  program
    .command('open')
    .description("open the box's terminal in a browser, or the preview of a port on its own host (prints a one-use sign-in link)")
    .argument('<name>')
    .option('--port <port>', 'open the preview of this port instead', (v) => {
      const n = Number(v);
      if (!Number.isInteger(n) || n < 1 || n > 65535) throw new CliUsageError(`--port expects 1-65535, got "${v}"`);
      return n;
    })
    .action(async (name: string, o) => {
      const client = clientFromEnv();
      const port = o.port as number | undefined;
      // A link for exactly this terminal or preview, one use within a minute (the server checks that
      // you may connect to the box for a terminal; the gateway checks a preview when it is opened).
      const tok = await client.createSignInToken(name, port);
      const link = browserLink(requireGateway(tok.gateway), tok.token, name, port);
      process.stdout.write(`${link}\n`);
      if (process.stdout.isTTY) {
        process.stderr.write('(a sign-in link for one use within a minute; the browser session it opens lasts 8 hours)\n');
        if (spawnSync('sh', ['-c', 'command -v xdg-open'], { stdio: 'ignore' }).status === 0) {
          spawn('xdg-open', [link], { stdio: 'ignore', detached: true }).on('error', () => {}).unref();
        }
      }
    });

  const ports = program
    .command('ports')
    .description("a box's shared ports and their preview URLs (share, unshare)")
    .argument('<name>')
    .option('--json', 'print JSON')
    .action(async (name: string, o) => {
      const list = await clientFromEnv().listBoxPorts(name);
      if (o.json) return printJson(list);
      if (list.length === 0) {
        return void process.stdout.write(`no shared ports on ${name}: every port is private (preview one with \`devyard open ${name} --port N\`, share it with \`devyard ports share ${name} N\`)\n`);
      }
      process.stdout.write(`${table(['PORT', 'VISIBILITY', 'PREVIEW'], list.map((p) => [p.port, p.visibility, p.previewUrl ?? '- (no gateway serves previews)']))}\n`);
    });
  const portArg = (v: string) => {
    const n = Number(v);
    if (!Number.isInteger(n) || n < 1 || n > 65535) throw new CliUsageError(`expected a port 1-65535, got "${v}"`);
    return n;
  };
  ports
    .command('share')
    .description("let every signed-in user of the organization open a port's preview")
    .argument('<name>')
    .argument('<port>')
    .option('--org', 'share with the organization (the default, and the only scope so far)')
    .action(async (name: string, port: string) => {
      const p = await clientFromEnv().setBoxPort(name, portArg(port), 'org');
      process.stdout.write(`port ${p.port} of ${name} is shared with the organization${p.previewUrl ? `: ${p.previewUrl}` : ''}\n`);
    });
  ports
    .command('unshare')
    .description('make a port private again (only users who may connect to the box)')
    .argument('<name>')
    .argument('<port>')
    .action(async (name: string, port: string) => {
      await clientFromEnv().resetBoxPort(name, portArg(port));
      process.stdout.write(`port ${port} of ${name} is private\n`);
    });
}
