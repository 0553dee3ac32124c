/**
 * A small, explicit model of the whole lifecycle built only from the core decisions: an API that
 * applies `planVerb`, server reconciler workers that apply `decideBox` under a fenced lease, node
 * agents that apply `decideNodeStep` to the desired set derived with `agentDesired`, and an
 * unreliable report channel between them. fast-check interleaves everything and injects faults;
 * safety invariants are checked after every step, liveness after a fair quiet period.
 *
 * The model doubles as the specification of how server and agent interact:
 * - the store accepts a write only from the current lease holder (fencing token) and only if every
 *   row it read is unchanged (version = optimistic concurrency); binding a box and reserving
 *   capacity on the node happen in one such write;
 * - the agent reconciles against the desired set it last synced (it may be stale), reports the
 *   phase of what it does and of what it sees, and does a failed operation id never again;
 * - the store accepts a report only if its generation >= observedGeneration, records an agent error
 *   only for the current operation id (once), and never lets a report take a box out of `failed`.
 */
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { planVerb, TARGET_PHASE, type DesiredState, type Phase, type Verb } from '@devyard/core/box-lifecycle';
import { agentDesired, backoffMs, decideBox, type AgentDesiredBox, type BoxReconcileState, type RetryPolicy } from '@devyard/core/box-reconcile';
import { isDomainError } from '@devyard/core/domain-error';
import { decideNodeStep, settledPhase, type NodeStep, type ObservedRuntimeState } from '@devyard/core/node-reconcile';
import { add, computeOnly, diskOnly, shortfall, subtract, ZERO, type Resources } from '@devyard/core/resources';
import { schedule, type NodeSnapshot } from '@devyard/core/scheduler';

const POLICY: RetryPolicy = { maxAttempts: 2, baseBackoffMs: 1000, maxBackoffMs: 4000 };
const LEASE_MS = 10_000;
const GiB = 1024 ** 3;

// ───────────────────────────── the store ─────────────────────────────

interface StoredBox extends BoxReconcileState {
  id: string;
  resources: Resources;
  /** Optimistic concurrency: bumped by every write. */
  version: number;
  /** What the user sees once the box failed. */
  failReason: string | null;
}

interface StoredNode {
  id: string;
  capacity: Resources;
  allocated: Resources;
  version: number;
}

interface Store {
  now: number;
  boxes: StoredBox[];
  nodes: StoredNode[];
  lease: { token: number; holder: number | null; expiresAt: number };
}

/** What a box holds on its node right now. */
function reservation(b: StoredBox): Resources {
  if (b.finalized || b.nodeId === null) return ZERO;
  return b.computeReserved ? b.resources : diskOnly(b.resources);
}

/** One fenced, version-checked transaction of a reconciler worker. */
interface Write {
  token: number;
  boxes: Array<{ expectVersion: number; next: StoredBox }>;
  nodes: Array<{ expectVersion: number; next: StoredNode }>;
}

function commit(s: Store, w: Write): 'ok' | 'stale-lease' | 'conflict' {
  if (w.token !== s.lease.token) return 'stale-lease';
  for (const b of w.boxes) if (s.boxes.find((x) => x.id === b.next.id)!.version !== b.expectVersion) return 'conflict';
  for (const n of w.nodes) if (s.nodes.find((x) => x.id === n.next.id)!.version !== n.expectVersion) return 'conflict';
  for (const b of w.boxes) s.boxes[s.boxes.findIndex((x) => x.id === b.next.id)] = { ...b.next, version: b.expectVersion + 1 };
  for (const n of w.nodes) s.nodes[s.nodes.findIndex((x) => x.id === n.next.id)] = { ...n.next, version: n.expectVersion + 1 };
  return 'ok';
}

/** The API: a verb changes only the desired state (a new generation, a fresh retry budget). */
function apiVerb(s: Store, boxIdx: number, verb: Verb): void {
  const b = s.boxes[boxIdx % s.boxes.length]!;
  if (b.finalized) return; // 404
  try {
    const plan = planVerb(b, verb);
    if (!plan.changed) return;
    Object.assign(b, {
      desiredState: plan.desiredState,
      phase: plan.phase,
      generation: b.generation + 1,
      attempt: 1,
      nextAttemptAt: null,
      failReason: null,
      version: b.version + 1,
    });
  } catch (e) {
    if (!isDomainError(e) || e.code !== 'invalid-state') throw e;
  }
}

