/**
 * Runs host tools (ip, nft, crun, mount …) without a shell and reports failures with their stderr,
 * so callers see why a host operation failed instead of a bare exit code.
 */
import { spawn } from 'node:child_process';
import { explainSpawnError } from './host-program-missing.js';

/** Result of a finished host command. */
export interface HostCommandResult {
  /** Exit code (128+signal when the command was killed). */
  code: number;
  /** Captured standard output. */
  stdout: string;
  /** Captured standard error. */
  stderr: string;
}

/** A host command that exited with a non-zero status. */
export class HostCommandError extends Error {
  /** Error code for callers that map errors without parsing messages. */
  readonly code = 'HOST_COMMAND_FAILED';
  constructor(
    /** The command line that failed. */
    readonly argv: string[],
    /** What the command reported. */
    readonly result: HostCommandResult,
  ) {
    super(`${argv.join(' ')} exited ${result.code}: ${result.stderr.trim() || result.stdout.trim()}`);
  }
}

const SIGNALS: Record<string, number> = { SIGHUP: 1, SIGINT: 2, SIGQUIT: 3, SIGKILL: 9, SIGTERM: 15 };

/** Runs `argv` and resolves with its output whatever its exit status. */
export function runHostCommandRaw(argv: string[], opts: { input?: string; env?: NodeJS.ProcessEnv; cwd?: string } = {}): Promise<HostCommandResult> {
  return new Promise((resolve, reject) => {
    const [cmd, ...args] = argv;
    if (cmd === undefined) {
      reject(new Error('empty command'));
      return;
    }
    const child = spawn(cmd, args, { stdio: ['pipe', 'pipe', 'pipe'], env: opts.env ?? process.env, ...(opts.cwd ? { cwd: opts.cwd } : {}) });
    const out: Buffer[] = [];
    const err: Buffer[] = [];
    child.stdout.on('data', (b: Buffer) => out.push(b));
    child.stderr.on('data', (b: Buffer) => err.push(b));
    child.on('error', (e) => reject(explainSpawnError(cmd, e)));
    child.on('close', (code, signal) => {
      resolve({
        code: code ?? 128 + (signal ? (SIGNALS[signal] ?? 1) : 1),
        stdout: Buffer.concat(out).toString('utf8'),
        stderr: Buffer.concat(err).toString('utf8'),
      });
    });
    child.stdin.on('error', () => {});
    child.stdin.end(opts.input ?? '');
  });
}

/** Runs `argv` and rejects with a {@link HostCommandError} when it exits non-zero. */
export async function runHostCommand(argv: string[], opts: { input?: string; env?: NodeJS.ProcessEnv; cwd?: string } = {}): Promise<string> {
  const result = await runHostCommandRaw(argv, opts);
  if (result.code !== 0) throw new HostCommandError(argv, result);
  return result.stdout;
}
