/**
 * The crun command line. Commands that touch cgroups (run, delete, update) run in a private mount
 * namespace (`unshare -m`): on a hybrid host the empty cgroup2 mount at /sys/fs/cgroup/unified is
 * removed there, because crun 1.8 refuses hybrid mode. The same throwaway namespace also holds the
 * box's overlay and sysfs mounts, so they never appear in the host's mount table and vanish with
 * the box's last process (nothing to unmount or to leak after an agent crash).
 * A fresh `unshare -m` per call costs ~1 ms here, no more than entering a persistent namespace,
 * and a persistent one would not see mounts made later on the host (the host root is private).
 */
import { readFile } from 'node:fs/promises';
import { runHostCommand, runHostCommandRaw, type HostCommandResult } from '../../network/host-command-runner.js';
import type { CgroupMode } from './cgroup-layout.js';

/** A container as crun reports it. */
export interface CrunContainer {
  /** Container id (the box id). */
  id: string;
  /** Host pid of the init process (0 when stopped). */
  pid: number;
  /** crun's status: created, running, stopped, paused. */
  status: string;
  /** Bundle directory (the box directory). */
  bundle: string;
}

/** One overlay mount: `lower` may be a colon-separated stack, topmost first. */
export interface OverlayMount {
  /** Lower directory or colon-separated lower directories, topmost first. */
  lower: string;
  /** Upper directory (the writable layer). */
  upper: string;
  /** Overlay work directory, on the same filesystem as `upper`. */
  work: string;
  /** Mount point. */
  target: string;
}

/**
 * Idmapped bind mounts made first (the overlays' lower layers): each source, stored in the image id
 * range, shows at its target as owned by the box's range.
 */
export interface IdmappedMounts {
  /** The devyard-idmap-mount helper. */
  helper: string;
  /** First on-disk id mapped (the image range). */
  from: number;
  /** First id it shows as (the box's range). */
  to: number;
  /** Number of ids mapped. */
  count: number;
  /** Source directory → mount point. */
  mounts: Array<{ source: string; target: string }>;
}

/** Mounts made in the private namespace right before `crun run`. */
export interface RunMounts {
  /** Lower layers as the box's id range sees them; mounted before the overlays that stack them. */
  idmapped?: IdmappedMounts;
  /** The box's root overlay. */
  overlay: OverlayMount;
  /** Further overlays (a copy-on-write /workspace), mounted after the root one and bound by crun. */
  overlays?: OverlayMount[];
  /** sysfs made from inside the box's network namespace (so /sys/class/net shows the box's). */
  sysfs: { netnsPath: string; target: string };
}

/** Thin wrapper around the crun binary. */
export class CrunCli {
  /** crun's state directory. */
  readonly stateRoot: string;
  private readonly prelude: string;

  constructor(
    private readonly mode: CgroupMode,
    opts: { stateRoot?: string; crunPath?: string } = {},
  ) {
    this.stateRoot = opts.stateRoot ?? '/run/crun';
    this.crun = opts.crunPath ?? 'crun';
    this.prelude = mode === 'hybrid' ? 'umount /sys/fs/cgroup/unified || exit 97\n' : '';
  }

  private readonly crun: string;

  private base(): string[] {
    return this.stateRoot === '/run/crun' ? [this.crun] : [this.crun, '--root', this.stateRoot];
  }

  /** Runs a crun subcommand inside a private mount namespace fit for crun's cgroup handling. */
  private inNamespace(script: string, args: string[]): Promise<HostCommandResult> {
    return runHostCommandRaw(['unshare', '-m', '--propagation', 'private', 'sh', '-c', `set -e\n${this.prelude}${script}`, 'sh', ...args]);
  }

