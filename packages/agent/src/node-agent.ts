/**
 * `devyard agent`: runs the boxes of one node. It registers the node, renews its lease by
 * heartbeat, list+watches the desired set, drives each box towards it through the runtime driver
 * (level-triggered, one step at a time per box) and reports the phases it observes.
 *
 * The data plane outlives the control plane: the last desired set is persisted and reconciling
 * continues while the server is unreachable; reports are queued and sent when it is back. A
 * restarted agent adopts the boxes it finds running — it never kills them to start over.
 */
import { arch, cpus, hostname, totalmem } from 'node:os';
import { mkdirSync, statfsSync } from 'node:fs';
import { join } from 'node:path';
import type { BoxStatusReport, DesiredBox, DesiredSet } from '@devyard/api/node-schemas';
import type { Phase } from '@devyard/core/box-lifecycle';
import { decideNodeStep } from '@devyard/core/node-reconcile';
import { DevyardClient } from '@devyard/sdk/devyard-client';
import { loadAgentState, saveAgentState, type AgentState } from './agent-state-file.js';
import { AgentMetrics } from './agent-metrics.js';
import { ExecServer } from './exec-server.js';
import { BoxProvisioner, type BoxSetupRecord, type ProvisioningDriver } from './box-provisioner.js';
import type { PrebuildBuilder } from './prebuilds/prebuild-builder.js';

/** Resolves an image name to a root filesystem on this node, building or fetching it if needed. */
export interface ImageProvider {
  ensure(name: string, onProgress?: (line: string) => void): Promise<{ name: string; digest: string; rootfs: string }>;
  list(): Promise<Array<{ name: string; digest: string }>>;
}

export interface NodeAgentOptions {
  serverUrl: string;
  token: string;
  dataDir: string;
  driver: ProvisioningDriver;
  images: ImageProvider;
  /** Builds and caches prebuilds on this node (null: boxes are always set up from scratch). */
  prebuilds?: PrebuildBuilder | null;
  name?: string;
  /** Address the exec endpoint listens on, and advertises. */
  listenHost?: string;
  listenPort?: number;
  advertiseHost?: string;
  heartbeatMs?: number;
  resyncMs?: number;
  /**
   * CPU the node offers to the scheduler, as a multiple of its cores (default 4). Dev boxes idle
   * most of the time, so CPU is overcommitted while each box is still capped by its CFS quota;
   * memory is never overcommitted.
   */
  cpuOvercommit?: number;
  log?: (msg: string, fields?: Record<string, unknown>) => void;
}

/** Progress lines of one box are reported at most this often. */
const PROGRESS_INTERVAL_MS = 250;

/** An unchanged report is not sent again sooner than this. */
const REPORT_REPEAT_MS = 5000;

/** Steps shorter than this are reported only when done. */
const TRANSIENT_REPORT_DELAY_MS = 100;

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

export class NodeAgent {
  private readonly client: DevyardClient;
  private readonly stateFile: string;
  private state: AgentState;
  private readonly exec: ExecServer;
  private agentUrl = '';
  private readonly abort = new AbortController();
  private readonly boxChains = new Map<string, Promise<void>>();
  private readonly pendingReports = new Map<string, BoxStatusReport>();
  private readonly lastSent = new Map<string, { key: string; at: number }>();
  private readonly lastProgressAt = new Map<string, number>();
  private flushing: Promise<void> | null = null;
  private resyncTimer: NodeJS.Timeout | undefined;
  private readonly log: NonNullable<NodeAgentOptions['log']>;
  private connected = false;
  private readonly metrics: AgentMetrics;
  private readonly provisioner: BoxProvisioner;