interface Report {
  boxId: string;
  nodeId: string;
  generation: number;
  operationId: string;
  phase: Phase;
  error?: string;
}

/** The report endpoint. */
function acceptReport(s: Store, r: Report): void {
  const b = s.boxes.find((x) => x.id === r.boxId);
  if (!b || b.finalized || b.nodeId !== r.nodeId) return;
  if (r.generation < b.observedGeneration) return; // stale
  b.observedGeneration = r.generation;
  if (b.phase !== 'failed') b.phase = r.phase; // only a verb (a new generation) leaves `failed`
  const current = agentDesired(b).operationId;
  const known = b.lastError?.generation === b.generation && b.lastError.attempt === b.attempt;
  if (r.error !== undefined && r.operationId === current && !known) {
    b.lastError = { generation: b.generation, attempt: b.attempt, message: r.error };
    b.nextAttemptAt = s.now + backoffMs(POLICY, b.attempt);
  }
  b.version++;
}

// ───────────────────────────── reconciler workers ─────────────────────────────

interface Worker {
  id: number;
  /** The fencing token this worker believes it holds, and until when (its own view). */
  token: number | null;
  believedUntil: number;
  /** In-memory reads, lost on a crash. */
  reads: Map<number, { box: StoredBox; nodes: StoredNode[] }>;
}

function ensureLease(s: Store, w: Worker): boolean {
  if (w.token !== null && s.now < w.believedUntil) {
    if (s.lease.token === w.token) s.lease.expiresAt = w.believedUntil = s.now + LEASE_MS;
    return true; // a stale holder does not know yet: the store will refuse its writes
  }
  if (s.lease.expiresAt <= s.now || s.lease.holder === w.id) {
    s.lease = { token: s.lease.token + 1, holder: w.id, expiresAt: s.now + LEASE_MS };
    w.token = s.lease.token;
    w.believedUntil = s.lease.expiresAt;
    return true;
  }
  return false;
}

function readBox(s: Store, w: Worker, boxIdx: number): void {
  w.reads.set(boxIdx, { box: structuredClone(s.boxes[boxIdx]!), nodes: structuredClone(s.nodes) });
}

function snapshots(nodes: StoredNode[], boxes: StoredBox[], req: StoredBox): NodeSnapshot[] {
  return nodes.map((n) => ({
    id: n.id,
    name: n.id,
    ready: true,
    cordoned: false,
    runtimes: ['sandbox'],
    arch: 'amd64',
    region: null,
    capacity: n.capacity,
    allocated: n.allocated,
    images: [],
    orgBoxes: boxes.filter((b) => b.nodeId === n.id && !b.finalized && b.id !== req.id).length,
  }));
}

interface Stats {
  staleLease: number;
  conflicts: number;
  retries: number;
  fails: number;
  finalized: number;
  releases: number;
  staleReports: number;
}

/**
 * Performs the decided step from what the worker read (possibly long ago) as one transaction.
 * Returns the decision kind, or the store's refusal.
 */