  /**
   * Mounts the box's root and sysfs, then `crun run -d`: crun returns once init runs, and the box
   * outlives the agent. Init's stdio goes to `logFile` (it must not hold our pipes open).
   */
  async runDetached(id: string, bundle: string, mounts: RunMounts, logFile: string): Promise<void> {
    const { overlay, sysfs } = mounts;
    const idm = mounts.idmapped;
    // Idmapped lowers, then overlays, as groups of positional arguments, so any number of them fits.
    const script =
      'bundle=$1 id=$2 log=$3 netns=$4 sys=$5 helper=$6 from=$7 to=$8 count=$9 n=${10}; shift 10\n' +
      'while [ "$n" -gt 0 ]; do "$helper" "$from" "$to" "$count" "$1" "$2"; shift 2; n=$((n - 1)); done\n' +
      'while [ $# -gt 0 ]; do mount -t overlay overlay -o "lowerdir=$1,upperdir=$2,workdir=$3" "$4"; shift 4; done\n' +
      'nsenter --net="$netns" mount -t sysfs -o ro,nosuid,nodev,noexec sysfs "$sys"\n' +
      `exec ${this.base().join(' ')} run -d -b "$bundle" "$id" </dev/null >"$log" 2>&1\n`;
    const r = await this.inNamespace(script, [
      bundle,
      id,
      logFile,
      sysfs.netnsPath,
      sysfs.target,
      idm?.helper ?? '',
      String(idm?.from ?? 0),
      String(idm?.to ?? 0),
      String(idm?.count ?? 0),
      String(idm?.mounts.length ?? 0),
      ...(idm?.mounts ?? []).flatMap((m) => [m.source, m.target]),
      ...[overlay, ...(mounts.overlays ?? [])].flatMap((o) => [o.lower, o.upper, o.work, o.target]),
    ]);
    if (r.code !== 0) {
      let log = '';
      try {
        log = (await readFile(logFile, 'utf8')).trim();
      } catch {
        log = '';
      }
      throw new Error(`crun run ${id} failed (${r.code}): ${r.stderr.trim()} ${log}`.trim());
    }
  }

  /** `crun delete -f`; true when something was deleted. */
  async delete(id: string): Promise<boolean> {
    const r = await this.inNamespace(`exec ${this.base().join(' ')} delete -f "$1"`, [id]);
    return r.code === 0;
  }

  /** Changes the limits of a running container. */
  async updateResources(id: string, args: string[]): Promise<void> {
    const r = await this.inNamespace(`exec ${this.base().join(' ')} update "$@"`, [...args, id]);
    if (r.code !== 0) throw new Error(`crun update ${id}: ${r.stderr.trim()}`);
  }

  /** State of one container, or null when crun has none. */
  async state(id: string): Promise<CrunContainer | null> {
    const fast = await this.stateFromFiles(id);
    if (fast !== undefined) return fast;
    // host-programs: crun
    const r = await runHostCommandRaw([...this.base(), 'state', id]);
    if (r.code !== 0) return null;
    const s = JSON.parse(r.stdout) as { id: string; pid?: number; status: string; bundle: string };
    return { id: s.id, pid: s.pid ?? 0, status: s.status, bundle: s.bundle };
  }

  /**
   * The container's state from crun's own status file and /proc, without spawning `crun state`
   * (10–15 ms a call here, and the agent inspects every box on every pass). The init process is
   * alive iff /proc/<pid>/stat exists, is not a zombie, and has the start time crun recorded (so a
   * reused pid is not mistaken for the box). Paused is left to the caller's freezer check.
   * Returns undefined when the file cannot be interpreted: the caller then asks crun.
   */
  private async stateFromFiles(id: string): Promise<CrunContainer | null | undefined> {
    let status: { pid?: number; 'process-start-time'?: number; bundle?: string };
    try {
      status = JSON.parse(await readFile(`${this.stateRoot}/${id}/status`, 'utf8'));
    } catch (e) {
      return (e as NodeJS.ErrnoException).code === 'ENOENT' ? null : undefined;
    }
    if (typeof status.pid !== 'number' || typeof status['process-start-time'] !== 'number' || typeof status.bundle !== 'string') return undefined;
    let alive = false;
    try {
      const stat = await readFile(`/proc/${status.pid}/stat`, 'utf8');
      // Fields after the parenthesised command: [0] is the state, [19] the start time (field 22).
      const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
      alive = fields[0] !== 'Z' && Number(fields[19]) === status['process-start-time'];
    } catch {}
    return { id, pid: alive ? status.pid : 0, status: alive ? 'running' : 'stopped', bundle: status.bundle };
  }

  /** Every container in crun's state directory. */
  async list(): Promise<CrunContainer[]> {
    // host-programs: crun
    const out = await runHostCommand([...this.base(), 'list', '--format', 'json']);
    const items = JSON.parse(out.trim() || '[]') as Array<{ id: string; pid?: number; status: string; bundle: string }>;
    return items.map((s) => ({ id: s.id, pid: s.pid ?? 0, status: s.status, bundle: s.bundle }));
  }

  /** argv of `crun exec` for a process in a container (stdio inherited from the caller). */
  execArgv(id: string, opts: { cwd: string; env: string[]; pidFile: string; argv: string[] }): string[] {
    // crun exec takes capabilities and seccomp from the container, but not no_new_privs.
    const args = [...this.base(), 'exec', '--no-new-privs', '--cwd', opts.cwd, '--pid-file', opts.pidFile];
    for (const e of opts.env) args.push('--env', e);
    args.push(id, ...opts.argv);
    return args;
  }
}
