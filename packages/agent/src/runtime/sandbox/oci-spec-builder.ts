/**
 * Builds the OCI runtime config (config.json) of one box: user/pid/mount/uts/ipc namespaces plus
 * the host-owned network namespace, root mapped to an unprivileged host uid range, Docker's default
 * capabilities minus NET_RAW and MKNOD, no new privileges, a seccomp allow-list (seccomp-profile.ts), cgroup limits.
 */
import type { RuntimeResources } from '../runtime-driver.js';
import { boxSeccompProfile } from './seccomp-profile.js';

/** A contiguous uid/gid range: container 0.. maps to host `hostId`.. */
export interface IdRange {
  /** First host id. */
  hostId: number;
  /** Number of ids. */
  size: number;
}

/** Inputs of {@link buildOciSpec}. */
export interface BoxOciSpecInput {
  /** Mounted overlay (the box's root). */
  rootfs: string;
  /** Hostname (the box name). */
  hostname: string;
  /** Init argv. */
  args: string[];
  /** Init environment. */
  env: string[];
  /** Limits. */
  resources: RuntimeResources;
  /** `linux.cgroupsPath`. */
  cgroupsPath: string;
  /** Path of the network namespace to join. */
  netnsPath: string;
  /** User namespace mapping. */
  idRange: IdRange;
  /** Bind mounts: host source → box destination. */
  binds: Array<{ source: string; destination: string; readonly: boolean }>;
  /** A sysfs mounted from inside the box's network namespace, bound read-only at /sys. */
  sysfsSource: string;
}

/** Docker's default set minus NET_RAW (spoofing) and MKNOD (no devices in a box). */
export const BOX_CAPABILITIES = [
  'CAP_CHOWN',
  'CAP_DAC_OVERRIDE',
  'CAP_FSETID',
  'CAP_FOWNER',
  'CAP_SETGID',
  'CAP_SETUID',
  'CAP_SETFCAP',
  'CAP_SETPCAP',
  'CAP_NET_BIND_SERVICE',
  'CAP_SYS_CHROOT',
  'CAP_KILL',
  'CAP_AUDIT_WRITE',
];

/** CFS period used for every box; the quota is cpuMillis/1000 of it. */
export const CFS_PERIOD_US = 100_000;

/** The OCI config of a box. */
export function buildOciSpec(input: BoxOciSpecInput): Record<string, unknown> {
  const { resources } = input;
  const quota = Math.max(1000, Math.round((resources.cpuMillis / 1000) * CFS_PERIOD_US));
  return {
    ociVersion: '1.0.0',
    process: {
      terminal: false,
      user: { uid: 0, gid: 0 },
      args: input.args,
      env: input.env,
      cwd: '/',
      capabilities: {
        bounding: BOX_CAPABILITIES,
        effective: BOX_CAPABILITIES,
        permitted: BOX_CAPABILITIES,
        inheritable: [],
        ambient: [],
      },
      noNewPrivileges: true,
    },
    root: { path: input.rootfs, readonly: false },
    hostname: input.hostname,
    mounts: [
      { destination: '/proc', type: 'proc', source: 'proc', options: ['nosuid', 'noexec', 'nodev'] },
      {
        destination: '/dev',
        type: 'tmpfs',
        source: 'tmpfs',
        options: ['nosuid', 'strictatime', 'mode=755', 'size=65536k'],
      },
      {
        destination: '/dev/pts',
        type: 'devpts',
        source: 'devpts',
        options: ['nosuid', 'noexec', 'newinstance', 'ptmxmode=0666', 'mode=0620', 'gid=5'],
      },
      {
        destination: '/dev/shm',
        type: 'tmpfs',
        source: 'shm',
        options: ['nosuid', 'noexec', 'nodev', 'mode=1777', 'size=65536k'],
      },
      { destination: '/dev/mqueue', type: 'mqueue', source: 'mqueue', options: ['nosuid', 'noexec', 'nodev'] },
      {
        destination: '/sys',
        type: 'bind',
        source: input.sysfsSource,
        options: ['rbind', 'ro', 'nosuid', 'noexec', 'nodev'],
      },
      {
        destination: '/sys/fs/cgroup',
        type: 'cgroup',
        source: 'cgroup',
        options: ['nosuid', 'noexec', 'nodev', 'relatime', 'ro'],
      },
      ...input.binds.map((b) => ({
        destination: b.destination,
        type: 'bind',
        source: b.source,
        options: ['rbind', b.readonly ? 'ro' : 'rw', 'nosuid', 'nodev'],
      })),
    ],
    linux: {
      uidMappings: [{ containerID: 0, hostID: input.idRange.hostId, size: input.idRange.size }],
      gidMappings: [{ containerID: 0, hostID: input.idRange.hostId, size: input.idRange.size }],
      namespaces: [
        { type: 'pid' },
        { type: 'ipc' },
        { type: 'uts' },
        { type: 'mount' },
        { type: 'user' },
        { type: 'network', path: input.netnsPath },
      ],
      cgroupsPath: input.cgroupsPath,
      resources: {
        devices: [{ allow: false, access: 'rwm' }],
        // swap = limit: no swapping beyond the limit where the host has swap.
        memory: { limit: resources.memoryBytes, swap: resources.memoryBytes },
        pids: { limit: resources.pids },
        cpu: { quota, period: CFS_PERIOD_US },
      },
      seccomp: boxSeccompProfile(),
      maskedPaths: [
        '/proc/acpi',
        '/proc/asound',
        '/proc/kcore',
        '/proc/keys',
        '/proc/latency_stats',
        '/proc/timer_list',
        '/proc/timer_stats',
        '/proc/sched_debug',
        '/proc/scsi',
        '/sys/firmware',
        '/sys/devices/virtual/powercap',
      ],
      readonlyPaths: ['/proc/bus', '/proc/fs', '/proc/irq', '/proc/sys', '/proc/sysrq-trigger'],
    },
  };
}
