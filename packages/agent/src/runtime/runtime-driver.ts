/**
 * The runtime driver interface, declared here by its consumer (the agent's box reconciler) and
 * implemented by each runtime under runtime/<driver>/. Every method is idempotent: the agent may
 * call it again after a crash or a retried operation, and it must converge, not fail, when the
 * box is already in the target state.
 */
import type { Socket } from 'node:net';
import type { Duplex, Readable, Writable } from 'node:stream';

/** Resource limits enforced on a box (cgroups for the sandbox, VM size for a microVM). */
export interface RuntimeResources {
  /** CPU limit in millicores (1000 = one full core), enforced as a CFS quota. */
  cpuMillis: number;
  /** Memory limit in bytes; exceeding it OOM-kills inside the box, never on the host. */
  memoryBytes: number;
  /** Maximum number of processes/threads in the box (fork-bomb guard). */
  pids: number;
  /**
   * The box's disk size: a microVM's volume disk; in a sandbox, the filesystem that holds the box's
   * root changes and its /workspace and /root volumes (writing past it is ENOSPC in the box).
   */
  diskBytes?: number;
}

/** Everything a driver needs to run one box; built by the agent from the desired set. */
export interface BoxRuntimeSpec {
  /** Stable box id from the control plane; drivers name every host object after it. */
  boxId: string;
  /** Box name, used as the hostname inside the box. */
  name: string;
  /** Runtime the box runs on (`sandbox`, `microvm`); a node with several drivers routes by it. */
  runtime?: string;
  /** Read-only root filesystem of the box's image (shared between boxes, never written). */
  imageRootfs: string;
  /** Content digest of the image, recorded so a restarted agent can tell which image a box uses. */
  imageDigest: string;
  /** Limits for the box. */
  resources: RuntimeResources;
  /** Environment for the box's processes (and defaults for exec sessions). */
  env: Record<string, string>;
  /**
   * Extra read-only root filesystem layers stacked above the image, topmost first (a prebuild's
   * captured root changes); owned by the box's host id range like the image, shared, never written.
   */
  layers?: string[];
  /**
   * Read-only directory that seeds `/workspace` copy-on-write (a prebuild's checkout): the box sees
   * its content, its own changes stay in its workspace volume.
   */
  workspaceBase?: string;
  /**
   * Give the box its secrets directory (bound read-only at /run/devyard/secrets, see
   * {@link RuntimeDriver.writeSecrets}). Set for the agent's boxes; never for prebuild or image
   * build boxes, which must not see a user's secrets.
   */
  secrets?: boolean;
}

/** A secret as a box receives it. */
export interface BoxSecret {
  /** Environment-variable style name: the file name under /run/devyard/secrets and the variable name in sessions. */
  name: string;
  /** The value. */
  value: string;
}

/** What a driver observes of a box on this host. */
export type RuntimeBoxState =
  /** Nothing of the box exists on this host. */
  | 'absent'
  /** Disk state (overlay upper, workspace volume) exists; no process runs. */
  | 'stopped'
  /** The box's processes run. */
  | 'running'
  /** The box's processes exist but are frozen (cgroup freezer); their memory stays on the node. */
  | 'paused';

/** One box as observed on the host. */
export interface RuntimeBoxStatus {
  /** Box id. */
  boxId: string;
  /** Observed state. */
  state: RuntimeBoxState;
  /** The box's address on the node network, while it has one. */
  ip?: string;
  /** Host pid of the box's init process, while running or paused. */
  pid?: number;
  /**
   * Why the box stopped without being asked to (a VM process killed or crashed), until it is
   * started again: the agent reports it, so the user sees why the box restarted.
   */
  failure?: string;
}

