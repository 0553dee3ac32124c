/**
 * The QEMU command line of a box's microVM, and the probe that decides between KVM and TCG.
 *
 * Guest RAM is always a shared file (memory-backend-file, share=on): it is what makes the fast
 * pause path possible (the migration stream then skips RAM with `x-ignore-shared`), and the same
 * command line with `-incoming defer` restores a snapshot.
 */
import { spawn } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { readFile, rm } from 'node:fs/promises';
import { join } from 'node:path';
import { runHostCommand } from '../../network/host-command-runner.js';

/** Accelerator a VM runs under. */
export type Accel = 'kvm' | 'tcg';

/**
 * QEMU's seccomp filter for a VM: besides the default (no obsolete system calls), no privilege
 * changes, no new processes and no scheduler or resource-limit changes. Everything QEMU needs
 * is set up before it starts (the jail), and snapshots stream over unix sockets, not through a
 * spawned `exec:` command.
 */
export const QEMU_SANDBOX = 'on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny';

/** Everything that goes into one VM's command line. */
export interface QemuVmConfig {
  accel: Accel;
  vcpus: number;
  memoryMiB: number;
  kernel: string;
  initramfs: string;
  /** Kernel command line parameters for the initramfs (devyard.ip=…, …). */
  guestParams: Record<string, string>;
  /** Host TSC frequency in kHz: without it ~10 % of TCG boots hang calibrating against the PIT. */
  tscKhz: number;
  rootDisk: string;
  volumeDisk: string;
  toolsDisk: string;
  /** Host TAP device of the VM's NIC (none: no network). */
  tap?: string;
  mac: string;
  agentSocket: string;
  qmpSocket: string;
  memFile: string;
  pidFile: string;
  consoleLog: string;
  /** Start paused, waiting for `migrate-incoming` (snapshot restore). */
  incoming?: boolean;
  /**
   * The guest kernel zeroes memory as it frees it (`init_on_free=1`). It also zeroes all of the
   * VM's memory once at boot, which writes every page of the RAM file.
   */
  zeroFreedMemory?: boolean;
  /**
   * Run under {@link QEMU_SANDBOX}. QEMU then cannot daemonize itself (the filter denies its fork
   * and setsid): whoever starts it does that (the jail, devyard-vm-jail.c).
   */
  sandboxed?: boolean;
}

/** The argv (after the binary) of a VM. */
export function qemuArgs(c: QemuVmConfig): string[] {
  const cmdline = [
    'console=ttyS0',
    'quiet',
    'loglevel=3',
    `tsc_early_khz=${c.tscKhz}`,
    // A panic reboots at once, and -no-reboot turns that into QEMU exiting: the driver notices.
    'panic=-1',
    // Freed guest memory is zeroed: what an exited process held (a session's environment with the
    // box's secrets) does not live on in free pages, and so not in a RAM snapshot either.
    ...(c.zeroFreedMemory ? ['init_on_free=1'] : []),
    ...Object.entries(c.guestParams).map(([k, v]) => `${k}=${v}`),
  ].join(' ');
  return [
    '-M', `microvm,accel=${c.accel},memory-backend=mem`,
    '-cpu', c.accel === 'kvm' ? 'host' : 'max',
    '-smp', String(c.vcpus),
    '-m', `${c.memoryMiB}M`,
    '-object', `memory-backend-file,id=mem,size=${c.memoryMiB}M,mem-path=${c.memFile},share=on`,
    '-nodefaults', '-no-user-config', '-nographic', '-no-reboot',
    '-serial', `file:${c.consoleLog}`,
    '-kernel', c.kernel,
    '-initrd', c.initramfs,
    '-append', cmdline,
    '-drive', `id=root,file=${c.rootDisk},format=qcow2,if=none,cache=writeback,discard=unmap`,
    '-device', 'virtio-blk-device,drive=root,serial=root',
    '-drive', `id=volume,file=${c.volumeDisk},format=raw,if=none,cache=writeback,discard=unmap`,
    '-device', 'virtio-blk-device,drive=volume,serial=volume',
    '-drive', `id=tools,file=${c.toolsDisk},format=raw,if=none,readonly=on`,
    '-device', 'virtio-blk-device,drive=tools,serial=tools',
    ...(c.tap ? ['-netdev', `tap,id=net0,ifname=${c.tap},script=no,downscript=no`, '-device', `virtio-net-device,netdev=net0,mac=${c.mac}`] : []),
    '-device', 'virtio-serial-device',
    '-chardev', `socket,id=agent,path=${c.agentSocket},server=on,wait=off`,
    '-device', 'virtserialport,chardev=agent,name=devyard.agent',
    '-qmp', `unix:${c.qmpSocket},server=on,wait=off`,
    '-pidfile', c.pidFile,
    ...(c.sandboxed ? ['-sandbox', QEMU_SANDBOX] : ['-daemonize']),
    ...(c.incoming ? ['-S', '-incoming', 'defer'] : []),
  ];
}