function act(s: Store, w: Worker, boxIdx: number, stats: Stats): string {
  const read = w.reads.get(boxIdx);
  w.reads.delete(boxIdx);
  if (!read || w.token === null) return 'no-read';
  const { box, nodes } = read;
  const d = decideBox(box, s.now, POLICY);
  const next: StoredBox = { ...box };
  const nodeWrites: Write['nodes'] = [];
  const wantsCompute = box.desiredState === 'running' || box.desiredState === 'paused';
  const nodeOf = (id: string) => nodes.find((n) => n.id === id)!;
  const change = (id: string, f: (r: Resources) => Resources) => {
    const n = nodeOf(id);
    nodeWrites.push({ expectVersion: n.version, next: { ...n, allocated: f(n.allocated) } });
  };
  switch (d.kind) {
    case 'done':
    case 'wait':
      return d.kind;
    case 'schedule': {
      const res = schedule(snapshots(nodes, s.boxes, box), { runtime: 'sandbox', resources: box.resources });
      if (!res.ok) return 'no-fit';
      next.nodeId = res.nodeId;
      next.computeReserved = wantsCompute;
      next.phase = 'scheduling';
      change(res.nodeId, (a) => add(a, wantsCompute ? box.resources : diskOnly(box.resources)));
      break;
    }
    case 'reserve-compute': {
      const n = nodeOf(box.nodeId!);
      if (shortfall(n.capacity, n.allocated, computeOnly(box.resources)).length > 0) return 'no-fit';
      next.computeReserved = true;
      change(n.id, (a) => add(a, computeOnly(box.resources)));
      break;
    }
    case 'release-compute':
      next.computeReserved = false;
      change(box.nodeId!, (a) => subtract(a, computeOnly(box.resources)));
      break;
    case 'retry':
      next.attempt = d.attempt;
      next.nextAttemptAt = null;
      break;
    case 'fail':
      next.phase = 'failed';
      next.failReason = d.reason;
      break;
    case 'finalize-delete':
      if (box.nodeId !== null) change(box.nodeId, (a) => subtract(a, reservation(box)));
      next.finalized = true;
      next.computeReserved = false;
      break;
  }
  const result = commit(s, { token: w.token, boxes: [{ expectVersion: box.version, next }], nodes: nodeWrites });
  if (result === 'stale-lease') {
    stats.staleLease++;
    w.token = null; // it learns it lost the lease
    return result;
  }
  if (result === 'conflict') {
    stats.conflicts++;
    return result;
  }
  if (d.kind === 'retry') stats.retries++;
  if (d.kind === 'fail') stats.fails++;
  if (d.kind === 'finalize-delete') stats.finalized++;
  if (d.kind === 'release-compute') stats.releases++;
  return d.kind;
}

// ───────────────────────────── node agents ─────────────────────────────

interface Agent {
  nodeId: string;
  /** What the runtime shows on the host, per box. */
  runtime: Map<string, ObservedRuntimeState>;
  /** The desired set as last synced from the server (kept while the server is away). */
  desired: Map<string, AgentDesiredBox>;
  /** Operation ids that failed: never done again under the same id. */
  failedOps: Set<string>;
  /** Boxes whose every operation fails on this host for now (a persistent fault, e.g. a bad image). */
  broken: Set<string>;
}

const AFTER_STEP: Record<Exclude<NodeStep['kind'], 'none'>, ObservedRuntimeState> = {
  start: 'running',
  create: 'stopped',
  stop: 'stopped',
  pause: 'paused',
  resume: 'running',
  destroy: 'absent',
};

function syncAgent(s: Store, a: Agent): void {
  a.desired = new Map(s.boxes.filter((b) => b.nodeId === a.nodeId && !b.finalized).map((b) => [b.id, agentDesired(b)]));
}

/** One reconcile pass of an agent; `failBox` makes that box's next operation fail. */
function agentPass(a: Agent, failBox: string | null, out: Report[], failures: Set<string>): void {
  for (const id of new Set([...a.desired.keys(), ...a.runtime.keys()])) {
    const observed = a.runtime.get(id) ?? 'absent';
    const want = a.desired.get(id);
    if (!want) {
      // Not in the desired set at all: an orphan copy, removed without a report.
      if (observed !== 'absent') a.runtime.set(id, 'absent');
      continue;
    }
    const report = (phase: Phase, error?: string) =>
      out.push({ boxId: id, nodeId: a.nodeId, generation: want.generation, operationId: want.operationId, phase, ...(error ? { error } : {}) });
    const step = decideNodeStep(want.desiredState, observed);
    if (step.kind === 'none') {
      report(step.phase);
    } else if (a.failedOps.has(want.operationId)) {
      report(settledPhase(observed), `${step.kind} failed (op ${want.operationId})`);
    } else if (failBox === id || a.broken.has(id)) {
      a.failedOps.add(want.operationId);
      failures.add(`${id}@${want.generation}`);
      report(step.phase);
      report(settledPhase(observed), `${step.kind} failed (op ${want.operationId})`);
    } else {
      report(step.phase);
      a.runtime.set(id, AFTER_STEP[step.kind]);
      report(step.then);
    }
  }
}

// ───────────────────────────── commands ─────────────────────────────

type Cmd =
  | { t: 'verb'; box: number; verb: Verb }
  | { t: 'reconcile'; worker: number; box: number }
  | { t: 'pass'; worker: number }
  | { t: 'read'; worker: number; box: number }
  | { t: 'act'; worker: number; box: number }
  | { t: 'crash'; worker: number }
  | { t: 'expire' }
  | { t: 'sync'; agent: number }
  | { t: 'agent'; agent: number; fail: number | null }
  | { t: 'break'; agent: number; box: number }
  | { t: 'deliver'; pick: number }
  | { t: 'flush'; pick: number }
  | { t: 'duplicate'; pick: number }
  | { t: 'replay'; pick: number }
  | { t: 'tick'; ms: number };

