/**
 * `devyard agent`: runs the boxes of one node. It registers the node, renews its lease by
 * heartbeat, list+watches the desired set, drives each box towards it through the runtime driver
 * (level-triggered, one step at a time per box) and reports the phases it observes.
 *
 * The data plane outlives the control plane: the last desired set is persisted and reconciling
 * continues while the server is unreachable; reports are queued and sent when it is back. A
 * restarted agent adopts the boxes it finds running — it never kills them to start over.
 */
import { createHash } from 'node:crypto';
import { arch, cpus, hostname, totalmem } from 'node:os';
import { mkdirSync, statfsSync } from 'node:fs';
import { join } from 'node:path';
import { Readable } from 'node:stream';
import type { BoxStatusReport, DesiredBox, DesiredSet, PrebuildReport } from '@devyard/api/node-schemas';
import type { Phase } from '@devyard/core/box-lifecycle';
import { decideNodeStep } from '@devyard/core/node-reconcile';
import { ApiError } from '@devyard/sdk/api-error';
import { DevyardClient } from '@devyard/sdk/devyard-client';
import { loadAgentState, saveAgentState, type AgentState } from './agent-state-file.js';
import { AgentMetrics } from './agent-metrics.js';
import { ExecServer } from './exec-server.js';
import { NodeSecretFiles } from './workspace/node-secret-files.js';
import { BoxProvisioner, imageOf, prebuildRequest, type BoxSetupRecord, type ProvisioningDriver } from './box-provisioner.js';
import type { BuildRecipe } from './images/recipe-image-builder.js';
import type { Prebuild, PrebuildBuilder } from './prebuilds/prebuild-builder.js';

/** Resolves an image name (or a recipe) to a root filesystem on this node, building or fetching it if needed. */
export interface ImageProvider {
  ensure(name: string | BuildRecipe, onProgress?: (line: string) => void): Promise<{ name: string; digest: string; rootfs: string }>;
  list(): Promise<Array<{ name: string; digest: string }>>;
}

export interface NodeAgentOptions {
  serverUrl: string;
  token: string;
  dataDir: string;
  driver: ProvisioningDriver;
  images: ImageProvider;
  /** Directory of the node's secret files (repository credentials named by templates). */
  secretsDir?: string;
  /** Image recipe builder, swept of interrupted builds at start. */
  recipes?: { sweep(): Promise<void> } | null;
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
  /** How often the tracked refs of prebuilt templates are checked for new commits (default 60 s). */
  prebuildCheckMs?: number;
  log?: (msg: string, fields?: Record<string, unknown>) => void;
}

/** Progress lines of one box are reported at most this often. */
const PROGRESS_INTERVAL_MS = 250;

/** Longest error or progress line in a status report (the server's bound on both). */
const REPORT_TEXT_MAX = 8000;

/** An unchanged report is not sent again sooner than this. */
const REPORT_REPEAT_MS = 5000;

/** Steps shorter than this are reported only when done. */
const TRANSIENT_REPORT_DELAY_MS = 100;

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

export class NodeAgent {
  private client: DevyardClient;
  private readonly joinTokenHash: string;
  private readonly stateFile: string;
  private state: AgentState;
  private readonly exec: ExecServer;
  private agentUrl = '';
  private readonly abort = new AbortController();
  private readonly boxChains = new Map<string, Promise<void>>();
  private readonly pendingReports = new Map<string, BoxStatusReport>();
  private readonly lastSent = new Map<string, { key: string; at: number }>();
  private readonly lastProgressAt = new Map<string, number>();
  private readonly pendingProgress = new Map<string, { message: string; timer: NodeJS.Timeout }>();
  private readonly pendingPrebuilds: PrebuildReport[] = [];
  private readonly reportedPrebuilds = new Set<string>();
  private prebuilding: Promise<void> | null = null;
  /** Newest ready prebuild per template version, refreshed by the background pass. */
  private readonly currentPrebuilds = new Map<string, { imageDigest: string; prebuild: Prebuild }>();
  private wantedPrebuilds = '';
  private prebuildTimer: NodeJS.Timeout | undefined;
  private flushing: Promise<void> | null = null;
  private resyncTimer: NodeJS.Timeout | undefined;
  private readonly log: NonNullable<NodeAgentOptions['log']>;
  private connected = false;
  private readonly metrics: AgentMetrics;
  private readonly provisioner: BoxProvisioner;
  /**
   * Whether the desired set in memory came from the server in this process: only then does it hold
   * the boxes' secrets (the state file never does), and only then are they written to boxes.
   */
  private secretsFresh = false;
  /** The secret set last written per box (in memory only), so unchanged sets are not rewritten. */
  private readonly secretsWritten = new Map<string, string>();

