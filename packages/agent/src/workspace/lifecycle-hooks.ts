/**
 * devcontainer-style lifecycle commands (onCreateCommand, updateContentCommand, postStartCommand …)
 * run inside a running box through the driver's exec, so they see exactly what a user session sees.
 * A string runs through `/bin/sh -c`, an array is exec form, an object runs each named command in
 * parallel (as the devcontainer CLI does) and fails if any of them fails.
 */
import type { ExecProcess, RuntimeDriver } from '../runtime/runtime-driver.js';

/** A lifecycle command in one of the devcontainer forms. */
export type LifecycleCommand = string | string[] | { [name: string]: string | string[] };

/** One line of hook output. */
export interface HookOutputLine {
  /** Hook name (`onCreate`, `updateContent`, …). */
  hook: string;
  /** The parallel command's name in object form, absent otherwise. */
  command?: string;
  /** Which stream of the box process the line came from. */
  stream: 'stdout' | 'stderr';
  /** The line, without its newline. */
  line: string;
}

/** How to run one hook. */
export interface HookRun {
  /** Hook name, carried by output lines and errors. */
  name: string;
  /** The command. */
  command: LifecycleCommand;
  /** Extra environment, merged over the box's. */
  env?: Record<string, string>;
  /** Working directory in the box (default `/workspace/<repoName>` with a repo, else /workspace). */
  cwd?: string;
  /** Directory name of the box's repository under /workspace, when it has one. */
  repoName?: string;
  /** Output lines as they come. */
  onLine?: (line: HookOutputLine) => void;
  /** Output kept for the result and errors (the tail; default 64 KiB). */
  maxOutputBytes?: number;
  /** Kills the hook's processes after this long (default 30 minutes). */
  timeoutMs?: number;
}

/** A hook that completed. */
export interface HookResult {
  /** Hook name. */
  name: string;
  /** The tail of the output (object form: every command's lines, prefixed with its name). */
  output: string;
  /** Wall time of the hook. */
  durationMs: number;
}

/** A hook that exited non-zero (or could not run, or timed out). */
export class HookFailedError extends Error {
  /** Stable error code. */
  readonly code = 'HOOK_FAILED';
  constructor(
    /** Hook name (`onCreate`, …). */
    readonly hookName: string,
    /** Exit code of the failing command (128+signal when killed, 124-style timeouts included). */
    readonly exitCode: number,
    /** The last lines of output (about 20). */
    readonly logTail: string[],
    /** The parallel command's name in object form. */
    readonly commandName?: string,
    /** Whether the hook was killed for running past its timeout. */
    readonly timedOut = false,
  ) {
    const what = commandName ? `${hookName} (${commandName})` : hookName;
    super(`${what} ${timedOut ? 'timed out' : `exited ${exitCode}`}${logTail.length ? `:\n${logTail.join('\n')}` : ''}`);
  }
}

const TAIL_LINES = 20;
/** A line longer than this is split, so one newline-free stream cannot grow memory. */
const MAX_LINE = 8192;

/** Runs a lifecycle hook in a running box; resolves when it succeeded, throws {@link HookFailedError} otherwise. */
export async function runHook(driver: Pick<RuntimeDriver, 'exec'>, boxId: string, hook: HookRun): Promise<HookResult> {
  const t0 = performance.now();
  const cwd = hook.cwd ?? (hook.repoName ? `/workspace/${hook.repoName}` : '/workspace');
  const output = new OutputTail(hook.maxOutputBytes ?? 64 * 1024);
  const timeoutMs = hook.timeoutMs ?? 30 * 60_000;
  const { command } = hook;
  const units: Array<{ name?: string; argv: string[] }> =
    typeof command === 'string'
      ? [{ argv: ['/bin/sh', '-c', command] }]
      : Array.isArray(command)
        ? [{ argv: command }]
        : Object.entries(command).map(([name, c]) => ({ name, argv: typeof c === 'string' ? ['/bin/sh', '-c', c] : c }));
  for (const u of units) {
    if (u.argv.length === 0) throw new HookFailedError(hook.name, 127, ['empty command'], u.name);
  }
  const results = await Promise.all(
    units.map(async (u) => {
      const tail = new OutputTail(hook.maxOutputBytes ?? 64 * 1024);
      const emit = (stream: 'stdout' | 'stderr', line: string) => {
        tail.push(line);
        output.push(u.name ? `[${u.name}] ${line}` : line);
        hook.onLine?.({ hook: hook.name, command: u.name, stream, line });
      };
      let proc: ExecProcess;
      try {
        proc = await driver.exec(boxId, { argv: u.argv, env: hook.env, cwd });
      } catch (err) {
        return { unit: u, code: 127, tail: [`cannot start: ${(err as Error).message}`], timedOut: false };
      }
      proc.stdin.end();
      const ended = Promise.all([pumpLines(proc.stdout, (l) => emit('stdout', l)), pumpLines(proc.stderr, (l) => emit('stderr', l))]);
      let timedOut = false;
      const timer = setTimeout(() => {
        timedOut = true;
        proc.kill('SIGKILL');
      }, timeoutMs);
      const code = await proc.exited;
      clearTimeout(timer);
      // A background process the hook started may hold the pipes open: do not wait for it long.
      await Promise.race([ended, new Promise((r) => setTimeout(r, 200))]);
      return { unit: u, code, tail: tail.lines(TAIL_LINES), timedOut };
    }),
  );
  const failed = results.find((r) => r.code !== 0 || r.timedOut);
  if (failed) throw new HookFailedError(hook.name, failed.code, failed.tail, failed.unit.name, failed.timedOut);
  return { name: hook.name, output: output.text(), durationMs: performance.now() - t0 };
}

/** Splits a stream into lines (a final line without newline included); resolves when it ends. */
function pumpLines(stream: NodeJS.ReadableStream, onLine: (line: string) => void): Promise<void> {
  return new Promise((resolve) => {
    let partial = '';
    stream.setEncoding('utf8');
    stream.on('data', (chunk: string) => {
      const parts = (partial + chunk).split('\n');
      partial = parts.pop() ?? '';
      for (const p of parts) onLine(p.replace(/\r$/, ''));
      while (partial.length > MAX_LINE) {
        onLine(partial.slice(0, MAX_LINE));
        partial = partial.slice(MAX_LINE);
      }
    });
    const done = () => {
      if (partial) onLine(partial);
      partial = '';
      resolve();
    };
    stream.on('end', done);
    stream.on('close', done);
    stream.on('error', done);
  });
}

/** The most recent lines within a byte budget. */
export class OutputTail {
  private readonly buf: string[] = [];
  private bytes = 0;

  constructor(private readonly maxBytes: number) {}

  /** Adds a line, dropping the oldest ones beyond the budget. */
  push(line: string): void {
    this.buf.push(line);
    this.bytes += line.length + 1;
    while (this.bytes > this.maxBytes && this.buf.length > 1) this.bytes -= this.buf.shift()!.length + 1;
  }

  /** The last `n` lines (all when omitted). */
  lines(n?: number): string[] {
    return n === undefined ? [...this.buf] : this.buf.slice(-n);
  }

  /** The kept lines as one text. */
  text(): string {
    return this.buf.length ? `${this.buf.join('\n')}\n` : '';
  }
}
