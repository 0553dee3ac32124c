/**
 * Real git servers on loopback for the workspace and prebuild tests: `git daemon` serving public
 * repositories, and `git http-backend` behind a Node HTTP server that demands HTTP Basic auth for
 * private ones. Both only listen on 127.0.0.1 and are stopped by `close()`.
 */
import { execFileSync, spawn, type ChildProcess } from 'node:child_process';
import { mkdir, mkdtemp, rm, writeFile } from 'node:fs/promises';
import { createServer, type Server } from 'node:http';
import { connect, createServer as createTcpServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

/** Commits of the fixture repository. */
export interface FixtureCommits {
  /** First commit on main, tagged `v1` (annotated). */
  c1: string;
  /** Second commit on main (main's head). */
  c2: string;
  /** Only commit of branch `feature` (on top of c1). */
  c3: string;
}

const GIT_ENV = {
  ...process.env,
  GIT_CONFIG_NOSYSTEM: '1',
  GIT_CONFIG_GLOBAL: '/dev/null',
  GIT_AUTHOR_NAME: 't',
  GIT_AUTHOR_EMAIL: 't@example.invalid',
  GIT_COMMITTER_NAME: 't',
  GIT_COMMITTER_EMAIL: 't@example.invalid',
};

function git(cwd: string, ...args: string[]): string {
  return execFileSync('git', args, { cwd, env: GIT_ENV, encoding: 'utf8' }).trim();
}

/** A free TCP port on loopback (the daemon needs one up front). */
async function freePort(): Promise<number> {
  const srv = createTcpServer();
  await new Promise<void>((r) => srv.listen(0, '127.0.0.1', r));
  const port = (srv.address() as { port: number }).port;
  await new Promise((r) => srv.close(r));
  return port;
}

async function waitForPort(port: number): Promise<void> {
  for (let i = 0; i < 200; i++) {
    const ok = await new Promise<boolean>((resolve) => {
      const c = connect(port, '127.0.0.1');
      c.on('connect', () => {
        c.destroy();
        resolve(true);
      });
      c.on('error', () => resolve(false));
    });
    if (ok) return;
    await new Promise((r) => setTimeout(r, 25));
  }
  throw new Error(`nothing listens on 127.0.0.1:${port}`);
}

/** The git servers and the repositories they serve. */
export class GitFixture {
  /** Base URL of the git daemon (`git://127.0.0.1:<port>`). */
  daemonUrl = '';
  /** Base URL of the authenticated HTTP server. */
  httpUrl = '';
  /** Commits of `app` (served publicly as `app.git`, privately as `secret-app.git`). */
  commits!: FixtureCommits;
  /** Authorization headers the HTTP server saw. */
  readonly authHeaders: string[] = [];
  private daemon?: ChildProcess;
  private http?: Server;
  private work = '';

  private constructor(
    /** Root of the served repositories. */
    readonly root: string,
    /** The one accepted credential. */
    readonly credentials: { username: string; password: string },
  ) {}

  /** Creates the repositories and starts both servers. */
  static async start(): Promise<GitFixture> {
    const root = await mkdtemp(join(tmpdir(), 'dy-git-'));
    const f = new GitFixture(root, { username: 'builder', password: `s3cret-${Math.random().toString(36).slice(2)}` });
    await f.createRepos();
    await f.startDaemon();
    await f.startHttp();
    return f;
  }

  /** Adds a commit to main of both served repositories and returns its sha. */
  async pushCommit(file: string, content: string): Promise<string> {
    await writeFile(join(this.work, file), content);
    git(this.work, 'add', '.');
    git(this.work, 'commit', '-q', '-m', `change ${file}`);
    git(this.work, 'push', '-q', 'public', 'main');
    git(this.work, 'push', '-q', 'private', 'main');
    return git(this.work, 'rev-parse', 'HEAD');
  }

  /** Stops the servers and removes the repositories. */
  async close(): Promise<void> {
    if (this.daemon && this.daemon.exitCode === null) {
      const exited = new Promise((r) => this.daemon!.once('exit', r));
      this.daemon.kill('SIGTERM');
      await exited;
    }
    if (this.http) {
      this.http.closeAllConnections();
      await new Promise((r) => this.http!.close(r));
    }
    await rm(this.root, { recursive: true, force: true });
  }

  private async createRepos(): Promise<void> {
    this.work = join(this.root, 'work');
    await mkdir(this.work);
    git(this.work, 'init', '-q', '-b', 'main');
    await writeFile(join(this.work, 'README'), 'v1\n');
    await writeFile(join(this.work, 'build.sh'), '#!/bin/sh\necho built > built.txt\n', { mode: 0o755 });
    git(this.work, 'add', '.');
    git(this.work, 'commit', '-q', '-m', 'one');
    const c1 = git(this.work, 'rev-parse', 'HEAD');
    git(this.work, 'tag', '-a', 'v1', '-m', 'release 1');
    git(this.work, 'checkout', '-q', '-b', 'feature');
    await writeFile(join(this.work, 'FEATURE'), 'feature\n');
    git(this.work, 'add', '.');
    git(this.work, 'commit', '-q', '-m', 'feature');
    const c3 = git(this.work, 'rev-parse', 'HEAD');
    git(this.work, 'checkout', '-q', 'main');
    await writeFile(join(this.work, 'README'), 'v2\n');
    git(this.work, 'commit', '-q', '-am', 'two');
    const c2 = git(this.work, 'rev-parse', 'HEAD');
    this.commits = { c1, c2, c3 };
    for (const [remote, dir] of [
      ['public', 'public/app.git'],
      ['private', 'private/secret-app.git'],
    ] as const) {
      const bare = join(this.root, dir);
      await mkdir(bare, { recursive: true });
      git(bare, 'init', '-q', '--bare', '-b', 'main');
      git(this.work, 'remote', 'add', remote, bare);
      git(this.work, 'push', '-q', remote, 'main', 'feature', 'v1');
    }
  }

  private async startDaemon(): Promise<void> {
    const port = await freePort();
    const base = join(this.root, 'public');
    this.daemon = spawn(
      'git',
      ['daemon', '--export-all', `--base-path=${base}`, '--listen=127.0.0.1', `--port=${port}`, '--reuseaddr', '--informative-errors', base],
      { stdio: 'ignore', env: GIT_ENV },
    );
    await waitForPort(port);
    this.daemonUrl = `git://127.0.0.1:${port}`;
  }

  private async startHttp(): Promise<void> {
    const expected = `Basic ${Buffer.from(`${this.credentials.username}:${this.credentials.password}`).toString('base64')}`;
    this.http = createServer((req, res) => {
      const auth = req.headers.authorization;
      if (auth) this.authHeaders.push(auth);
      if (auth !== expected) {
        req.resume();
        res.writeHead(401, { 'WWW-Authenticate': 'Basic realm="git"' }).end('unauthorized\n');
        return;
      }
      const url = new URL(req.url ?? '/', 'http://x');
      const cgi = spawn('git', ['http-backend'], {
        env: {
          ...GIT_ENV,
          GIT_PROJECT_ROOT: join(this.root, 'private'),
          GIT_HTTP_EXPORT_ALL: '1',
          PATH_INFO: decodeURIComponent(url.pathname),
          REQUEST_METHOD: req.method ?? 'GET',
          QUERY_STRING: url.search.replace(/^\?/, ''),
          CONTENT_TYPE: req.headers['content-type'] ?? '',
          REMOTE_USER: this.credentials.username,
          REMOTE_ADDR: '127.0.0.1',
          HTTP_CONTENT_ENCODING: req.headers['content-encoding'] ?? '',
          GIT_PROTOCOL: String(req.headers['git-protocol'] ?? ''),
        },
        stdio: ['pipe', 'pipe', 'ignore'],
      });
      req.pipe(cgi.stdin);
      let head = Buffer.alloc(0);
      let headersDone = false;
      cgi.stdout.on('data', (chunk: Buffer) => {
        if (headersDone) {
          res.write(chunk);
          return;
        }
        head = Buffer.concat([head, chunk]);
        const end = head.indexOf('\r\n\r\n');
        if (end < 0) return;
        headersDone = true;
        let status = 200;
        for (const line of head.subarray(0, end).toString('latin1').split('\r\n')) {
          const i = line.indexOf(':');
          const k = line.slice(0, i).trim();
          const v = line.slice(i + 1).trim();
          if (k.toLowerCase() === 'status') status = Number(v.split(' ')[0]);
          else res.setHeader(k, v);
        }
        res.writeHead(status);
        res.write(head.subarray(end + 4));
      });
      cgi.on('close', () => res.end());
    });
    await new Promise<void>((r) => this.http!.listen(0, '127.0.0.1', r));
    this.httpUrl = `http://127.0.0.1:${(this.http.address() as { port: number }).port}`;
  }
}
