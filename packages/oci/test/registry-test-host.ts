/**
 * A real `docker-registry` (distribution 2.8) on loopback for tests, plus `skopeo` to push OCI
 * layouts into it. Every process, port and directory it makes is released by `stop()`.
 */
import { spawn, execFile, type ChildProcess } from 'node:child_process';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';

const run = promisify(execFile);

/** A free loopback TCP port (released before use: good enough for tests on one machine). */
export async function freePort(): Promise<number> {
  const server = createServer();
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const port = (server.address() as { port: number }).port;
  await new Promise<void>((resolve) => server.close(() => resolve()));
  return port;
}

export class TestRegistry {
  private constructor(
    /** `127.0.0.1:<port>` */
    readonly host: string,
    /** Temp directory holding config, storage and htpasswd. */
    readonly dir: string,
    private readonly child: ChildProcess,
    private readonly creds?: { username: string; password: string },
  ) {}

  /** Starts a registry; with `auth`, it requires HTTP Basic with those credentials. */
  static async start(opts: { auth?: { username: string; password: string } } = {}): Promise<TestRegistry> {
    const dir = await mkdtemp(join(tmpdir(), 'devyard-registry-'));
    try {
      const port = await freePort();
      const host = `127.0.0.1:${port}`;
      let auth = '';
      if (opts.auth) {
        // distribution only accepts bcrypt entries.
        const { stdout } = await run('htpasswd', ['-Bbn', opts.auth.username, opts.auth.password]);
        await writeFile(join(dir, 'htpasswd'), stdout);
        auth = `auth:\n  htpasswd:\n    realm: devyard-test\n    path: ${join(dir, 'htpasswd')}\n`;
      }
      const config =
        `version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\n` +
        `storage:\n  filesystem:\n    rootdirectory: ${join(dir, 'storage')}\n  delete:\n    enabled: true\n` +
        `http:\n  addr: ${host}\n  secret: devyard-test-secret\n` +
        auth;
      await writeFile(join(dir, 'config.yml'), config);
      const child = spawn('/usr/bin/docker-registry', ['serve', join(dir, 'config.yml')], { stdio: ['ignore', 'ignore', 'pipe'] });
      let stderr = '';
      child.stderr!.on('data', (d: Buffer) => (stderr = (stderr + d.toString()).slice(-4000)));
      const registry = new TestRegistry(host, dir, child, opts.auth);
      const deadline = Date.now() + 15_000;
      for (;;) {
        if (child.exitCode !== null) throw new Error(`docker-registry exited ${child.exitCode}: ${stderr}`);
        try {
          const res = await fetch(`http://${host}/v2/`);
          if (res.status === 200 || res.status === 401) break;
        } catch {
          // not listening yet
        }
        if (Date.now() > deadline) {
          await registry.stop();
          throw new Error(`docker-registry did not start: ${stderr}`);
        }
        await new Promise((r) => setTimeout(r, 50));
      }
      return registry;
    } catch (err) {
      await rm(dir, { recursive: true, force: true });
      throw err;
    }
  }

  /** Pushes `oci:<layout>:<tag>` to `<host>/<repoTag>`; `all` pushes a whole index, `zstd` recompresses layers. */
  async push(layout: string, tag: string, repoTag: string, opts: { all?: boolean; zstd?: boolean } = {}): Promise<void> {
    const args = ['copy', '--insecure-policy', '--quiet', '--dest-tls-verify=false'];
    if (this.creds) args.push('--dest-creds', `${this.creds.username}:${this.creds.password}`);
    if (opts.all) args.push('--all');
    if (opts.zstd) args.push('--dest-compress', '--dest-compress-format', 'zstd');
    args.push(`oci:${layout}:${tag}`, `docker://${this.host}/${repoTag}`);
    await run('skopeo', args, { env: { ...process.env, HOME: this.dir } });
  }

  /** Where the registry stores a blob's bytes (tests corrupt it to check verification). */
  blobPath(digest: string): string {
    const hex = digest.replace(/^sha256:/, '');
    return join(this.dir, 'storage', 'docker', 'registry', 'v2', 'blobs', 'sha256', hex.slice(0, 2), hex, 'data');
  }

  async stop(): Promise<void> {
    if (this.child.exitCode === null && this.child.signalCode === null) {
      const exited = new Promise((r) => this.child.once('exit', r));
      this.child.kill('SIGTERM');
      const timer = setTimeout(() => this.child.kill('SIGKILL'), 5000);
      await exited;
      clearTimeout(timer);
    }
    await rm(this.dir, { recursive: true, force: true });
  }
}
