/**
 * A node that offers several runtimes (sandbox and microvm) gives its agent one driver: this
 * router. Create and start go to the driver the box's spec names; every later call goes to the
 * driver that holds the box, found from the calls it has seen or, after an agent restart, by
 * asking each driver (a box exists in at most one).
 */
import type { Duplex, Readable } from 'node:stream';
import type { Socket } from 'node:net';
import type { ProvisioningDriver } from '../box-provisioner.js';
import type { BoxRuntimeSpec, BoxSecret, ExecOptions, ExecProcess, RuntimeBoxStatus } from './runtime-driver.js';

export class RuntimeRouter implements ProvisioningDriver {
  readonly name: string;
  /** Every runtime offered, advertised to the scheduler. */
  readonly runtimes: string[];
  readonly pauseKeepsMemory: boolean;
  private readonly owner = new Map<string, ProvisioningDriver>();

  constructor(
    private readonly drivers: ProvisioningDriver[],
    private readonly log: (msg: string, fields?: object) => void = () => {},
  ) {
    if (drivers.length === 0) throw new Error('a node needs at least one runtime');
    this.runtimes = drivers.map((d) => d.name);
    this.name = this.runtimes.join('+');
    this.pauseKeepsMemory = drivers.every((d) => d.pauseKeepsMemory);
  }

  /** The driver of a runtime by name. */
  driver(runtime: string): ProvisioningDriver {
    const d = this.drivers.find((x) => x.name === runtime);
    if (!d) throw Object.assign(new Error(`runtime ${runtime} is not offered by this node (it offers ${this.runtimes.join(', ')})`), { code: 'INVALID_SPEC' });
    return d;
  }

  private forSpec(spec: BoxRuntimeSpec): ProvisioningDriver {
    const d = spec.runtime ? this.driver(spec.runtime) : this.drivers[0]!;
    this.owner.set(spec.boxId, d);
    return d;
  }

  private async route(boxId: string): Promise<ProvisioningDriver> {
    const known = this.owner.get(boxId);
    if (known) return known;
    for (const d of this.drivers) {
      if ((await d.inspect(boxId)).state !== 'absent') {
        this.owner.set(boxId, d);
        return d;
      }
    }
    return this.drivers[0]!;
  }

  assign(boxId: string, runtime: string): void {
    if (!this.owner.has(boxId)) {
      const d = this.drivers.find((x) => x.name === runtime);
      if (d) this.owner.set(boxId, d);
    }
  }

  /** Labels the node registers with (e.g. the microVM accelerator). */
  nodeLabels(): Record<string, string> {
    return Object.assign({}, ...this.drivers.map((d) => d.nodeLabels?.() ?? {})) as Record<string, string>;
  }

  /**
   * Initialises every driver. The first one (the node's main runtime) must work; an optional one
   * that cannot (no QEMU, no kernel package reachable) is left out of what the node offers, so
   * the node still serves boxes of the others.
   */
  async init(): Promise<void> {
    for (const d of [...this.drivers]) {
      try {
        await d.init();
      } catch (e) {
        if (d === this.drivers[0]) throw e;
        this.log(`runtime ${d.name} is not available on this node`, { err: (e as Error).message });
        this.drivers.splice(this.drivers.indexOf(d), 1);
        this.runtimes.splice(this.runtimes.indexOf(d.name), 1);
      }
    }
  }
  async create(spec: BoxRuntimeSpec): Promise<void> {
    await this.forSpec(spec).create(spec);
  }
  async start(spec: BoxRuntimeSpec): Promise<void> {
    await this.forSpec(spec).start(spec);
  }
  async stop(boxId: string, opts?: { graceMs?: number }): Promise<void> {
    await (await this.route(boxId)).stop(boxId, opts);
  }
  async pause(boxId: string): Promise<void> {
    await (await this.route(boxId)).pause(boxId);
  }
  async resume(boxId: string): Promise<void> {
    await (await this.route(boxId)).resume(boxId);
  }
  async destroy(boxId: string): Promise<void> {
    const d = await this.route(boxId);
    await d.destroy(boxId);
    this.owner.delete(boxId);
  }
  async inspect(boxId: string): Promise<RuntimeBoxStatus> {
    return (await this.route(boxId)).inspect(boxId);
  }
  async list(): Promise<RuntimeBoxStatus[]> {
    const out: RuntimeBoxStatus[] = [];
    for (const d of this.drivers) {
      for (const s of await d.list()) {
        this.owner.set(s.boxId, d);
        out.push(s);
      }
    }
    return out;
  }
  async writeSecrets(boxId: string, secrets: readonly BoxSecret[]): Promise<void> {
    await (await this.route(boxId)).writeSecrets?.(boxId, secrets);
  }
  async exec(boxId: string, opts: ExecOptions): Promise<ExecProcess> {
    return (await this.route(boxId)).exec(boxId, opts);
  }
  async dial(boxId: string, port: number): Promise<Socket | Duplex> {
    return (await this.route(boxId)).dial(boxId, port);
  }
  async withWorkspaceOnHost<T>(boxId: string, fn: (paths: { workspace: string; owner: { uid: number; gid: number } }) => Promise<T>): Promise<T> {
    const d = await this.route(boxId);
    if (d.withWorkspaceOnHost) return d.withWorkspaceOnHost(boxId, fn);
    if (!d.boxHostPaths) throw new Error(`runtime ${d.name} cannot check out repositories on the host`);
    return fn(d.boxHostPaths(boxId));
  }
  canRunPrebuilds(runtime: string): boolean {
    return this.driver(runtime).canRunPrebuilds?.(runtime) ?? true;
  }
  boxHostPaths(boxId: string): { workspace: string; owner: { uid: number; gid: number } } {
    const d = this.owner.get(boxId) ?? this.drivers[0]!;
    if (!d.boxHostPaths) throw new Error(`runtime ${d.name} cannot check out repositories on the host`);
    return d.boxHostPaths(boxId);
  }
  async fork(sourceBoxId: string, spec: BoxRuntimeSpec): Promise<void> {
    const d = await this.route(sourceBoxId);
    if (!d.fork) throw new Error(`runtime ${d.name} cannot fork boxes`);
    await d.fork(sourceBoxId, spec);
    this.owner.set(spec.boxId, d);
  }
  async exportSnapshot(boxId: string): Promise<Readable> {
    const d = await this.route(boxId);
    if (!d.exportSnapshot) throw Object.assign(new Error(`runtime ${d.name} cannot move paused boxes between nodes`), { code: 'INVALID_SPEC' });
    return d.exportSnapshot(boxId);
  }
  async importSnapshot(spec: BoxRuntimeSpec, bundle: Readable): Promise<void> {
    const d = this.forSpec(spec);
    if (!d.importSnapshot) throw new Error(`runtime ${d.name} cannot move paused boxes between nodes`);
    await d.importSnapshot(spec, bundle);
  }
  async setHostname(boxId: string, name: string): Promise<void> {
    await (await this.route(boxId)).setHostname?.(boxId, name);
  }
}