  constructor(private readonly opts: NodeAgentOptions) {
    this.client = new DevyardClient({ url: opts.serverUrl, token: opts.token, timeoutMs: 10_000 });
    this.stateFile = join(opts.dataDir, 'agent-state.json');
    this.state = loadAgentState(this.stateFile, opts.serverUrl);
    this.log = opts.log ?? (() => undefined);
    this.provisioner = new BoxProvisioner({ driver: opts.driver, images: opts.images, prebuilds: opts.prebuilds ?? null, pids: 4096, log: this.log });
    this.metrics = new AgentMetrics({ serverReachable: () => this.connected, boxes: () => this.state.desired?.boxes.length ?? 0 });
    this.exec = new ExecServer({
      host: opts.listenHost ?? '127.0.0.1',
      port: opts.listenPort ?? 0,
      driver: opts.driver,
      sessionKey: () => this.state.sessionKey,
      metrics: async () => ({ contentType: this.metrics.registry.contentType, body: await this.metrics.registry.metrics() }),
      log: this.log,
    });
  }

  get nodeId(): string | null {
    return this.state.nodeId;
  }

  /** Whether the last call to the server succeeded. */
  get serverReachable(): boolean {
    return this.connected;
  }

  async start(): Promise<void> {
    mkdirSync(this.opts.dataDir, { recursive: true });
    await this.opts.driver.init();
    // A prebuild interrupted by a crash left temp dirs behind; none of them is ever used.
    await this.opts.prebuilds?.sweep();
    const url = await this.exec.listen();
    this.agentUrl = this.opts.advertiseHost ? url.replace(/\/\/[^:]+:/, `//${this.opts.advertiseHost}:`) : url;
    const adopted = await this.opts.driver.list();
    if (adopted.length) this.log('found boxes on this host; adopting them', { boxes: adopted.map((b) => `${b.boxId}:${b.state}`) });
    // Act on the last known desired set at once: the server may be down.
    if (this.state.desired) this.reconcileAll();
    void this.connectLoop();
    this.resyncTimer = setInterval(() => this.reconcileAll(), this.opts.resyncMs ?? 10_000);
  }

  async stop(): Promise<void> {
    this.abort.abort();
    clearInterval(this.resyncTimer);
    await Promise.allSettled([...this.boxChains.values()]);
    await this.exec.close();
  }

  /** Registers, then keeps a heartbeat and a desired-set watch going; retries forever with backoff. */
  private async connectLoop(): Promise<void> {
    let backoff = 250;
    while (!this.abort.signal.aborted) {
      try {
        await this.register();
        backoff = 250;
        await Promise.race([this.heartbeatLoop(), this.watchLoop()]);
      } catch (e) {
        if (this.abort.signal.aborted) return;
        this.connected = false;
        this.log('lost the control plane (or could not register); running on the last desired set', { err: (e as Error).message });
      }
      await sleep(backoff);
      backoff = Math.min(backoff * 2, 5000);
    }
  }

  private async register(): Promise<void> {
    const images = (await this.opts.images.list()).flatMap((i) => [i.name, i.digest]);
    const res = await this.client.registerNode({
      name: this.opts.name ?? hostname(),
      arch: arch() === 'x64' ? 'x86_64' : arch(),
      region: null,
      labels: {},
      runtimes: [this.opts.driver.name],
      capacity: {
        cpuMillis: Math.round(cpus().length * 1000 * (this.opts.cpuOvercommit ?? 4)),
        memoryBytes: totalmem(),
        diskBytes: (() => {
          const s = statfsSync(this.opts.dataDir);
          return s.blocks * s.bsize;
        })(),
      },
      images,
      agentUrl: this.agentUrl,
    });
    this.connected = true;
    this.state = { ...this.state, nodeId: res.nodeId, sessionKey: res.sessionKey };
    saveAgentState(this.stateFile, this.state);
    this.log('registered', { nodeId: res.nodeId });
    void this.flushReports();
  }

  private async heartbeatLoop(): Promise<void> {
    while (!this.abort.signal.aborted) {
      await sleep(this.opts.heartbeatMs ?? 5000);
      const images = (await this.opts.images.list()).flatMap((i) => [i.name, i.digest]);
      await this.client.heartbeat(this.state.nodeId!, images);
      this.connected = true;
    }
  }

  private async watchLoop(): Promise<void> {
    for await (const set of this.client.watchDesiredSet(this.state.nodeId!, this.abort.signal)) {
      this.connected = true;
      this.applyDesired(set);
    }
    throw new Error('desired-set watch ended');
  }

