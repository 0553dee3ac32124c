/**
 * Repository checkout into a box's workspace, done by the agent on the host so that credentials
 * never enter the box: they reach git only through the environment of the git process
 * (GIT_CONFIG_COUNT/KEY/VALUE → a URL-scoped `http.<origin>/.extraHeader`), never its argv (world
 * readable in /proc) and never a file (.git/config, an askpass script) that could end up in a box
 * or a prebuild. git runs with the host's system and global config ignored, so a host
 * `url.insteadOf` or credential helper cannot change what is fetched or leak into a box, and with
 * only network transports allowed, so a user-supplied URL cannot read the agent's own disk.
 */
import { spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { existsSync } from 'node:fs';
import { rename, rm } from 'node:fs/promises';
import { join } from 'node:path';
import { runHostCommand } from '../network/host-command-runner.js';

/** HTTP Basic credentials for a private repository (a token goes in `password`). */
export interface GitCredentials {
  /** User name; hosts that take a bare token accept any non-empty name (e.g. `x-access-token`). */
  username: string;
  /** Password or access token. */
  password: string;
}

/** What to check out. */
export interface CheckoutRequest {
  /** Repository URL: https, http, git or ssh; credentials must not be embedded in it. */
  url: string;
  /** Branch, tag, full ref name or commit sha; default the remote's HEAD. */
  ref?: string;
  /** Credentials for an http(s) URL. */
  credentials?: GitCredentials;
  /** Host directory that is the box's /workspace (its volume or workspace upper). */
  workspaceDir: string;
  /** Directory name under the workspace (default: derived from the URL, see {@link repoNameFromUrl}). */
  name?: string;
  /** Host uid/gid of box root: the checkout is chowned to it so box root owns its files. */
  owner: { uid: number; gid: number };
  /** Progress and status lines from git. */
  onProgress?: (line: string) => void;
  /** Gives up (and cleans up) after this long (default 10 minutes). */
  timeoutMs?: number;
}

/** A finished checkout. */
export interface CheckoutResult {
  /** Full sha of the commit checked out. */
  commit: string;
  /** Directory name under the workspace (the box sees `/workspace/<name>`). */
  name: string;
  /** Host path of the checkout. */
  path: string;
}

/** Why a checkout or ref lookup failed. */
export type CheckoutErrorCode =
  | 'INVALID_URL'
  | 'AUTH_FAILED'
  | 'REPO_NOT_FOUND'
  | 'UNKNOWN_REF'
  | 'DESTINATION_EXISTS'
  | 'TIMEOUT'
  | 'GIT_FAILED';

/** A failed checkout or ref lookup; the message ends with the tail of git's stderr. */
export class CheckoutError extends Error {
  constructor(
    /** Stable error code. */
    readonly code: CheckoutErrorCode,
    message: string,
    /** Last lines git wrote to stderr (empty when git did not run). */
    readonly gitStderr = '',
  ) {
    super(gitStderr ? `${message}: ${gitStderr}` : message);
  }
}

const ALLOWED_PROTOCOLS = ['http', 'https', 'git', 'ssh'];
const FULL_SHA = /^[0-9a-f]{40}$/;
const SHORT_SHA = /^[0-9a-f]{7,39}$/;
const DEFAULT_TIMEOUT_MS = 10 * 60_000;

/** The last path segment of a repository URL without `.git` (`https://h/o/app.git` → `app`). */
export function repoNameFromUrl(url: string): string {
  let path: string;
  try {
    path = new URL(url).pathname;
  } catch {
    // scp-like `user@host:path`.
    path = url.slice(url.indexOf(':') + 1);
  }
  const last = (path.replace(/\/+$/, '').split('/').pop() ?? '').replace(/\.git$/, '');
  if (!/^[A-Za-z0-9._-]+$/.test(last) || last === '.' || last === '..') {
    throw new CheckoutError('INVALID_URL', `cannot derive a directory name from ${url}`);
  }
  return last;
}

/**
 * Clones `url` at `ref` into `<workspaceDir>/<name>`: shallow for a branch, tag or the default
 * branch, a shallow fetch of the commit for a full sha (a full fetch when the server refuses
 * unadvertised objects or the sha is abbreviated). The clone is made in a hidden sibling and
 * renamed into place when complete, so a failure leaves no partial directory.
 */
export async function checkoutRepository(req: CheckoutRequest): Promise<CheckoutResult> {
  const url = checkUrl(req.url);
  const name = req.name ?? repoNameFromUrl(url);
  if (!/^[A-Za-z0-9._-]+$/.test(name) || name.startsWith('.')) throw new CheckoutError('INVALID_URL', `invalid directory name: ${name}`);
  const dest = join(req.workspaceDir, name);
  if (existsSync(dest)) throw new CheckoutError('DESTINATION_EXISTS', `${dest} already exists`);
  const tmp = join(req.workspaceDir, `.${name}.checkout-${randomBytes(4).toString('hex')}`);
  const git = new GitRunner(url, req.credentials, req.onProgress ?? (() => {}), Date.now() + (req.timeoutMs ?? DEFAULT_TIMEOUT_MS));
  try {
    const ref = req.ref;
    if (ref !== undefined && FULL_SHA.test(ref)) {
      await git.run(['init', '--quiet', tmp]);
      await git.run(['-C', tmp, 'remote', 'add', 'origin', url]);
      const shallow = await git.tryRun(['-C', tmp, 'fetch', '--progress', '--depth', '1', 'origin', ref]);
      if (shallow.code !== 0) {
        req.onProgress?.('shallow fetch of the commit refused; fetching full history');
        await git.run(['-C', tmp, 'fetch', '--progress', 'origin']);
      }
      await checkoutCommit(git, tmp, ref);
    } else {
      const args = ['clone', '--progress', '--depth', '1', '--no-tags'];
      if (ref !== undefined) args.push('--branch', shortRefName(ref));
      const r = await git.tryRun([...args, '--', url, tmp]);
      if (r.code !== 0) {
        const unknown = /Remote branch .* not found|couldn't find remote ref|not found in upstream/i.test(r.stderr);
        if (!(unknown && ref !== undefined && SHORT_SHA.test(ref))) throw git.failure(r, 'git clone');
        // Possibly an abbreviated sha: only a full clone can resolve it.
        await rm(tmp, { recursive: true, force: true });
        await git.run(['clone', '--progress', '--no-checkout', '--', url, tmp]);
        await checkoutCommit(git, tmp, ref);
      }
    }
    const commit = (await git.run(['-C', tmp, 'rev-parse', 'HEAD'])).stdout.trim();
    await runHostCommand(['chown', '-hR', `${req.owner.uid}:${req.owner.gid}`, tmp]);
    await rename(tmp, dest);
    req.onProgress?.(`checked out ${commit} into ${name}`);
    return { commit, name, path: dest };
  } catch (err) {
    await rm(tmp, { recursive: true, force: true });
    throw err;
  }
}

/** The sha `ref` (default HEAD) points at on the remote, by `git ls-remote`; tags are peeled. */
export async function resolveRemoteRef(url: string, ref?: string, credentials?: GitCredentials, opts: { timeoutMs?: number } = {}): Promise<string> {
  const clean = checkUrl(url);
  if (ref !== undefined && FULL_SHA.test(ref)) return ref;
  const git = new GitRunner(clean, credentials, () => {}, Date.now() + (opts.timeoutMs ?? 60_000));
  const r = await git.run(['ls-remote', '--', clean]);
  const refs = new Map<string, string>();
  for (const line of r.stdout.split('\n')) {
    const [sha, name] = line.split('\t');
    if (sha && name) refs.set(name, sha);
  }
  const candidates =
    ref === undefined
      ? ['HEAD']
      : ref.startsWith('refs/')
        ? [`${ref}^{}`, ref]
        : [`refs/heads/${ref}`, `refs/tags/${ref}^{}`, `refs/tags/${ref}`];
  for (const c of candidates) {
    const sha = refs.get(c);
    if (sha) return sha;
  }
  throw new CheckoutError('UNKNOWN_REF', `${ref ?? 'HEAD'} not found in ${clean}`);
}

async function checkoutCommit(git: GitRunner, dir: string, ref: string): Promise<void> {
  const r = await git.tryRun(['-C', dir, '-c', 'advice.detachedHead=false', 'checkout', '--quiet', '--detach', `${ref}^{commit}`]);
  if (r.code !== 0) throw new CheckoutError('UNKNOWN_REF', `commit ${ref} not found`, tail(r.stderr));
}

/** `refs/heads/main` → `main`; `git clone --branch` takes short names of branches and tags only. */
function shortRefName(ref: string): string {
  return ref.replace(/^refs\/(heads|tags)\//, '');
}

/**
 * The URL git is given: a network transport only, no embedded credentials (they would be stored
 * in .git/config), no leading dash (an option to git).
 */
function checkUrl(url: string): string {
  if (url.startsWith('-') || /[\s\0]/.test(url)) throw new CheckoutError('INVALID_URL', `invalid repository URL: ${JSON.stringify(url)}`);
  const scp = /^[A-Za-z0-9._-]+@[A-Za-z0-9.-]+:[^/]/.test(url);
  if (scp) return url;
  let parsed: URL;
  try {
    parsed = new URL(url);
  } catch {
    throw new CheckoutError('INVALID_URL', `invalid repository URL: ${url}`);
  }
  const proto = parsed.protocol.replace(/:$/, '');
  if (!ALLOWED_PROTOCOLS.includes(proto)) {
    throw new CheckoutError('INVALID_URL', `unsupported repository URL scheme ${proto}: (allowed: ${ALLOWED_PROTOCOLS.join(', ')})`);
  }
  if (parsed.password) throw new CheckoutError('INVALID_URL', 'credentials must not be embedded in the repository URL');
  if (!parsed.hostname) throw new CheckoutError('INVALID_URL', `repository URL has no host: ${url}`);
  return url;
}

function tail(text: string, lines = 8): string {
  return text
    .split(/[\r\n]+/)
    .map((l) => l.trim())
    // The temporary directory's name means nothing to the user.
    .filter((l) => l && !l.startsWith('Cloning into'))
    .slice(-lines)
    .join('\n');
}

interface GitResult {
  code: number;
  stdout: string;
  stderr: string;
}

/** Runs git with the isolated environment, the credentials and a shared deadline. */
class GitRunner {
  private readonly env: NodeJS.ProcessEnv;

  constructor(
    private readonly url: string,
    credentials: GitCredentials | undefined,
    private readonly onProgress: (line: string) => void,
    private readonly deadline: number,
  ) {
    const config: Array<[string, string]> = [];
    if (credentials) {
      const origin = httpOrigin(url);
      if (!origin) throw new CheckoutError('INVALID_URL', 'credentials are only supported for http(s) URLs');
      const basic = Buffer.from(`${credentials.username}:${credentials.password}`).toString('base64');
      // Scoped to the repository's origin: a redirect to another host does not get the header.
      config.push([`http.${origin}/.extraHeader`, `Authorization: Basic ${basic}`]);
    }
    this.env = {
      PATH: process.env.PATH ?? '/usr/sbin:/usr/bin:/sbin:/bin',
      HOME: '/nonexistent',
      LC_ALL: 'C',
      GIT_TERMINAL_PROMPT: '0',
      GIT_CONFIG_NOSYSTEM: '1',
      GIT_CONFIG_GLOBAL: '/dev/null',
      GIT_ALLOW_PROTOCOL: ALLOWED_PROTOCOLS.join(':'),
      GIT_SSH_COMMAND: 'ssh -o BatchMode=yes',
      GIT_CONFIG_COUNT: String(config.length),
      ...Object.fromEntries(config.flatMap(([k, v], i) => [[`GIT_CONFIG_KEY_${i}`, k], [`GIT_CONFIG_VALUE_${i}`, v]])),
    };
  }

  /** Runs git and throws a classified error on failure. */
  async run(args: string[]): Promise<GitResult> {
    const r = await this.tryRun(args);
    if (r.code !== 0) throw this.failure(r, `git ${subcommand(args)}`);
    return r;
  }

  /** Runs git and returns its result whatever the exit status. */
  tryRun(args: string[]): Promise<GitResult> {
    const remaining = this.deadline - Date.now();
    if (remaining <= 0) return Promise.reject(new CheckoutError('TIMEOUT', 'repository checkout timed out'));
    return new Promise((resolve, reject) => {
      const child = spawn('git', args, { stdio: ['ignore', 'pipe', 'pipe'], env: this.env });
      let stdout = '';
      let stderr = '';
      let partial = '';
      let timedOut = false;
      const timer = setTimeout(() => {
        timedOut = true;
        child.kill('SIGKILL');
      }, remaining);
      child.stdout.on('data', (b: Buffer) => (stdout += b.toString()));
      child.stderr.on('data', (b: Buffer) => {
        const text = b.toString();
        // Keep stderr bounded: a long clone prints thousands of progress updates.
        stderr = (stderr + text).slice(-16_384);
        const parts = (partial + text).split(/[\r\n]/);
        partial = parts.pop() ?? '';
        for (const line of parts) if (line.trim()) this.onProgress(line.trim());
      });
      child.on('error', (e) => {
        clearTimeout(timer);
        reject(new CheckoutError('GIT_FAILED', `cannot run git: ${e.message}`));
      });
      child.on('close', (code) => {
        clearTimeout(timer);
        if (partial.trim()) this.onProgress(partial.trim());
        if (timedOut) reject(new CheckoutError('TIMEOUT', 'repository checkout timed out', tail(stderr)));
        else resolve({ code: code ?? 1, stdout, stderr });
      });
    });
  }

  /** A classified error from a failed git command's stderr. */
  failure(r: GitResult, what: string): CheckoutError {
    const text = r.stderr;
    const t = tail(text);
    if (/Authentication failed|could not read (Username|Password)|terminal prompts disabled|HTTP (Basic: )?Access denied|\b(401|403)\b|Permission denied \(publickey/i.test(text)) {
      return new CheckoutError('AUTH_FAILED', `authentication to ${this.url} failed or is required`, t);
    }
    if (/Remote branch .* not found|couldn't find remote ref|not our ref|reference is not a tree|unknown revision/i.test(text)) {
      return new CheckoutError('UNKNOWN_REF', `ref not found in ${this.url}`, t);
    }
    if (/does not appear to be a git repository|no such repository|repository .* not found|not found|\b404\b|Could not resolve host|Connection refused|unable to access|unable to connect|No such file/i.test(text)) {
      return new CheckoutError('REPO_NOT_FOUND', `repository ${this.url} cannot be reached`, t);
    }
    return new CheckoutError('GIT_FAILED', `${what} exited ${r.code}`, t);
  }
}

/** The git subcommand of an argv (after global options such as `-C dir`). */
function subcommand(args: string[]): string {
  for (let i = 0; i < args.length; i++) {
    if (args[i] === '-C' || args[i] === '-c') i++;
    else return args[i]!;
  }
  return '';
}

/** `scheme://host[:port]` of an http(s) URL, or undefined for other transports. */
function httpOrigin(url: string): string | undefined {
  try {
    const u = new URL(url);
    return u.protocol === 'http:' || u.protocol === 'https:' ? `${u.protocol}//${u.host}` : undefined;
  } catch {
    return undefined;
  }
}
