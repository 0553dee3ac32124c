/**
 * `devyard login`: sign in through the server's OpenID provider in a browser and keep the token in
 * the CLI configuration (the file `devyard up` writes). The browser hands a one-time code back to a
 * listener on 127.0.0.1 that lives only for the sign-in, and the CLI redeems it for the token with
 * the PKCE verifier it started the sign-in with (so a code caught by another local process is
 * worth nothing); `--token` stores a token obtained another way (the sign-in page, `devyard tokens
 * create`).
 */
import { spawn } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import { accessSync, constants } from 'node:fs';
import { createServer, type IncomingMessage, type ServerResponse } from 'node:http';
import { delimiter, join } from 'node:path';
import type { Command } from 'commander';
import { ApiError } from '@devyard/sdk/api-error';
import { DevyardClient } from '@devyard/sdk/devyard-client';
import { CliUsageError, readConfig, writeConfig, type CliConfig } from '../cli-config.js';

/** How long the CLI waits for the browser (the server forgets a started sign-in after 10 minutes too). */
const WAIT_MS = 10 * 60_000;

const escapeHtml = (s: string) => s.replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);

function page(title: string, text: string): string {
  return `<!doctype html><html lang="en"><head><meta charset="utf-8"><meta name="referrer" content="no-referrer"><title>${escapeHtml(title)} · Devyard</title>
<style>body{font:16px/1.5 system-ui,sans-serif;max-width:40rem;margin:3rem auto;padding:0 1rem}</style></head>
<body><h1>${escapeHtml(title)}</h1><p>${escapeHtml(text)}</p></body></html>\n`;
}

function onPath(cmd: string): boolean {
  for (const dir of (process.env.PATH ?? '').split(delimiter)) {
    try {
      accessSync(join(dir, cmd), constants.X_OK);
      return true;
    } catch {}
  }
  return false;
}

/** Opens a URL in the desktop's browser when there is one to open; false when the user must. */
function openBrowser(url: string): boolean {
  if (!process.stdout.isTTY || !onPath('xdg-open') || (!process.env.DISPLAY && !process.env.WAYLAND_DISPLAY)) return false;
  try {
    const child = spawn('xdg-open', [url], { detached: true, stdio: 'ignore' });
    child.on('error', () => {});
    child.unref();
    return true;
  } catch {
    return false;
  }
}

function serverUrl(flag: string | undefined): string {
  const url = flag ?? process.env.DEVYARD_URL ?? readConfig().url;
  if (!url) throw new CliUsageError('which server? pass --server URL (or set DEVYARD_URL)');
  let parsed: URL;
  try {
    parsed = new URL(url);
  } catch {
    throw new CliUsageError(`--server expects a URL such as https://devyard.example.com, got "${url}"`);
  }
  if (parsed.protocol !== 'http:' && parsed.protocol !== 'https:') throw new CliUsageError(`--server expects an http(s) URL, got "${url}"`);
  return url.replace(/\/+$/, '');
}

/** Keeps the rest of the configuration (fields other commands may add) and replaces server and token. */
function store(url: string, token: string): string {
  return writeConfig({ ...(readConfig() as Partial<CliConfig>), url, token } as CliConfig);
}

async function whoAmI(url: string, token: string): Promise<string | undefined> {
  try {
    const me = await new DevyardClient({ url, token, timeoutMs: 10_000 }).getMe();
    return `${me.user} (${me.role} in ${me.org})`;
  } catch (e) {
    if (e instanceof ApiError && (e.status === 401 || e.status === 403)) throw new CliUsageError(`the server refused this token: ${e.message}`);
    return undefined;
  }
}