  private applyDesired(set: DesiredSet): void {
    const key = (b: DesiredBox) => `${b.operationId}|${b.desiredState}|${b.name}|${b.pooled}`;
    const before = new Map((this.state.desired?.boxes ?? []).map((b) => [b.boxId, key(b)]));
    this.state = { ...this.state, desired: set };
    const live = new Set(set.boxes.map((b) => b.operationId));
    for (const [boxId, op] of Object.entries(this.state.failedOperations)) if (!live.has(op)) delete this.state.failedOperations[boxId];
    saveAgentState(this.stateFile, this.state);
    // Only boxes whose desired entry changed need a pass now; the periodic resync covers the rest.
    for (const b of set.boxes) if (before.get(b.boxId) !== key(b)) this.enqueue(b.boxId);
  }

  private reconcileAll(): void {
    for (const box of this.state.desired?.boxes ?? []) this.enqueue(box.boxId);
  }

  /** Serializes work per box; different boxes proceed in parallel. Coalesces repeated wake-ups. */
  private enqueue(boxId: string): void {
    if (this.boxChains.has(boxId)) {
      this.rerun.add(boxId);
      return;
    }
    const run = async (): Promise<void> => {
      try {
        await this.reconcileBox(boxId);
      } catch (e) {
        this.log('reconcile failed', { boxId, err: (e as Error).message });
      }
      if (this.rerun.delete(boxId) && !this.abort.signal.aborted) return run();
    };
    const chain = run().finally(() => this.boxChains.delete(boxId));
    this.boxChains.set(boxId, chain);
  }
  private readonly rerun = new Set<string>();

  /** A box on disk from before setup tracking: it was set up then, so only start it from now on. */
  private async legacySetup(box: DesiredBox, progress: (line: string) => void): Promise<BoxSetupRecord> {
    const image = await this.opts.images.ensure(box.image, progress);
    return { image: { rootfs: image.rootfs, digest: image.digest }, postCreateDone: true, hostname: box.name };
  }


  /** Steps one box until it matches its desired state, a step fails, or the desired set changes. */
  private async reconcileBox(boxId: string): Promise<void> {
    for (let steps = 0; steps < 6; steps++) {
      const box = this.state.desired?.boxes.find((b) => b.boxId === boxId);
      if (!box) return;
      const observed = await this.opts.driver.inspect(boxId);
      const step = decideNodeStep(box.desiredState, observed.state);
      if (step.kind === 'none') {
        const setup = this.state.setup[boxId];
        if (observed.state === 'running' && setup && this.state.failedOperations[boxId] !== box.operationId) {
          try {
            if (await this.provisioner.settle(box, setup, (line) => this.progress(box, 'running', line))) saveAgentState(this.stateFile, this.state);
          } catch (e) {
            this.state.failedOperations[boxId] = box.operationId;
            saveAgentState(this.stateFile, this.state);
            this.report(box, 'running', observed.ip ?? null, errorText(e));
            return;
          }
        }
        this.report(box, step.phase, observed.ip ?? null);
        return;
      }
      if (this.state.failedOperations[boxId] === box.operationId) return; // wait for the server's retry
      // Report the transient phase (starting, pausing, …) only for steps that take a while: a
      // freezer write is done before the report would arrive, and the round trip would double it.
      const transient = setTimeout(() => this.report(box, step.phase, observed.ip ?? null), TRANSIENT_REPORT_DELAY_MS);
      const timer = this.metrics.stepSeconds.startTimer({ step: step.kind });
      try {
        const d = this.opts.driver;
        switch (step.kind) {
          case 'start':
          case 'create': {
            const progress = (line: string) => {
              this.log('setup', { boxId, line });
              this.progress(box, step.phase, line);
            };
            const known = this.state.setup[boxId];
            if (observed.state === 'absent' || !known) {
              // A box found on disk without a setup record predates setup tracking: start it as is.
              const setup =
                observed.state !== 'absent' && !known
                  ? await this.legacySetup(box, progress)
                  : await this.provisioner.provision(box, progress, { start: step.kind === 'start' });
              this.state.setup[boxId] = setup;
              saveAgentState(this.stateFile, this.state);
              if (observed.state !== 'absent' && step.kind === 'start') await this.provisioner.start(box, setup, progress);
            } else if (step.kind === 'start') await this.provisioner.start(box, known, progress);
            break;
          }
          case 'stop':
            await d.stop(boxId);
            break;
          case 'pause':
            await d.pause(boxId);
            break;
          case 'resume':
            await d.resume(boxId);
            break;
          case 'destroy':
            await d.destroy(boxId);
            delete this.state.setup[boxId];
            saveAgentState(this.stateFile, this.state);
            break;
        }
      } catch (e) {
        clearTimeout(transient);
        this.metrics.stepErrors.inc({ step: step.kind });
        const message = errorText(e);
        this.log('box step failed', { boxId, step: step.kind, err: message });
        this.state.failedOperations[boxId] = box.operationId;
        saveAgentState(this.stateFile, this.state);
        const now = await this.opts.driver.inspect(boxId).catch(() => observed);
        const phase: Phase = now.state === 'absent' ? (box.desiredState === 'deleted' ? 'deleting' : 'provisioning') : now.state;
        this.report(box, phase, now.ip ?? null, `${step.kind} failed: ${message}`);
        return;
      }
      clearTimeout(transient);
      timer();
      const after = await this.opts.driver.inspect(boxId);
      this.report(box, step.then, after.ip ?? null);
    }
  }