const arbCmd: fc.Arbitrary<Cmd> = fc.oneof(
  { arbitrary: fc.record({ t: fc.constant('verb' as const), box: fc.nat(5), verb: fc.constantFrom<Verb>('start', 'stop', 'pause', 'resume', 'start', 'stop', 'delete') }), weight: 4 },
  { arbitrary: fc.record({ t: fc.constant('reconcile' as const), worker: fc.nat(2), box: fc.nat(5) }), weight: 6 },
  { arbitrary: fc.record({ t: fc.constant('pass' as const), worker: fc.nat(2) }), weight: 3 },
  { arbitrary: fc.record({ t: fc.constant('read' as const), worker: fc.nat(2), box: fc.nat(5) }), weight: 2 },
  { arbitrary: fc.record({ t: fc.constant('act' as const), worker: fc.nat(2), box: fc.nat(5) }), weight: 2 },
  { arbitrary: fc.record({ t: fc.constant('crash' as const), worker: fc.nat(2) }), weight: 1 },
  { arbitrary: fc.record({ t: fc.constant('expire' as const) }), weight: 1 },
  { arbitrary: fc.record({ t: fc.constant('sync' as const), agent: fc.nat(1) }), weight: 4 },
  { arbitrary: fc.record({ t: fc.constant('agent' as const), agent: fc.nat(1), fail: fc.option(fc.nat(5), { freq: 3 }) }), weight: 5 },
  { arbitrary: fc.record({ t: fc.constant('break' as const), agent: fc.nat(1), box: fc.nat(5) }), weight: 1 },
  { arbitrary: fc.record({ t: fc.constant('deliver' as const), pick: fc.nat(50) }), weight: 6 },
  { arbitrary: fc.record({ t: fc.constant('flush' as const), pick: fc.nat(50) }), weight: 3 },
  { arbitrary: fc.record({ t: fc.constant('duplicate' as const), pick: fc.nat(50) }), weight: 1 },
  { arbitrary: fc.record({ t: fc.constant('replay' as const), pick: fc.nat(200) }), weight: 1 },
  { arbitrary: fc.record({ t: fc.constant('tick' as const), ms: fc.constantFrom(100, 1000, 5000, 11_000) }), weight: 2 },
);

const arbRes = fc.record({
  cpuMillis: fc.constantFrom(500, 1000, 2000),
  memoryBytes: fc.constantFrom(1, 2, 4).map((g) => g * GiB),
  diskBytes: fc.constantFrom(10, 20).map((g) => g * GiB),
});

const arbScenario = fc.record({
  boxes: fc.array(fc.record({ resources: arbRes, desired: fc.constantFrom<DesiredState>('running', 'running', 'stopped') }), { minLength: 1, maxLength: 3 }),
  nodes: fc.integer({ min: 1, max: 2 }),
  workers: fc.integer({ min: 2, max: 3 }),
  /** Ample: every node could hold every box; tight: boxes compete for room. */
  tight: fc.boolean(),
  tightCapacity: arbRes.map((r) => ({ cpuMillis: r.cpuMillis * 2, memoryBytes: r.memoryBytes * 2, diskBytes: r.diskBytes * 2 })),
  cmds: fc.array(arbCmd, { minLength: 20, maxLength: 100, size: 'max' }),
});

// ───────────────────────────── invariants ─────────────────────────────

/** A plain check: `expect` on every step of every run would dominate the run time. */
function must(ok: boolean, what: string): void {
  if (!ok) throw new Error(`invariant violated: ${what}`);
}

