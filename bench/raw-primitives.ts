/**
 * Raw baselines for docs/benchmarks.md: the host primitives a sandbox box start and a pause are
 * made of, driven directly (no Devyard code), on the same machine as Devyard's own figures.
 *
 * - rawCreateExec(rootfs): overlay mount + netns + veth on a bridge + `crun run` of `true` with the
 *   same namespaces (user, pid, mount, uts, ipc, joined netns) and limits as a box. `rootfs` must be
 *   owned by host uid 100000 (the tiny image from the built-in image store is).
 * - rawFreezer(): FROZEN / THAWED writes to a v1 freezer cgroup holding one process.
 * - rawCleanup(): removes whatever an interrupted run left (bridge, cgroups, temp dirs).
 * Root only; hybrid cgroup hosts get the `umount /sys/fs/cgroup/unified` trick crun needs.
 */
import { execFile, spawn } from 'node:child_process';
import { existsSync } from 'node:fs';
import { chmod, chown, mkdir, mkdtemp, readFile, rm, rmdir, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';

const run = promisify(execFile);
const BRIDGE = 'dybench0';
const FREEZER = '/sys/fs/cgroup/freezer/devyard-bench';
const CGROUP_PARENT = 'devyard-bench';

async function sh(cmd: string, args: string[], input?: string): Promise<void> {
  await new Promise<void>((resolve, reject) => {
    const child = spawn(cmd, args, { stdio: ['pipe', 'ignore', 'pipe'] });
    let err = '';
    child.stderr.on('data', (d: Buffer) => (err += d.toString()));
    child.on('error', reject);
    child.on('close', (code) => (code === 0 ? resolve() : reject(new Error(`${cmd} ${args.join(' ')}: ${code} ${err}`))));
    child.stdin.end(input ?? '');
  });
}

function ociConfig(rootfs: string, netns: string): object {
  const caps = ['CAP_CHOWN', 'CAP_DAC_OVERRIDE', 'CAP_FSETID', 'CAP_FOWNER', 'CAP_SETGID', 'CAP_SETUID', 'CAP_KILL'];
  return {
    ociVersion: '1.0.0',
    process: {
      terminal: false,
      user: { uid: 0, gid: 0 },
      args: ['/bin/true'],
      env: ['PATH=/bin:/usr/bin'],
      cwd: '/',
      capabilities: { bounding: caps, effective: caps, permitted: caps },
      noNewPrivileges: true,
    },
    root: { path: rootfs, readonly: false },
    hostname: 'raw',
    mounts: [
      { destination: '/proc', type: 'proc', source: 'proc' },
      { destination: '/dev', type: 'tmpfs', source: 'tmpfs', options: ['nosuid', 'mode=755', 'size=65536k'] },
      { destination: '/sys', type: 'bind', source: '/sys', options: ['rbind', 'ro', 'nosuid', 'noexec', 'nodev'] },
    ],
    linux: {
      uidMappings: [{ containerID: 0, hostID: 100000, size: 65536 }],
      gidMappings: [{ containerID: 0, hostID: 100000, size: 65536 }],
      namespaces: [{ type: 'pid' }, { type: 'ipc' }, { type: 'uts' }, { type: 'mount' }, { type: 'user' }, { type: 'network', path: netns }],
      cgroupsPath: `/${CGROUP_PARENT}/raw`,
      resources: {
        memory: { limit: 268435456 },
        pids: { limit: 256 },
        cpu: { quota: 100000, period: 100000 },
      },
    },
  };
}

/** ms for overlay mount + netns + veth + `crun run true`, measured once (call repeatedly for a median). */
export async function rawCreateExec(rootfs: string): Promise<number> {
  if (!existsSync(`/sys/class/net/${BRIDGE}`)) {
    await sh('ip', ['-batch', '-'], `link add ${BRIDGE} type bridge\naddr add 10.250.0.1/16 dev ${BRIDGE}\nlink set ${BRIDGE} up\n`);
  }
  const dir = await mkdtemp(join(tmpdir(), 'dy-raw-'));
  await chmod(dir, 0o711);
  for (const d of ['upper', 'work', 'merged']) await mkdir(join(dir, d));
  await chown(join(dir, 'upper'), 100000, 100000);
  const id = `raw${process.pid}${Math.random().toString(36).slice(2, 6)}`;
  const ns = `dyraw-${id}`;
  const veth = `dr${id.slice(-10)}`;
  await writeFile(join(dir, 'config.json'), JSON.stringify(ociConfig(join(dir, 'merged'), `/run/netns/${ns}`)));
  const hybrid = !existsSync('/sys/fs/cgroup/cgroup.controllers') && existsSync('/sys/fs/cgroup/unified/cgroup.controllers');
  const t0 = performance.now();
  try {
    await sh('ip', ['-batch', '-'], `netns add ${ns}\nlink add ${veth} type veth peer name eth0 netns ${ns}\nlink set ${veth} master ${BRIDGE}\nlink set ${veth} up\n`);
    await sh('ip', ['-n', ns, '-batch', '-'], `link set lo up\naddr add 10.250.0.2/16 dev eth0\nlink set eth0 up\nroute add default via 10.250.0.1\n`);
    await sh('unshare', [
      '-m',
      '--propagation',
      'private',
      'sh',
      '-c',
      `set -e\n${hybrid ? 'umount /sys/fs/cgroup/unified\n' : ''}mount -t overlay overlay -o "lowerdir=$1,upperdir=$2/upper,workdir=$2/work" "$2/merged"\nexec crun run -b "$2" "$3"`,
      'sh',
      rootfs,
      dir,
      id,
    ]);
    return performance.now() - t0;
  } finally {
    await run('crun', ['delete', '-f', id]).catch(() => {});
    await run('ip', ['netns', 'del', ns]).catch(() => {});
    await rm(dir, { recursive: true, force: true });
  }
}

/** ms of a raw FROZEN write (until the state reads FROZEN) and of a THAWED write, on a v1 freezer cgroup. */
export async function rawFreezer(): Promise<{ freezeMs: number; thawMs: number }> {
  const cg = join(FREEZER, `f${process.pid}`);
  await mkdir(cg, { recursive: true });
  const child = spawn('sleep', ['60'], { stdio: 'ignore' });
  try {
    await writeFile(join(cg, 'cgroup.procs'), String(child.pid));
    const state = join(cg, 'freezer.state');
    const t0 = performance.now();
    await writeFile(state, 'FROZEN');
    while ((await readFile(state, 'utf8')).trim() !== 'FROZEN') await writeFile(state, 'FROZEN');
    const t1 = performance.now();
    await writeFile(state, 'THAWED');
    const t2 = performance.now();
    return { freezeMs: t1 - t0, thawMs: t2 - t1 };
  } finally {
    child.kill('SIGKILL');
    await new Promise((r) => child.once('exit', r));
    await rmdir(cg).catch(() => {});
  }
}

/** Removes the bench bridge, cgroups and temp dirs. */
export async function rawCleanup(): Promise<void> {
  if (existsSync(`/sys/class/net/${BRIDGE}`)) await run('ip', ['link', 'del', BRIDGE]).catch(() => {});
  await rmdir(FREEZER).catch(() => {});
  for (const ctrl of ['blkio', 'cpu', 'cpuacct', 'cpuset', 'devices', 'freezer', 'memory', 'pids', 'systemd']) {
    await rmdir(`/sys/fs/cgroup/${ctrl}/${CGROUP_PARENT}/raw`).catch(() => {});
    await rmdir(`/sys/fs/cgroup/${ctrl}/${CGROUP_PARENT}`).catch(() => {});
  }
  await rmdir(`/sys/fs/cgroup/${CGROUP_PARENT}`).catch(() => {});
}

/** Median of `n` runs of `fn`. */
export async function median(n: number, fn: () => Promise<number>): Promise<number> {
  const xs: number[] = [];
  for (let i = 0; i < n; i++) xs.push(await fn());
  xs.sort((a, b) => a - b);
  return xs[Math.floor(xs.length / 2)]!;
}