  /** Reports a progress line of a long step, at most a few times a second. */
  private progress(box: DesiredBox, phase: Phase, message: string): void {
    const now = Date.now();
    if (now - (this.lastProgressAt.get(box.boxId) ?? 0) < PROGRESS_INTERVAL_MS) return;
    this.lastProgressAt.set(box.boxId, now);
    this.report(box, phase, null, null, message);
  }

  private report(box: DesiredBox, phase: Phase, ip: string | null, error: string | null = null, message = ''): void {
    // The same report again within a few seconds adds nothing; later repeats are kept on purpose,
    // they heal a report the server lost (it applies them idempotently).
    const key = `${box.operationId}|${phase}|${ip}|${error}|${message}`;
    const last = this.lastSent.get(box.boxId);
    if (last && last.key === key && Date.now() - last.at < REPORT_REPEAT_MS && !this.pendingReports.has(box.boxId)) return;
    this.lastSent.set(box.boxId, { key, at: Date.now() });
    const prev = this.pendingReports.get(box.boxId);
    this.pendingReports.set(box.boxId, {
      boxId: box.boxId,
      phase,
      observedGeneration: box.generation,
      operationId: box.operationId,
      ip,
      // An error must reach the server even if a later report for the same operation replaces it.
      error: error ?? (prev?.operationId === box.operationId ? prev.error : null),
      message,
    });
    void this.flushReports();
  }

  private async flushReports(): Promise<void> {
    if (this.flushing) {
      await this.flushing;
      if (this.pendingReports.size === 0) return;
    }
    if (!this.state.nodeId || this.pendingReports.size === 0) return;
    const batch = [...this.pendingReports.values()];
    this.pendingReports.clear();
    this.flushing = this.client
      .reportStatus(this.state.nodeId, batch)
      .then(() => {
        this.connected = true;
      })
      .catch(() => {
        this.connected = false;
        // Keep the newest report per box for the next attempt (after reconnecting).
        for (const r of batch) if (!this.pendingReports.has(r.boxId)) this.pendingReports.set(r.boxId, r);
      })
      .finally(() => {
        this.flushing = null;
      });
    await this.flushing;
    if (this.pendingReports.size > 0 && this.connected) void this.flushReports();
  }
}

/** An error as one report message: the first line plus, for hooks and builds, the log tail. */
function errorText(e: unknown): string {
  const lines = String((e as Error)?.message ?? e).split('\n');
  return lines.slice(0, 30).join('\n').slice(0, 4000);
}