function checkSafety(s: Store, agents: Agent[]): void {
  for (const b of s.boxes) {
    const copies = agents.filter((a) => {
      const st = a.runtime.get(b.id);
      return st === 'running' || st === 'paused';
    });
    must(copies.length <= 1, `${b.id} has ${copies.length} live copies`);
    for (const a of copies) {
      // The agent never uses capacity the scheduler has not granted.
      must(b.nodeId === a.nodeId, `${b.id} is live on ${a.nodeId} but bound to ${b.nodeId}`);
      must(!b.finalized, `${b.id} is live after its deletion was finalized`);
      must(b.computeReserved, `${b.id} is live on ${a.nodeId} without reserved compute`);
    }
    if (b.finalized) for (const a of agents) must((a.runtime.get(b.id) ?? 'absent') === 'absent', `${b.id} finalized but left on ${a.nodeId}`);
    must(b.observedGeneration <= b.generation, `${b.id} observed a generation from the future`);
  }
  for (const n of s.nodes) {
    const sum = s.boxes.filter((b) => b.nodeId === n.id).map(reservation).reduce(add, ZERO);
    for (const k of ['cpuMillis', 'memoryBytes', 'diskBytes'] as const) {
      must(n.allocated[k] === sum[k], `${n.id} ${k} allocated ${n.allocated[k]} ≠ sum of reservations ${sum[k]}`);
      must(n.allocated[k] >= 0, `${n.id} ${k} allocation is negative`);
      must(n.allocated[k] <= n.capacity[k], `${n.id} ${k} allocated ${n.allocated[k]} over capacity ${n.capacity[k]}`);
    }
  }
}

const EXPECTED_RUNTIME: Record<DesiredState, ObservedRuntimeState> = { running: 'running', paused: 'paused', stopped: 'stopped', deleted: 'absent' };

// ───────────────────────────── the property ─────────────────────────────