  constructor(private readonly opts: NodeAgentOptions) {
    this.stateFile = join(opts.dataDir, 'agent-state.json');
    this.state = loadAgentState(this.stateFile, opts.serverUrl);
    // The join token registers this node once; from then on the node speaks with its own credential,
    // to the installation that issued it only (the one this join token belongs to).
    this.joinTokenHash = createHash('sha256').update(opts.token).digest('hex');
    if (this.state.credentialFor !== this.joinTokenHash) this.state = { ...this.state, credential: null, credentialFor: null };
    this.client = new DevyardClient({ url: opts.serverUrl, token: this.state.credential ?? opts.token, timeoutMs: 10_000 });
    this.log = opts.log ?? (() => undefined);
    this.provisioner = new BoxProvisioner({
      driver: opts.driver,
      images: opts.images,
      prebuilds: opts.prebuilds ?? null,
      ...(opts.secretsDir ? { secrets: new NodeSecretFiles(opts.secretsDir) } : {}),
      pids: 4096,
      log: this.log,
      currentPrebuild: (name, version, digest) => {
        const c = this.currentPrebuilds.get(`${name}:${version}`);
        return c && c.imageDigest === digest ? c.prebuild : undefined;
      },
      onPrebuild: (box, pb, imageDigest) => {
        // A prebuild a create just resolved and built (or found) is the newest for that version.
        this.currentPrebuilds.set(`${box.templateName}:${box.templateVersion}`, { imageDigest, prebuild: pb });
        this.reportPrebuild(box.templateName, box.templateVersion, { prebuild: pb });
      },
    });
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

  /** Digests of the images the boxes on this node were created from (kept by image GC). */
  imagesInUse(): Set<string> {
    return new Set(Object.values(this.state.setup).map((s) => s.image.digest));
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
    await this.opts.recipes?.sweep();
    const url = await this.exec.listen();
    this.agentUrl = this.opts.advertiseHost ? url.replace(/\/\/[^:]+:/, `//${this.opts.advertiseHost}:`) : url;
    const adopted = await this.opts.driver.list();
    if (adopted.length) this.log('found boxes on this host; adopting them', { boxes: adopted.map((b) => `${b.boxId}:${b.state}`) });
    // Act on the last known desired set at once: the server may be down.
    if (this.state.desired) this.reconcileAll();
    void this.connectLoop();
    this.resyncTimer = setInterval(() => this.reconcileAll(), this.opts.resyncMs ?? 10_000);
    // New commits on tracked refs are noticed by polling (git ls-remote) at this pace.
    this.prebuildTimer = setInterval(() => this.prebuildPass(), this.opts.prebuildCheckMs ?? 60_000);
  }

  async stop(): Promise<void> {
    this.abort.abort();
    clearInterval(this.resyncTimer);
    clearInterval(this.prebuildTimer);
    await this.prebuilding;
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
    const req = {
      name: this.opts.name ?? hostname(),
      arch: arch() === 'x64' ? 'x86_64' : arch(),
      region: null,
      labels: this.opts.driver.nodeLabels?.() ?? {},
      runtimes: this.opts.driver.runtimes ?? [this.opts.driver.name],
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
    };
    let res;
    try {
      res = await this.client.registerNode(req);
    } catch (e) {
      // A control plane that does not know our credential (a new store) takes the join token.
      if (!(e instanceof ApiError && e.status === 401 && this.state.credential)) throw e;
      this.log('the server does not know this node credential; registering with the join token', {});
      res = await new DevyardClient({ url: this.opts.serverUrl, token: this.opts.token, timeoutMs: 10_000 }).registerNode(req);
    }
    const credential = res.credential ?? this.state.credential ?? null;
    if (credential && credential !== this.state.credential) this.client = new DevyardClient({ url: this.opts.serverUrl, token: credential, timeoutMs: 10_000 });
    this.connected = true;
    this.state = { ...this.state, nodeId: res.nodeId, sessionKey: res.sessionKey, credential, credentialFor: this.joinTokenHash };
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
    // A server from before secrets sends none: treat that as an empty set.
    set = { ...set, boxes: set.boxes.map((b) => ({ ...b, secrets: b.secrets ?? [] })) };
    const key = (b: DesiredBox) => `${b.operationId}|${b.desiredState}|${b.name}|${b.pooled}|${JSON.stringify(b.secrets)}`;
    const before = new Map((this.state.desired?.boxes ?? []).map((b) => [b.boxId, key(b)]));
    this.state = { ...this.state, desired: set };
    this.secretsFresh = true;
    const live = new Set(set.boxes.map((b) => b.operationId));
    for (const [boxId, op] of Object.entries(this.state.failedOperations)) if (!live.has(op)) delete this.state.failedOperations[boxId];
    saveAgentState(this.stateFile, this.state);
    // Only boxes whose desired entry changed need a pass now; the periodic resync covers the rest.
    for (const b of set.boxes) if (before.get(b.boxId) !== key(b)) this.enqueue(b.boxId);
    // A new template version to prebuild is acted on now; new commits wait for the periodic pass.
    const wanted = set.prebuilds.map((p) => `${p.templateName}:${p.templateVersion}`).join(',');
    if (wanted !== this.wantedPrebuilds) {
      this.wantedPrebuilds = wanted;
      this.prebuildPass();
    }
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
        const secrets = this.state.desired?.boxes.find((b) => b.boxId === boxId)?.secrets ?? [];
        this.log('reconcile failed', { boxId, err: redactSecrets((e as Error).message, secrets) });
      }
      if (this.rerun.delete(boxId) && !this.abort.signal.aborted) return run();
    };
    const chain = run().finally(() => this.boxChains.delete(boxId));
    this.boxChains.set(boxId, chain);
  }
  private readonly rerun = new Set<string>();

  /** A box on disk from before setup tracking: it was set up then, so only start it from now on. */
  private async legacySetup(box: DesiredBox, progress: (line: string) => void): Promise<BoxSetupRecord> {
    const image = await this.opts.images.ensure(imageOf(box.image, box.setup), progress);
    return { image: { rootfs: image.rootfs, digest: image.digest }, postCreateDone: true, hostname: box.name };
  }


  /** Steps one box until it matches its desired state, a step fails, or the desired set changes. */
  private async reconcileBox(boxId: string): Promise<void> {
    for (let steps = 0; steps < 6; steps++) {
      const box = this.state.desired?.boxes.find((b) => b.boxId === boxId);
      if (!box) return;
      this.opts.driver.assign?.(boxId, box.runtime);
      const observed = await this.opts.driver.inspect(boxId);
      // A box that ended without being asked to (a VM's QEMU killed or crashed) is reported with
      // the reason before the step that brings it back, so the user sees why it restarted.
      if (observed.failure && observed.state === 'stopped') this.report(box, 'stopped', observed.ip ?? null, observed.failure);
      if (observed.state === 'absent' && box.restoreFrom && box.desiredState !== 'deleted') {
        // A paused box moved here from another node: fetch its snapshot, then it is paused here.
        if (this.state.failedOperations[boxId] === box.operationId) return;
        try {
          await this.importMovedBox(box, box.restoreFrom);
        } catch (e) {
          this.state.failedOperations[boxId] = box.operationId;
          saveAgentState(this.stateFile, this.state);
          this.report(box, 'provisioning', null, `move failed: ${errorText(e)}`, this.takePendingProgress(boxId));
          return;
        }
        continue;
      }
      const step = decideNodeStep(box.desiredState, observed.state);
      if (step.kind === 'none') {
        if (observed.state === 'running' || observed.state === 'paused') {
          try {
            await this.syncSecrets(box);
          } catch (e) {
            this.log('writing box secrets failed', { boxId, err: redactSecrets(errorText(e), box.secrets) });
          }
        }
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
              this.log('setup', { boxId, line: redactSecrets(line, box.secrets) });
              this.progress(box, step.phase, line);
            };
            // Before the box starts: its hooks and first sessions see them.
            if (step.kind === 'start') await this.syncSecrets(box, true);
            const known = this.state.setup[boxId];
            if (observed.state === 'absent' && box.forkOf) {
              // A fork is a clone of a box of this node, not a fresh setup.
              const source = this.state.setup[box.forkOf];
              if (!source) throw new Error(`the box to fork (${box.forkOf}) is not on this node`);
              progress(`cloning ${box.forkOf}`);
              this.state.setup[boxId] = await this.provisioner.fork(box, source);
              saveAgentState(this.stateFile, this.state);
            } else if (observed.state === 'absent' || !known) {
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
            this.secretsWritten.delete(boxId);
            break;
          case 'pause':
            await d.pause(boxId);
            break;
          case 'resume':
            // Refreshed before the box thaws, so nothing in it reads a set that changed meanwhile.
            await this.syncSecrets(box, true);
            await d.resume(boxId);
            break;
          case 'destroy':
            await d.destroy(boxId);
            this.secretsWritten.delete(boxId);
            delete this.state.setup[boxId];
            saveAgentState(this.stateFile, this.state);
            break;
        }
      } catch (e) {
        clearTimeout(transient);
        this.metrics.stepErrors.inc({ step: step.kind });
        const message = errorText(e);
        this.log('box step failed', { boxId, step: step.kind, err: redactSecrets(message, box.secrets) });
        this.state.failedOperations[boxId] = box.operationId;
        saveAgentState(this.stateFile, this.state);
        const now = await this.opts.driver.inspect(boxId).catch(() => observed);
        // A start that failed before the box existed (image, checkout, hook) leaves nothing behind:
        // the secrets written for it are removed now, since no later step would see the box.
        if (now.state === 'absent') await this.opts.driver.destroy(boxId).catch(() => undefined);
        const phase: Phase = now.state === 'absent' ? (box.desiredState === 'deleted' ? 'deleting' : 'provisioning') : now.state;
        this.report(box, phase, now.ip ?? null, `${step.kind} failed: ${message}`, this.takePendingProgress(boxId));
        return;
      }
      clearTimeout(transient);
      timer();
      const after = await this.opts.driver.inspect(boxId);
      this.report(box, step.then, after.ip ?? null, null, this.takePendingProgress(boxId) || (step.kind === 'start' || step.kind === 'resume' ? this.runtimeNote(box) : ''));
    }
  }

  /** Pulls a moved box's snapshot bundle from the agent of the node it was paused on and imports it. */
  private async importMovedBox(box: DesiredBox, from: { agentUrl: string; token: string }): Promise<void> {
    const d = this.opts.driver;
    if (!d.importSnapshot) throw new Error(`runtime ${d.name} cannot take boxes from other nodes`);
    const progress = (line: string) => this.progress(box, 'provisioning', line);
    const image = await this.opts.images.ensure(imageOf(box.image, box.setup), progress);
    const setup: BoxSetupRecord = { image: { rootfs: image.rootfs, digest: image.digest }, postCreateDone: true, hostname: box.name };
    progress(`fetching the paused box from ${from.agentUrl}`);
    const res = await fetch(`${from.agentUrl}/v1/boxes/${box.boxId}/snapshot`, { headers: { authorization: `Bearer ${from.token}` } });
    if (!res.ok || !res.body) throw new Error(`the previous node did not hand over the snapshot (${res.status}): ${(await res.text()).slice(0, 300)}`);
    await d.importSnapshot(this.provisioner.spec(box, setup), Readable.fromWeb(res.body as import('node:stream/web').ReadableStream));
    this.state.setup[box.boxId] = setup;
    saveAgentState(this.stateFile, this.state);
  }

  /** What the box runs on, for its event timeline: a microVM's accelerator and guest kernel. */
  private runtimeNote(box: DesiredBox): string {
    if (box.runtime !== 'microvm') return '';
    const labels = this.opts.driver.nodeLabels?.() ?? {};
    return labels['microvm.accel'] ? `microVM under ${labels['microvm.accel'].toUpperCase()}, guest kernel ${labels['microvm.kernel'] ?? '?'}` : '';
  }

  /** Writes the box's secrets if they changed since last written (or always, with `force`). */
  private async syncSecrets(box: DesiredBox, force = false): Promise<void> {
    const write = this.opts.driver.writeSecrets?.bind(this.opts.driver);
    // A set loaded from the state file has no secrets: writing it would wipe the box's until the server is back.
    if (!write || !this.secretsFresh) return;
    const json = JSON.stringify(box.secrets);
    if (!force && this.secretsWritten.get(box.boxId) === json) return;
    await write(box.boxId, box.secrets);
    this.secretsWritten.set(box.boxId, json);
  }

  /** Reports a progress line of a long step, at most a few times a second. */
  private progress(box: DesiredBox, phase: Phase, message: string): void {
    const now = Date.now();
    const wait = PROGRESS_INTERVAL_MS - (now - (this.lastProgressAt.get(box.boxId) ?? 0));
    if (wait <= 0) {
      this.lastProgressAt.set(box.boxId, now);
      this.report(box, phase, null, null, message);
      return;
    }
    // Lines in between are dropped, but the latest one is sent when the interval ends: a burst
    // (a fast build) still shows where it got to.
    const pending = this.pendingProgress.get(box.boxId);
    if (pending) pending.message = message;
    else {
      const entry = { message, timer: setTimeout(() => {
        this.pendingProgress.delete(box.boxId);
        this.lastProgressAt.set(box.boxId, Date.now());
        this.report(box, phase, null, null, entry.message);
      }, wait) };
      this.pendingProgress.set(box.boxId, entry);
    }
  }

  /**
   * The progress line still waiting for its interval, taken so it goes out with the step's final
   * report: sent later on its own, it would carry the step's transient phase after the outcome.
   */
  private takePendingProgress(boxId: string): string {
    const pending = this.pendingProgress.get(boxId);
    if (!pending) return '';
    clearTimeout(pending.timer);
    this.pendingProgress.delete(boxId);
    return pending.message;
  }

  private report(box: DesiredBox, phase: Phase, ip: string | null, error: string | null = null, message = ''): void {
    // Hook output and errors become events on the server: never with a secret value in them.
    error = error === null ? null : redactSecrets(error, box.secrets).slice(0, REPORT_TEXT_MAX);
    // A progress line can be any program's output; the server refuses a report with a longer one.
    message = redactSecrets(message, box.secrets).slice(0, REPORT_TEXT_MAX);
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
      if (this.pendingReports.size === 0 && this.pendingPrebuilds.length === 0) return;
    }
    if (!this.state.nodeId || (this.pendingReports.size === 0 && this.pendingPrebuilds.length === 0)) return;
    const batch = [...this.pendingReports.values()];
    const prebuilds = this.pendingPrebuilds.splice(0);
    this.pendingReports.clear();
    this.flushing = this.client
      .reportStatus(this.state.nodeId, batch, prebuilds)
      .then(() => {
        this.connected = true;
      })
      .catch(() => {
        this.connected = false;
        // Keep the newest report per box for the next attempt (after reconnecting).
        for (const r of batch) if (!this.pendingReports.has(r.boxId)) this.pendingReports.set(r.boxId, r);
        this.pendingPrebuilds.unshift(...prebuilds);
      })
      .finally(() => {
        this.flushing = null;
      });
    await this.flushing;
    if ((this.pendingReports.size > 0 || this.pendingPrebuilds.length > 0) && this.connected) void this.flushReports();
  }

  /** Queues the outcome of a prebuild for the control plane (each prebuild id once per process). */
  private reportPrebuild(templateName: string, templateVersion: number, outcome: { prebuild: Prebuild } | { error: unknown; logTail: string[] }): void {
    if ('prebuild' in outcome) {
      const pb = outcome.prebuild;
      if (this.reportedPrebuilds.has(pb.id)) return;
      this.reportedPrebuilds.add(pb.id);
      this.pendingPrebuilds.push({ prebuildId: pb.id, templateName, templateVersion, commit: pb.commit, status: 'ready', error: null, logTail: pb.logTail.slice(-100) });
    } else {
      const message = errorText(outcome.error);
      const key = `${templateName}:${templateVersion}:${message}`;
      if (this.reportedPrebuilds.has(key)) return;
      this.reportedPrebuilds.add(key);
      const id = `failed-${createHash('sha256').update(key).digest('hex').slice(0, 24)}`;
      this.pendingPrebuilds.push({ prebuildId: id, templateName, templateVersion, commit: '', status: 'failed', error: message, logTail: outcome.logTail.slice(-100) });
    }
    void this.flushReports();
  }

  /**
   * Keeps the prebuild of every desired template current: the builder resolves the tracked ref
   * and builds only when the commit (or the template) changed, so this is cheap when nothing did.
   * One pass at a time, in the background: boxes never wait for it (a box whose prebuild is not
   * ready builds or awaits the same one through the builder's in-process dedupe).
   */
  private prebuildPass(): void {
    const builder = this.opts.prebuilds;
    const wanted = this.state.desired?.prebuilds ?? [];
    if (!builder || wanted.length === 0 || this.prebuilding) return;
    this.prebuilding = (async () => {
      for (const p of wanted) {
        if (this.abort.signal.aborted) return;
        const log: string[] = [];
        try {
          const image = await this.opts.images.ensure(imageOf(p.image, p.setup));
          const pb = await builder.build(prebuildRequest(image, p.setup, await this.provisioner.credentials(p.setup)), (line) => log.push(line));
          this.currentPrebuilds.set(`${p.templateName}:${p.templateVersion}`, { imageDigest: image.digest, prebuild: pb });
          this.reportPrebuild(p.templateName, p.templateVersion, { prebuild: pb });
        } catch (e) {
          this.log('prebuild failed', { template: p.templateName, version: p.templateVersion, err: errorText(e) });
          const tail = (e as { logTail?: string[] }).logTail ?? log.slice(-100);
          this.reportPrebuild(p.templateName, p.templateVersion, { error: e, logTail: tail });
        }
      }
    })().finally(() => {
      this.prebuilding = null;
    });
  }
}

/**
 * Replaces secret values in text that leaves the agent (reports, events, logs), the way CI systems
 * mask them: whole values of 4 characters or more, and each line of 8 or more of a multi-line value.
 */
export function redactSecrets(text: string, secrets: readonly { value: string }[] | undefined): string {
  if (!text || !secrets?.length) return text;
  const needles = new Set<string>();
  for (const { value } of secrets) {
    if (value.length >= 4) needles.add(value);
    if (value.includes('\n')) for (const line of value.split(/\r?\n/)) if (line.trim().length >= 8) needles.add(line.trim());
  }
  let out = text;
  for (const n of [...needles].sort((a, b) => b.length - a.length)) out = out.split(n).join('***');
  return out;
}

/** An error as one report message: the first line plus, for hooks and builds, the log tail. */
function errorText(e: unknown): string {
  const lines = String((e as Error)?.message ?? e).split('\n');
  return lines.slice(0, 30).join('\n').slice(0, 4000);
}
