/**
 * `devyard up` runs its gateway as a child process (`devyard gateway`), as a separate deployment
 * would: the gateway is stateless, and SSH encryption then has a CPU thread of its own instead of
 * sharing the control plane's and the agent's. The child ends when `up` ends (its IPC channel
 * closes, even on kill -9) and is restarted if it crashes.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { createInterface } from 'node:readline';
import { cliScript } from './cli-script.js';

export interface GatewayChildOptions {
  serverUrl: string;
  tokenFile: string;
  host: string;
  sshPort: number;
  httpPort: number;
  /** `--public-url` of the gateway (default: its listen address). */
  publicUrl?: string;
  /** `--preview-domain`: a domain, null for none, undefined for the gateway's default. */
  previewDomain?: string | null;
  /** Receives the child's JSON log lines as they are. */
  logLine: (line: string) => void;
  /** Told when the child died and is being restarted. */
  onRestart: (why: string) => void;
  /** The `devyard` script to run (default: this one). */
  script?: string;
}

export interface GatewayChild {
  /** Where the gateway listens and its preview domain (null: none), from its "gateway ready" log line. */
  endpoint: { url: string; sshHost: string; sshPort: number; previewDomain: string | null };
  stop(): Promise<void>;
}

function launch(o: GatewayChildOptions, sshPort: number, httpPort: number): { proc: ChildProcess; ready: Promise<{ url: string; ssh: string; previews: string | null }> } {
  const args = [o.script ?? cliScript(), 'gateway', '--server', o.serverUrl, '--token-file', o.tokenFile, '--host', o.host, '--ssh-port', String(sshPort), '--http-port', String(httpPort)];
  if (o.publicUrl !== undefined) args.push('--public-url', o.publicUrl);
  if (o.previewDomain !== undefined) args.push('--preview-domain', o.previewDomain ?? 'none');
  const proc = spawn(process.execPath, args, { stdio: ['ignore', 'ignore', 'pipe', 'ipc'] });
  let last = '';
  const ready = new Promise<{ url: string; ssh: string; previews: string | null }>((resolve, reject) => {
    createInterface({ input: proc.stderr! }).on('line', (line) => {
      o.logLine(line);
      if (line.trim()) last = line.trim();
      try {
        const rec = JSON.parse(line) as { msg?: string; http?: string; ssh?: string; previews?: string | null };
        if (rec.msg === 'gateway ready' && rec.http && rec.ssh) resolve({ url: rec.http, ssh: rec.ssh, previews: rec.previews ?? null });
      } catch {
        // Not JSON: a one-line error the CLI printed before exiting.
      }
    });
    proc.once('exit', (code, signal) => reject(new Error(last.replace(/^devyard: /, '') || `the gateway exited (${signal ?? code})`)));
  });
  return { proc, ready };
}

export async function startGatewayChild(o: GatewayChildOptions): Promise<GatewayChild> {
  let stopping = false;
  let { proc, ready } = launch(o, o.sshPort, o.httpPort);
  const first = await ready;
  const [sshHost, sshPortText] = [first.ssh.slice(0, first.ssh.lastIndexOf(':')), first.ssh.slice(first.ssh.lastIndexOf(':') + 1)];
  const endpoint = { url: first.url, sshHost, sshPort: Number(sshPortText), previewDomain: first.previews };
  const httpPort = Number(new URL(first.url).port);
  const supervise = (p: ChildProcess) => {
    p.once('exit', (code, signal) => {
      if (stopping) return;
      o.onRestart(`the gateway process exited (${signal ?? code}); restarting it on the same ports`);
      setTimeout(() => {
        if (stopping) return;
        ({ proc, ready } = launch(o, endpoint.sshPort, httpPort));
        ready.catch((e: Error) => o.onRestart(`restarting the gateway failed: ${e.message}`));
        supervise(proc);
      }, 1000);
    });
  };
  supervise(proc);
  return {
    endpoint,
    async stop() {
      stopping = true;
      if (proc.exitCode !== null || proc.signalCode !== null) return;
      await new Promise<void>((r) => {
        const t = setTimeout(() => proc.kill('SIGKILL'), 5000);
        proc.once('exit', () => (clearTimeout(t), r()));
        proc.kill('SIGTERM');
      });
    },
  };
}