/** Options for a process started inside a box. */
export interface ExecOptions {
  /** Program and arguments. */
  argv: string[];
  /** Extra environment, merged over the box's. */
  env?: Record<string, string>;
  /** Working directory inside the box (default /workspace). */
  cwd?: string;
  /** Allocate a pseudo-terminal; stdout and stderr are then one stream. */
  tty?: boolean;
  /** Initial terminal size when tty is set. */
  cols?: number;
  /** Initial terminal size when tty is set. */
  rows?: number;
}

/** A running process inside a box. */
export interface ExecProcess {
  /** Writes go to the process's stdin (the terminal's input with a tty). */
  stdin: Writable;
  /** The process's stdout (with a tty: the terminal's output, stderr included). */
  stdout: Readable;
  /** The process's stderr (empty with a tty). */
  stderr: Readable;
  /** Resolves with the exit code (128+signal when killed by a signal) once the process ends. */
  exited: Promise<number>;
  /** Changes the terminal size (no-op without a tty). */
  resize(cols: number, rows: number): void;
  /** Sends a signal to the process. */
  kill(signal?: NodeJS.Signals): void;
}

/** A box runtime: sandbox (crun), microvm (QEMU) or sim. */
export interface RuntimeDriver {
  /** Runtime name as advertised by the node ("sandbox", "microvm", "sim"). */
  readonly name: string;
  /** Whether pause keeps process memory intact, shown to users by `devyard get`. */
  readonly pauseKeepsMemory: boolean;
  /** Labels the node registers with for this runtime (e.g. the microVM accelerator in use). */
  nodeLabels?(): Record<string, string>;
  /** Prepares the host (network bridge, NAT, cgroup parents); safe to call on every agent start. */
  init(): Promise<void>;
  /** Creates the box's disk state (overlay upper, workspace and home volume) without starting it. */
  create(spec: BoxRuntimeSpec): Promise<void>;
  /** Starts the box's processes from its disk state (cold boot); creates the disk state if missing. */
  start(spec: BoxRuntimeSpec): Promise<void>;
  /** Ends every process and releases CPU, memory and the network; disk state is kept. */
  stop(boxId: string, opts?: { graceMs?: number }): Promise<void>;
  /** Freezes every process of a running box. */
  pause(boxId: string): Promise<void>;
  /** Thaws a paused box. */
  resume(boxId: string): Promise<void>;
  /** Removes everything of the box from the host: processes, mounts, cgroups, netns, veth, files. */
  destroy(boxId: string): Promise<void>;
  /** Observes one box. */
  inspect(boxId: string): Promise<RuntimeBoxStatus>;
  /** Lists every box this driver has anything of on the host (used to adopt boxes after a restart). */
  list(): Promise<RuntimeBoxStatus[]>;
  /**
   * Replaces the box's secrets (the whole set) where the box sees them: files under
   * /run/devyard/secrets and the environment of every later exec, merged over the box's env and
   * under the session's own. Kept in memory only (tmpfs); stop and destroy remove them.
   */
  writeSecrets?(boxId: string, secrets: readonly BoxSecret[]): Promise<void>;
  /**
   * A paused box as one stream another node's driver can import and resume (microVM: snapshot,
   * disks and RAM); drivers whose pause keeps memory only on this host do not offer it.
   */
  exportSnapshot?(boxId: string): Promise<Readable>;
  /** Takes a paused box exported by another node; the box is paused here afterwards. */
  importSnapshot?(spec: BoxRuntimeSpec, bundle: Readable): Promise<void>;
  /** Starts a process inside a running box. */
  exec(boxId: string, opts: ExecOptions): Promise<ExecProcess>;
  /**
   * Opens a TCP connection to 127.0.0.1:port inside a running box (its own localhost, so servers
   * bound to loopback in the box are reachable); the socket allows half-close. Rejects with an
   * error whose `code` is `PORT_REFUSED` when nothing listens there, `BOX_NOT_RUNNING` or
   * `BOX_PAUSED` when the box does not run, `DIAL_FAILED` otherwise.
   */
  dial(boxId: string, port: number): Promise<Socket | Duplex>;
}
