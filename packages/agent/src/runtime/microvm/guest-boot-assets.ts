/**
 * What every microVM of a node boots from, built once per node and cached under `<dir>`:
 *   kernel/<release>/vmlinuz + modules/   Debian's linux-image-cloud-amd64, fetched with
 *                                          `apt-get download` and unpacked with `dpkg-deb -x`
 *   initramfs-<hash>.cpio                  busybox + the virtio modules + guest/init.sh + the
 *                                          guest agent (hash over all of them)
 *   tools-<hash>.ext4                      read-only disk mounted at /.devyard in every VM: the
 *                                          static busybox and the box tools bundle (SFTP, rsync),
 *                                          the same files the sandbox binds into its boxes
 * Everything is built next to its final name and renamed into place, so a crash leaves no half
 * file under a name that is used.
 */
import { createHash, randomBytes } from 'node:crypto';
import { existsSync } from 'node:fs';
import { chmod, copyFile, cp, mkdir, readdir, readFile, rename, rm, stat, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { runHostCommand } from '../../network/host-command-runner.js';
import { ensureGuestAgent } from './guest-agent-binary.js';


/** The Debian meta package whose dependency names the current cloud kernel. */
const KERNEL_META_PACKAGE = 'linux-image-cloud-amd64';

/**
 * The virtio modules the initramfs loads, in dependency order (the package has no modules.dep;
 * order from `modinfo -F depends`). microvm has no PCI: only the MMIO transport is needed.
 */
export const GUEST_MODULES = ['virtio_ring', 'virtio', 'virtio_mmio', 'virtio_blk', 'failover', 'net_failover', 'virtio_net', 'virtio_console'];

/** A guest kernel ready to boot. */
export interface GuestKernel {
  /** `uname -r` inside the guest. */
  release: string;
  /** The kernel image passed to `-kernel`. */
  vmlinuz: string;
  /** Directory holding the release's module tree (lib/modules/<release>). */
  modulesDir: string;
}

/** Everything a VM boots from. */
export interface GuestBootAssets {
  kernel: GuestKernel;
  /** Initramfs passed to `-initrd`. */
  initramfs: string;
  /** Read-only tools disk (busybox + box tools bundle). */
  toolsDisk: string;
}

/** Options of {@link ensureGuestBootAssets}. */
export interface GuestBootAssetsOptions {
  /** Cache directory (`<node data>/microvm/assets`). */
  dir: string;
  /** The host's static busybox. */
  busybox: string;
  /** The box tools bundle directory (see box-tools-bundle.ts). */
  toolsBundle: string;
  log?: (msg: string, fields?: object) => void;
}

const guestSource = (name: string) => new URL(`../../../guest/${name}`, import.meta.url);

/** Fetches (once) and returns the guest kernel; an offline node keeps using the one it has. */
export async function ensureGuestKernel(dir: string, log: (msg: string, fields?: object) => void = () => {}): Promise<GuestKernel> {
  const kernels = join(dir, 'kernel');
  await mkdir(kernels, { recursive: true });
  const cached = async (): Promise<GuestKernel | null> => {
    const releases = (await readdir(kernels)).filter((n) => !n.startsWith('.')).sort();
    const release = releases.at(-1);
    return release ? kernelAt(join(kernels, release), release) : null;
  };
  const have = await cached();
  if (have) return have;
  // The meta package depends on the versioned image package: download that one.
  // A fresh host may have no package lists yet: fetch them once and ask again.
  const depends = () => runHostCommand(['apt-cache', 'depends', KERNEL_META_PACKAGE]);
  const deps = await depends().catch(async () => {
    log('apt has no package lists yet: running apt-get update');
    await runHostCommand(['apt-get', 'update', '-qq']);
    return depends();
  });
  const pkg = /Depends:\s*(linux-image-\S+)/.exec(deps)?.[1];
  if (!pkg) throw new Error(`cannot find the kernel package behind ${KERNEL_META_PACKAGE} (apt-cache depends printed: ${deps.trim()})`);
  const tmp = join(kernels, `.fetch-${randomBytes(4).toString('hex')}`);
  await mkdir(tmp, { recursive: true });
  try {
    log('fetching the microVM guest kernel', { package: pkg });
    // apt's sandbox user cannot write a root-owned directory; the download itself is verified by apt.
    await runHostCommand(['apt-get', 'download', '-o', 'APT::Sandbox::User=root', pkg], { cwd: tmp });
    const deb = (await readdir(tmp)).find((n) => n.endsWith('.deb'));
    if (!deb) throw new Error(`apt-get download ${pkg} left no .deb`);
    await runHostCommand(['dpkg-deb', '-x', join(tmp, deb), join(tmp, 'x')]);
    const release = (await readdir(join(tmp, 'x/lib/modules')))[0];
    if (!release) throw new Error(`${deb} has no lib/modules`);
    const dest = join(tmp, release);
    await mkdir(dest);
    await rename(join(tmp, `x/boot/vmlinuz-${release}`), join(dest, 'vmlinuz'));
    await rename(join(tmp, 'x/lib/modules', release), join(dest, 'modules'));
    await rename(dest, join(kernels, release)).catch(async (e: NodeJS.ErrnoException) => {
      if (e.code !== 'ENOTEMPTY' && e.code !== 'EEXIST') throw e; // another process won the race
    });
    return kernelAt(join(kernels, release), release);
  } finally {
    await rm(tmp, { recursive: true, force: true });
  }
}

function kernelAt(dir: string, release: string): GuestKernel {
  return { release, vmlinuz: join(dir, 'vmlinuz'), modulesDir: join(dir, 'modules') };
}

/** Builds (once per input) the initramfs and the tools disk, fetching the kernel first. */
export async function ensureGuestBootAssets(opts: GuestBootAssetsOptions): Promise<GuestBootAssets> {
  const log = opts.log ?? (() => {});
  await mkdir(opts.dir, { recursive: true });
  const kernel = await ensureGuestKernel(opts.dir, log);
  const agent = await ensureGuestAgent(join(opts.dir, 'agent'));
  const initramfs = await ensureInitramfs(opts.dir, kernel, agent, opts.busybox);
  const toolsDisk = await ensureToolsDisk(opts.dir, opts.busybox, opts.toolsBundle);
  return { kernel, initramfs, toolsDisk };
}

async function moduleFile(modulesDir: string, name: string): Promise<string> {
  // Module files are named with underscores or dashes; search the tree once per name.
  const stdout = await runHostCommand(['find', modulesDir, '-name', `${name}.ko`, '-o', '-name', `${name.replace(/_/g, '-')}.ko`]);
  const file = stdout.split('\n').find(Boolean);
  if (!file) throw new Error(`kernel module ${name} not found under ${modulesDir}`);
  return file;
}

async function ensureInitramfs(dir: string, kernel: GuestKernel, agent: string, busybox: string): Promise<string> {
  const init = await readFile(guestSource('init.sh'));
  const modules = await Promise.all(GUEST_MODULES.map((m) => moduleFile(kernel.modulesDir, m)));
  const h = createHash('sha256').update(init).update(kernel.release).update(await readFile(agent)).update(await readFile(busybox));
  const out = join(dir, `initramfs-${h.digest('hex').slice(0, 16)}.cpio`);
  if (existsSync(out)) return out;
  const stage = join(dir, `.initramfs-${randomBytes(4).toString('hex')}`);
  // Several agents of one host share the cache: each builds under its own temporary name.
  const tmp = `${stage}.cpio`;
  try {
    for (const d of ['bin', 'lib/modules', 'proc', 'sys', 'dev', 'newroot', 'mnt/volume', 'etc', 'tmp']) await mkdir(join(stage, d), { recursive: true });
    await copyFile(busybox, join(stage, 'bin/busybox'));
    await copyFile(agent, join(stage, 'bin/devyard-guest-agent'));
    await writeFile(join(stage, 'init'), init);
    await chmod(join(stage, 'init'), 0o755);
    await chmod(join(stage, 'bin/busybox'), 0o755);
    await chmod(join(stage, 'bin/devyard-guest-agent'), 0o755);
    for (const [i, m] of modules.entries()) await copyFile(m, join(stage, 'lib/modules', `${GUEST_MODULES[i]}.ko`));
    // newc cpio, uncompressed: it is small (~4 MB) and TCG decompression would cost boot time.
    await runHostCommand(['sh', '-c', `cd "$1" && find . | "$2" cpio -o -H newc > "$3" 2>/dev/null`, 'sh', stage, busybox, tmp]);
    await rename(tmp, out);
    return out;
  } finally {
    await rm(stage, { recursive: true, force: true });
    await rm(tmp, { force: true });
  }
}

async function ensureToolsDisk(dir: string, busybox: string, bundle: string): Promise<string> {
  const stamp = await readFile(join(bundle, '.stamp'), 'utf8').catch(() => '');
  const bb = await stat(busybox);
  const h = createHash('sha256').update(stamp).update(`${busybox}:${bb.size}:${bb.mtimeMs}`);
  const out = join(dir, `tools-${h.digest('hex').slice(0, 16)}.ext4`);
  if (existsSync(out)) return out;
  const stage = join(dir, `.tools-${randomBytes(4).toString('hex')}`);
  const tmp = `${stage}.ext4`;
  try {
    await mkdir(stage);
    await copyFile(busybox, join(stage, 'busybox'));
    await chmod(join(stage, 'busybox'), 0o755);
    await cp(bundle, join(stage, 'tools'), { recursive: true, verbatimSymlinks: true });
    await runHostCommand(['truncate', '-s', '256M', tmp]);
    await runHostCommand(['mkfs.ext4', '-q', '-F', '-E', 'root_owner=0:0', '-d', stage, tmp]);
    await rename(tmp, out);
    return out;
  } finally {
    await rm(stage, { recursive: true, force: true });
    await rm(tmp, { force: true });
  }
}
