/**
 * Sessions into boxes, gateway → node agent → box: command sessions (shell, exec, SFTP) over the
 * agent's exec WebSocket and TCP tunnels over its tunnel WebSocket, authorized with the agent
 * tokens of the cached route table. Also wakes a stopped or paused box before a session.
 */
import type { Duplex, Readable, Writable } from 'node:stream';
import type { RouteBox } from '@devyard/api/gateway-schemas';
import { execInBox, type ExecHandle } from '@devyard/sdk/exec-client';
import { openTunnel } from '@devyard/sdk/tunnel-client';
import type { ActivityTracker } from './activity-tracker.js';
import type { RouteCache } from './route-cache.js';

/** An error whose message is meant for the user's terminal as it is (one line, no stack). */
export class SessionError extends Error {}

/**
 * Runs the user's login shell (from the box's /etc/passwd), or a command through it the way sshd
 * does (`$SHELL -c CMD`): the gateway does not know the image, so the box resolves its own shell.
 */
export function shellArgv(command?: string): string[] {
  const script =
    'u=$(id -un 2>/dev/null || echo root); s=$(grep "^$u:" /etc/passwd 2>/dev/null | cut -d: -f7); ' +
    '[ -x "$s" ] || s=/bin/sh; export SHELL="$s"; ' +
    'if [ $# -gt 0 ]; then exec "$s" -c "$1"; fi; exec "$s" -l';
  return ['/bin/sh', '-c', script, 'sh', ...(command !== undefined ? [command] : [])];
}

/** Runs the SFTP server the agent mounts into every box (OpenSSH's, with its own libraries). */
export const SFTP_SERVER_ARGV = ['/.devyard/tools/bin/sftp-server'];

export interface CommandOptions {
  argv: string[];
  tty?: { cols: number; rows: number; term?: string };
  env?: Record<string, string>;
  cwd?: string;
  stdin: Readable | null;
  stdout: Writable;
  stderr: Writable;
}

const wsBase = (agentUrl: string) => agentUrl.replace(/^http/, 'ws').replace(/\/+$/, '');

export class BoxSessions {
  constructor(
    private readonly cache: RouteCache,
    private readonly activity: ActivityTracker,
    private readonly log: (msg: string, fields?: Record<string, unknown>) => void,
  ) {}

  /**
   * Answers the box once it runs. A stopped or paused box is started or resumed through the
   * server for a user who may (progress goes to `progress`); a box that cannot run is an error.
   */
  async ensureRunning(box: RouteBox, subject: string, progress: (line: string) => void, timeoutMs = 180_000): Promise<RouteBox> {
    const runs = (b: RouteBox) => b.phase === 'running' && b.desiredState === 'running' && !!b.agentToken;
    let cur = box;
    if (runs(cur)) return cur;
    // The cached table may be up to one sync interval old: look again before waking anything.
    await this.cache.refreshIfOlder(250);
    cur = this.cache.boxById(box.id) ?? cur;
    if (runs(cur)) return cur;
    if (cur.desiredState === 'stopped' || cur.desiredState === 'paused') {
      progress(`devyard: box "${cur.name}" is ${cur.phase}; ${cur.desiredState === 'paused' ? 'resuming' : 'starting'} it…`);
      try {
        await this.cache.wake(cur.id, subject);
      } catch (e) {
        const err = e as { status?: number; message: string };
        if (err.status === 403) throw new SessionError(`devyard: box "${cur.name}" is ${cur.phase} and you may not start it`);
        if (err.status === 404) throw new SessionError(`devyard: no box "${cur.name}"`);
        throw new SessionError(`devyard: box "${cur.name}" is ${cur.phase} and the server cannot start it now (${err.message})`);
      }
    }
    const deadline = Date.now() + timeoutMs;
    let lastPhase = '';
    for (;;) {
      await this.cache.refresh();
      const next = this.cache.boxById(cur.id);
      if (!next) throw new SessionError(`devyard: box "${cur.name}" is gone`);
      cur = next;
      if (cur.phase !== lastPhase && cur.phase !== 'running') progress(`devyard: ${cur.name}: ${cur.phase}`);
      lastPhase = cur.phase;
      if (cur.phase === 'running' && cur.agentToken) return cur;
      if (cur.phase === 'failed') throw new SessionError(`devyard: box "${cur.name}" failed to start; see \`devyard events ${cur.name}\``);
      if (cur.desiredState === 'deleted') throw new SessionError(`devyard: box "${cur.name}" is being deleted`);
      if (Date.now() > deadline) throw new SessionError(`devyard: box "${cur.name}" did not start within ${Math.round(timeoutMs / 1000)} s (phase ${cur.phase})`);
      await new Promise((r) => setTimeout(r, 300));
    }
  }

  /** Runs a command session in a running box; activity is counted per byte in either direction. */
  command(box: RouteBox, opts: CommandOptions): ExecHandle {
    if (!box.agentUrl || !box.agentToken) throw new SessionError(`devyard: box "${box.name}" is not running`);
    const done = this.activity.open(box.id);
    const handle = execInBox(
      { url: `${wsBase(box.agentUrl)}/v1/boxes/${box.id}/exec`, token: box.agentToken, expiresAt: '' },
      {
        argv: opts.argv,
        tty: !!opts.tty,
        cols: opts.tty?.cols,
        rows: opts.tty?.rows,
        env: { ...(opts.tty?.term ? { TERM: opts.tty.term } : {}), ...opts.env },
        cwd: opts.cwd,
        stdin: opts.stdin,
        stdout: opts.stdout,
        stderr: opts.stderr,
        onActivity: () => this.activity.touch(box.id),
      },
    );
    handle.exited.then(done, done);
    this.log('command session', { box: box.name, argv0: opts.argv[0], tty: !!opts.tty });
    return handle;
  }

  /**
   * Like `command`, for a box that may not run: wakes it first, and when the agent refuses because
   * the cached route table was stale (the box stopped or paused since the last sync), syncs, wakes
   * and tries once more. Clients send nothing before a session starts, so no input is lost.
   */
  commandWhenRunning(box: RouteBox, subject: string, opts: CommandOptions, progress: (line: string) => void): ExecHandle {
    let current: ExecHandle | undefined;
    let closed = false;
    const attempt = async (b: RouteBox, retry: boolean): Promise<number> => {
      const running = await this.ensureRunning(b, subject, progress);
      if (closed) return 255;
      current = this.command(running, opts);
      try {
        return await current.exited;
      } catch (e) {
        if (!retry || !/is (not running|paused)/.test((e as Error).message)) throw e;
        await this.cache.refresh();
        return attempt(this.cache.boxById(b.id) ?? b, false);
      }
    };
    return {
      exited: attempt(box, true),
      resize: (c, r) => current?.resize(c, r),
      close: () => {
        closed = true;
        current?.close();
      },
    };
  }

  /** Opens a TCP connection to 127.0.0.1:`port` inside a running box. */
  tunnel(box: RouteBox, port: number): Duplex {
    if (!box.agentUrl || !box.agentToken) throw new SessionError(`devyard: box "${box.name}" is not running`);
    const stream = openTunnel({ url: `${wsBase(box.agentUrl)}/v1/boxes/${box.id}/tcp?port=${port}`, token: box.agentToken });
    const done = this.activity.open(box.id);
    stream.on('data', () => this.activity.touch(box.id));
    stream.on('close', done);
    return stream;
  }
}
