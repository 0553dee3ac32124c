/**
 * What a host needs before its first microVM, the same for every data dir of the host and so kept
 * in one shared directory (default /var/cache/devyard/microvm): the box tools bundle, the guest
 * kernel, initramfs and tools disk (guest-boot-assets.ts), the jailer every QEMU starts through
 * (vm-jail-binary.ts), QEMU's version and the accelerator
 * (KVM when a probe boot works, TCG otherwise). The driver prepares it at init; a test suite
 * prepares it once before its first test, so no test pays for a cold cache.
 */
import { readFileSync } from 'node:fs';
import { readFile, rename, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { ensureBoxToolsBundle } from '../box-tools-bundle.js';
import { ensureGuestBootAssets, type GuestBootAssets } from './guest-boot-assets.js';
import { probeKvm, qemuVersion, type Accel } from './qemu-command.js';
import { ensureVmJail } from './vm-jail-binary.js';

/** Where a host keeps its microVM assets unless told otherwise. */
export const DEFAULT_MICROVM_ASSETS_DIR = '/var/cache/devyard/microvm';

/** Options of {@link prepareMicrovmHost}. */
export interface MicrovmHostOptions {
  /** Shared assets directory (default {@link DEFAULT_MICROVM_ASSETS_DIR}). */
  assetsDir?: string;
  /** Static busybox of the host (initramfs and /.devyard/busybox). */
  busybox: string;
  /** Force an accelerator instead of probing (`DEVYARD_MICROVM_ACCEL`). */
  accel?: Accel;
  log?: (msg: string, fields?: object) => void;
}

/** A host ready to boot microVMs. */
export interface MicrovmHost {
  /** Kernel, initramfs and tools disk. */
  assets: GuestBootAssets;
  /** The jailer QEMU is started through (host/devyard-vm-jail.c). */
  jail: string;
  /** `qemu-system-x86_64 --version`, which snapshots must match. */
  qemuVersion: string;
  /** The accelerator VMs use, and why. */
  accel: { accel: Accel; reason: string };
}

/** Builds (or finds cached) everything microVMs of this host boot from, and picks the accelerator. */
export async function prepareMicrovmHost(opts: MicrovmHostOptions): Promise<MicrovmHost> {
  const dir = opts.assetsDir ?? DEFAULT_MICROVM_ASSETS_DIR;
  const bundle = await ensureBoxToolsBundle({ dir: join(dir, 'tools'), log: opts.log });
  const assets = await ensureGuestBootAssets({ dir, busybox: opts.busybox, toolsBundle: bundle.dir, log: opts.log });
  const jail = await ensureVmJail(join(dir, 'jail'));
  const qemu = await qemuVersion();
  const forced = opts.accel ?? (process.env.DEVYARD_MICROVM_ACCEL as Accel | undefined);
  if (forced === 'kvm' || forced === 'tcg') return { assets, jail, qemuVersion: qemu, accel: { accel: forced, reason: 'configured' } };
  const probe = await cachedKvmProbe(dir, assets, qemu);
  return { assets, jail, qemuVersion: qemu, accel: probe.usable ? { accel: 'kvm', reason: probe.reason } : { accel: 'tcg', reason: `${probe.reason}; using TCG` } };
}

/**
 * The KVM probe's answer, kept for the host's boot (same kernel, QEMU and guest kernel): a host
 * where KVM hangs would otherwise cost every agent start the probe's timeout.
 */
async function cachedKvmProbe(dir: string, assets: GuestBootAssets, qemu: string): Promise<{ usable: boolean; reason: string }> {
  const bootId = readFileSync('/proc/sys/kernel/random/boot_id', 'utf8').trim();
  const key = `${bootId}|${assets.kernel.release}|${qemu}`;
  const file = join(dir, 'kvm-probe.json');
  try {
    const c = JSON.parse(await readFile(file, 'utf8')) as { key: string; usable: boolean; reason: string };
    if (c.key === key) return { usable: c.usable, reason: `${c.reason} (probed earlier this boot)` };
  } catch {
    /* probe below */
  }
  const probe = await probeKvm({ kernel: assets.kernel.vmlinuz, initramfs: assets.initramfs, workDir: dir });
  await writeFile(`${file}.${process.pid}`, JSON.stringify({ key, ...probe }));
  await rename(`${file}.${process.pid}`, file);
  return probe;
}