/** Waits on a one-off loopback listener for the redirect that carries the one-time code, and redeems it. */
async function browserLogin(server: string, o: { browser: boolean }): Promise<{ token: string; user: string }> {
  // An unguessable path: a web page that guesses the port still cannot plant a code of its choosing.
  const path = `/devyard-login/${randomBytes(16).toString('hex')}`;
  // PKCE (RFC 7636) between this CLI and the server: only the holder of the verifier redeems the code.
  const verifier = randomBytes(32).toString('base64url');
  const challenge = createHash('sha256').update(verifier).digest('base64url');
  let settle!: { resolve: (v: { code: string; user: string }) => void; reject: (e: Error) => void };
  const done = new Promise<{ code: string; user: string }>((resolve, reject) => (settle = { resolve, reject }));
  done.catch(() => {}); // a timeout or Ctrl-C before anyone awaits is still reported, by the await below
  const listener = createServer((req: IncomingMessage, res: ServerResponse) => {
    const url = new URL(req.url ?? '/', 'http://127.0.0.1');
    const answer = (status: number, title: string, text: string) => {
      res.writeHead(status, { 'content-type': 'text/html; charset=utf-8', 'cache-control': 'no-store', 'referrer-policy': 'no-referrer', connection: 'close' });
      res.end(page(title, text));
    };
    if (req.method !== 'GET' || url.pathname !== path) return answer(404, 'Not found', 'This is the Devyard CLI waiting for a sign-in.');
    const code = url.searchParams.get('code');
    const error = url.searchParams.get('error');
    if (code) {
      const user = url.searchParams.get('user') ?? '';
      answer(200, 'Signed in to Devyard', `${user ? `Signed in as ${user}. ` : ''}The CLI is finishing the sign-in; you can close this tab.`);
      settle.resolve({ code, user });
    } else {
      const msg = error ? `${error}${url.searchParams.get('error_description') ? `: ${url.searchParams.get('error_description')}` : ''}` : 'no sign-in code in the answer';
      answer(400, 'Sign-in failed', `${msg}. Run devyard login again.`);
      settle.reject(new Error(`sign-in failed: ${msg}`));
    }
  });
  await new Promise<void>((resolve, reject) => listener.once('error', reject).listen(0, '127.0.0.1', () => resolve()));
  const port = (listener.address() as { port: number }).port;
  const loginUrl = `${server}/v1/auth/oidc/login?cli=${encodeURIComponent(`http://127.0.0.1:${port}${path}`)}&cli_challenge=${challenge}`;
  const timer = setTimeout(() => settle.reject(new Error('timed out waiting for the browser to finish signing in; run devyard login again')), WAIT_MS);
  const interrupt = () => settle.reject(new Error('sign-in cancelled'));
  process.once('SIGINT', interrupt);
  try {
    await preflight(server, loginUrl);
    const opened = o.browser && openBrowser(loginUrl);
    process.stdout.write(
      opened
        ? `Opened your browser to sign in to ${server}. If it did not open, visit:\n\n  ${loginUrl}\n\n`
        : `To sign in to ${server}, open this URL in a browser on this machine:\n\n  ${loginUrl}\n\n` +
            `(With the browser on another machine, open ${server}/v1/auth/oidc/login there and run the\n \`devyard login --server ${server} --token …\` command the page shows.)\n\n`,
    );
    process.stdout.write('Waiting for the sign-in to finish (Ctrl-C to cancel)…\n');
    const { code } = await done;
    try {
      const r = await new DevyardClient({ url: server, timeoutMs: 15_000 }).redeemOidcLogin(code, verifier);
      return { token: r.token, user: r.user };
    } catch (e) {
      throw new CliUsageError(`the server did not complete the sign-in: ${(e as Error).message}`);
    }
  } finally {
    clearTimeout(timer);
    process.off('SIGINT', interrupt);
    listener.closeAllConnections?.();
    listener.close();
  }
}

/**
 * Checks that the server offers single sign-on before sending anyone to a browser; the sign-in it
 * starts here is never finished and expires on the server.
 */
async function preflight(server: string, loginUrl: string): Promise<void> {
  let res: Response;
  try {
    res = await fetch(loginUrl, { redirect: 'manual', headers: { accept: 'application/json' }, signal: AbortSignal.timeout(15_000) });
  } catch (e) {
    throw new CliUsageError(`cannot reach the Devyard server at ${server} (${(e as { cause?: { code?: string } }).cause?.code ?? (e as Error).message})`);
  }
  if (res.status === 302 || res.status === 303) return;
  let detail = res.statusText;
  try {
    detail = ((await res.json()) as { detail?: string }).detail ?? detail;
  } catch {}
  if (res.status === 404) throw new CliUsageError(`${server} does not offer single sign-on (${detail}); ask an admin for a token and run devyard login --token TOKEN`);
  throw new CliUsageError(`${server} cannot start a sign-in: ${detail}`);
}

export function registerLoginCommands(program: Command): void {
  program
    .command('login')
    .description("sign in through the server's identity provider (browser) and save the token in the CLI configuration")
    .option('--server <url>', 'Devyard server URL (default: DEVYARD_URL, else the configured server)')
    .option('--no-browser', 'do not open a browser: print the URL to open instead')
    .option('--token <token>', 'store this token instead of signing in (from the sign-in page or `devyard tokens create`)')
    .action(async (o: { server?: string; browser: boolean; token?: string }) => {
      const server = serverUrl(o.server);
      let token: string;
      if (o.token !== undefined) {
        token = o.token.trim();
        if (!/^dy_[A-Za-z0-9_-]+$/.test(token)) throw new CliUsageError('--token expects a Devyard token (dy_…)');
      } else {
        token = (await browserLogin(server, { browser: o.browser })).token;
      }
      const who = await whoAmI(server, token);
      const file = store(server, token);
      process.stdout.write(`Logged in to ${server}${who ? ` as ${who}` : ''}; saved in ${file}.\n`);
      if (!who) process.stderr.write(`warning: could not check the token with ${server} now; it is saved anyway\n`);
      if (process.env.DEVYARD_TOKEN) process.stderr.write('warning: DEVYARD_TOKEN is set in this shell and takes precedence over the saved token\n');
    });
}