/** The host's TSC frequency in kHz, from /proc/cpuinfo (0 when unknown). */
export function hostTscKhz(): number {
  try {
    const m = /cpu MHz\s*:\s*([\d.]+)/.exec(readFileSync('/proc/cpuinfo', 'utf8'));
    return m ? Math.round(Number(m[1]) * 1000) : 0;
  } catch {
    return 0;
  }
}

/** `qemu-system-x86_64 --version`'s version, recorded in snapshots (a restore needs the same QEMU). */
export async function qemuVersion(binary = 'qemu-system-x86_64'): Promise<string> {
  const out = await runHostCommand([binary, '--version']);
  return /version\s+(\S+)/.exec(out)?.[1] ?? out.trim();
}

/**
 * Whether KVM runs this kernel: a probe boot straight into the initramfs's busybox, which powers
 * the VM off. /dev/kvm may exist and still hang 64-bit guests (nested virtualization on some
 * clouds), so only a boot that finishes within the timeout counts.
 */
export async function probeKvm(opts: { kernel: string; initramfs: string; workDir: string; timeoutMs?: number }): Promise<{ usable: boolean; reason: string }> {
  try {
    await readFile('/dev/kvm').catch((e: NodeJS.ErrnoException) => {
      // Reading /dev/kvm fails with EINVAL when it is there and openable; ENOENT/EACCES are real.
      if (e.code !== 'EINVAL') throw e;
    });
  } catch (e) {
    return { usable: false, reason: `/dev/kvm: ${(e as NodeJS.ErrnoException).code}` };
  }
  const log = join(opts.workDir, `kvm-probe-${process.pid}.log`);
  const timeoutMs = opts.timeoutMs ?? 5000;
  const args = [
    '-M', 'microvm,accel=kvm', '-cpu', 'host', '-m', '128M', '-smp', '1',
    '-nodefaults', '-no-user-config', '-nographic', '-no-reboot',
    '-serial', `file:${log}`,
    '-kernel', opts.kernel, '-initrd', opts.initramfs,
    '-append', 'console=ttyS0 quiet panic=-1 rdinit=/bin/busybox -- poweroff -f',
  ];
  try {
    const result = await new Promise<{ code: number | null; timedOut: boolean }>((resolve) => {
      const c = spawn('qemu-system-x86_64', args, { stdio: 'ignore' });
      const t = setTimeout(() => {
        c.kill('SIGKILL');
        resolve({ code: null, timedOut: true });
      }, timeoutMs);
      c.on('error', () => {
        clearTimeout(t);
        resolve({ code: -1, timedOut: false });
      });
      c.on('exit', (code) => {
        clearTimeout(t);
        resolve({ code, timedOut: false });
      });
    });
    const console = await readFile(log, 'utf8').catch(() => '');
    if (result.timedOut) return { usable: false, reason: `a KVM probe boot did not finish within ${timeoutMs} ms` };
    if (result.code !== 0 || /Kernel panic/.test(console)) return { usable: false, reason: `the KVM probe boot failed (exit ${result.code})` };
    return { usable: true, reason: 'KVM probe boot finished' };
  } finally {
    await rm(log, { force: true });
  }
}

/**
 * Waits until the process has exited. A daemonized QEMU is the child of the host's init, which may
 * take seconds to reap it: a zombie counts as gone (it holds no memory, files or devices).
 */
export async function waitForExit(pid: number, timeoutMs: number): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (Date.now() < deadline) {
    let state: string;
    try {
      state = readFileSync(`/proc/${pid}/stat`, 'utf8').replace(/^.*\) /s, '')[0] ?? '';
    } catch {
      return;
    }
    if (state === 'Z' || state === 'X') return;
    await new Promise((r) => setTimeout(r, 5));
  }
}
