/**
 * Processes started in a box through `crun exec`. Without a tty the process gets pipes; with a tty
 * node-pty runs `crun exec` on a host pty and the box process inherits the pty's slave as its stdio
 * and controlling terminal (crun makes no terminal of its own), so resizing the master reaches it.
 */
import { spawn } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { rm } from 'node:fs/promises';
import { createRequire } from 'node:module';
import { constants } from 'node:os';
import { PassThrough, Writable } from 'node:stream';
import type { ExecProcess } from '../runtime-driver.js';

type PtyModule = typeof import('node-pty');
let ptyModule: PtyModule | undefined;
function loadPty(): PtyModule {
  // node-pty is a native CommonJS addon: load it lazily so pipe-only use never needs it.
  ptyModule ??= createRequire(import.meta.url)('node-pty') as PtyModule;
  return ptyModule;
}

function signalNumber(signal: NodeJS.Signals | null | number | undefined): number {
  if (typeof signal === 'number') return signal;
  if (!signal) return 0;
  return (constants.signals as Record<string, number>)[signal] ?? 1;
}

/** Reads the pid crun wrote for the box process, or undefined before it exists. */
function readPid(pidFile: string): number | undefined {
  try {
    const pid = Number(readFileSync(pidFile, 'utf8').trim());
    return Number.isInteger(pid) && pid > 0 ? pid : undefined;
  } catch {
    return undefined;
  }
}

/** Starts `argv` (a `crun exec` command line) with pipes. */
export function spawnPipeExec(argv: string[], pidFile: string): ExecProcess {
  const [cmd, ...args] = argv;
  const child = spawn(cmd!, args, { stdio: ['pipe', 'pipe', 'pipe'] });
  const exited = new Promise<number>((resolve) => {
    child.on('error', () => resolve(127));
    // 'exit', not 'close': background processes in the box may keep the pipes open for long.
    child.on('exit', (code, signal) => {
      void rm(pidFile, { force: true });
      resolve(code ?? 128 + signalNumber(signal));
    });
  });
  child.stdin.on('error', () => {});
  return {
    stdin: child.stdin,
    stdout: child.stdout,
    stderr: child.stderr,
    exited,
    resize() {},
    kill(signal: NodeJS.Signals = 'SIGTERM') {
      // Signal the process in the box, not crun (which does not forward signals).
      const pid = readPid(pidFile);
      try {
        if (pid !== undefined) process.kill(pid, signal);
        else child.kill(signal);
      } catch {
        // Already gone.
      }
    },
  };
}

/** Starts `argv` (a `crun exec` command line) on a new pseudo-terminal. */
export function spawnPtyExec(argv: string[], pidFile: string, size: { cols: number; rows: number }): ExecProcess {
  const [cmd, ...args] = argv;
  const term = loadPty().spawn(cmd!, args, {
    name: 'xterm-256color',
    cols: size.cols,
    rows: size.rows,
    cwd: '/',
    env: { PATH: process.env.PATH ?? '/usr/sbin:/usr/bin:/sbin:/bin' },
  });
  const stdout = new PassThrough();
  const stderr = new PassThrough();
  stderr.end();
  let done = false;
  term.onData((d) => stdout.write(d));
  const exited = new Promise<number>((resolve) => {
    term.onExit(({ exitCode, signal }) => {
      done = true;
      // Give the data handler the last chunk before ending the stream.
      setTimeout(() => stdout.end(), 20);
      void rm(pidFile, { force: true });
      resolve(signal ? 128 + signal : exitCode);
    });
  });
  const stdin = new Writable({
    write(chunk: Buffer | string, _enc, cb) {
      if (!done) term.write(typeof chunk === 'string' ? chunk : chunk.toString('utf8'));
      cb();
    },
  });
  return {
    stdin,
    stdout,
    stderr,
    exited,
    resize(cols: number, rows: number) {
      if (!done) term.resize(cols, rows);
    },
    kill(signal: NodeJS.Signals = 'SIGTERM') {
      const pid = readPid(pidFile);
      try {
        if (pid !== undefined) process.kill(pid, signal);
        else if (!done) term.kill(signal);
      } catch {
        // Already gone.
      }
    },
  };
}