describe('lifecycle convergence (model of server + agents)', () => {
  it('stays safe under faults and converges once they stop', () => {
    const stats: Stats = { staleLease: 0, conflicts: 0, retries: 0, fails: 0, finalized: 0, releases: 0, staleReports: 0 };
    fc.assert(
      fc.property(arbScenario, (sc) => {
        const total = sc.boxes.map((b) => b.resources).reduce(add, ZERO);
        const s: Store = {
          now: 1_000_000,
          boxes: sc.boxes.map((b, i) => ({
            id: `b${i}`,
            resources: b.resources,
            desiredState: b.desired,
            phase: 'pending',
            generation: 1,
            observedGeneration: 0,
            nodeId: null,
            computeReserved: false,
            attempt: 1,
            lastError: null,
            nextAttemptAt: null,
            finalized: false,
            version: 1,
            failReason: null,
          })),
          nodes: Array.from({ length: sc.nodes }, (_, i) => ({
            id: `n${i}`,
            capacity: sc.tight ? sc.tightCapacity : total,
            allocated: ZERO,
            version: 1,
          })),
          lease: { token: 0, holder: null, expiresAt: 0 },
        };
        const workers: Worker[] = Array.from({ length: sc.workers }, (_, id) => ({ id, token: null, believedUntil: 0, reads: new Map() }));
        const agents: Agent[] = s.nodes.map((n) => ({ nodeId: n.id, runtime: new Map(), desired: new Map(), failedOps: new Set(), broken: new Set() }));
        const channel: Report[] = [];
        const delivered: Report[] = [];
        const failures = new Set<string>();
        const deliver = (i: number) => {
          const [r] = channel.splice(i, 1);
          const b = s.boxes.find((x) => x.id === r!.boxId)!;
          if (r!.generation < b.observedGeneration) stats.staleReports++;
          acceptReport(s, r!);
          delivered.push(r!);
        };
        const boxIdx = (n: number) => n % s.boxes.length;

        for (const c of sc.cmds) {
          switch (c.t) {
            case 'verb':
              apiVerb(s, c.box, c.verb);
              break;
            case 'reconcile': {
              const w = workers[c.worker % workers.length]!;
              if (ensureLease(s, w)) {
                readBox(s, w, boxIdx(c.box));
                act(s, w, boxIdx(c.box), stats);
              }
              break;
            }
            case 'pass': {
              // A reconciler pass over every box.
              const w = workers[c.worker % workers.length]!;
              for (let i = 0; i < s.boxes.length; i++) {
                if (!ensureLease(s, w)) break;
                readBox(s, w, i);
                act(s, w, i, stats);
              }
              break;
            }
            case 'read': {
              const w = workers[c.worker % workers.length]!;
              if (ensureLease(s, w)) readBox(s, w, boxIdx(c.box));
              break;
            }
            case 'act': {
              // Acts on one of the worker's earlier reads, however old.
              const w = workers[c.worker % workers.length]!;
              const pending = [...w.reads.keys()];
              if (pending.length > 0) act(s, w, pending[c.box % pending.length]!, stats);
              break;
            }
            case 'crash': {
              const w = workers[c.worker % workers.length]!;
              w.reads.clear();
              w.token = null;
              break;
            }
            case 'expire':
              s.lease.expiresAt = s.now; // the holder stalls; it still believes it holds the lease
              break;
            case 'sync':
              syncAgent(s, agents[c.agent % agents.length]!);
              break;
            case 'agent': {
              const fail = c.fail === null ? null : s.boxes[boxIdx(c.fail)]!.id;
              agentPass(agents[c.agent % agents.length]!, fail, channel, failures);
              break;
            }
            case 'break':
              agents[c.agent % agents.length]!.broken.add(s.boxes[boxIdx(c.box)]!.id);
              break;
            case 'deliver':
              if (channel.length > 0) deliver(c.pick % channel.length);
              break;
            case 'flush':
              // Everything in flight arrives, in an order rotated by `pick`.
              while (channel.length > 0) deliver((c.pick * 7) % channel.length);
              break;
            case 'duplicate':
              if (channel.length > 0) channel.push({ ...channel[c.pick % channel.length]! });
              break;
            case 'replay':
              if (delivered.length > 0) channel.push({ ...delivered[c.pick % delivered.length]! });
              break;
            case 'tick':
              s.now += c.ms;
              break;
          }
          checkSafety(s, agents);
          if (channel.length > 200) channel.splice(0, channel.length - 200);
        }

        // Fair quiet period: no faults, everything delivered in order, time moves past every backoff.
        for (const a of agents) a.broken.clear();
        for (let round = 0; round < 12; round++) {
          s.now += LEASE_MS + POLICY.maxBackoffMs + 1;
          for (const a of agents) {
            syncAgent(s, a);
            agentPass(a, null, channel, failures);
          }
          while (channel.length > 0) deliver(0);
          const w = workers[round % workers.length]!;
          must(ensureLease(s, w), 'the quiet-period worker gets the lease');
          for (let i = 0; i < s.boxes.length; i++) {
            for (let step = 0; step < 8; step++) {
              readBox(s, w, i);
              const k = act(s, w, i, stats);
              if (k === 'done' || k === 'wait' || k === 'no-fit') break;
            }
          }
          checkSafety(s, agents);
        }

        for (const b of s.boxes) {
          const d = decideBox(b, s.now, POLICY);
          const where = `${b.id} desired ${b.desiredState} phase ${b.phase} gen ${b.generation}/${b.observedGeneration} → ${d.kind}`;
          if (b.phase === 'failed') {
            expect(failures.has(`${b.id}@${b.generation}`), `${where}: failed without an injected failure`).toBe(true);
            expect(b.failReason, where).toMatch(/failed \(op .*gave up after 2 attempts/);
            expect(d, `${where}: a failed box needs no more work`).toEqual({ kind: 'done' });
            continue;
          }
          if (b.desiredState === 'deleted') {
            expect(b.finalized, where).toBe(true);
            expect(reservation(b)).toEqual(ZERO);
            continue;
          }
          const node = b.nodeId === null ? undefined : s.nodes.find((n) => n.id === b.nodeId);
          const starved =
            (d.kind === 'schedule' && !schedule(snapshots(s.nodes, s.boxes, b), { runtime: 'sandbox', resources: b.resources }).ok) ||
            (d.kind === 'reserve-compute' && shortfall(node!.capacity, node!.allocated, computeOnly(b.resources)).length > 0);
          if (starved) {
            expect(sc.tight, `${where}: starved with ample capacity`).toBe(true);
            continue;
          }
          expect(b.phase, where).toBe(TARGET_PHASE[b.desiredState]);
          expect(b.observedGeneration, where).toBe(b.generation);
          expect(d, where).toEqual({ kind: 'done' });
          const agent = agents.find((a) => a.nodeId === b.nodeId)!;
          expect(agent.runtime.get(b.id) ?? 'absent', where).toBe(EXPECTED_RUNTIME[b.desiredState]);
          expect(b.computeReserved, where).toBe(b.desiredState !== 'stopped');
        }
      }),
      { numRuns: Number(process.env.LC_RUNS ?? 1000) },
    );
    // The run must have exercised the interesting paths, or it proves little.
    for (const [k, v] of Object.entries(stats)) expect(v, k).toBeGreaterThan(0);
  });
});
