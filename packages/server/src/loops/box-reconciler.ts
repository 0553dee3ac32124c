/**
 * The server-side box reconciler. For each box it takes a lease with a fencing
 * token, reads the whole box, asks `decideBox` what to do, and performs that one step in a
 * transaction that re-checks the lease, so a worker that lost its lease cannot write. It is woken by
 * the change feed and also resyncs every box periodically, so a lost wake-up only delays work.
 */
import { decideBox, DEFAULT_RETRY_POLICY, type BoxDecision, type RetryPolicy } from '@devyard/core/box-reconcile';
import { DomainError } from '@devyard/core/domain-error';
import { add, computeOnly, diskOnly, shortfall, subtract, type Resources } from '@devyard/core/resources';
import { describeRejection, schedule } from '@devyard/core/scheduler';
import type { ChangeFeed } from '../change-feed.js';
import { setCondition, type BoxRecord } from '../store/box-records.js';
import type { Executor, Store } from '../store/store.js';
import { nodeSnapshot } from '../services/scheduler-nodes.js';
import { orgOfBox, type AuditLog } from '../audit/audit-log.js';

export interface ReconcilerOptions {
  /** Name of this worker; leases are held in its name. */
  holder: string;
  leaseTtlMs?: number;
  resyncMs?: number;
  retry?: RetryPolicy;
  log?: (msg: string, fields?: Record<string, unknown>) => void;
  /** Whether a lease holder is known to be dead (see `deadLocalHolder`); its leases are taken over at once. */
  holderIsDead?: (holder: string) => boolean;
  /** Called on every unexpected reconcile error (for metrics). */
  onError?: () => void;
  /** Where the reconciler's decisions (placing, failing, deleting boxes) are recorded, in the same transaction. */
  audit?: AuditLog;
}

/** The actor of the reconciler's audit entries. */
export const RECONCILER_ACTOR = 'system:box-reconciler';

/** An audit entry for a write: the action and context beyond the box's id and owner. */
interface WriteAudit {
  action: string;
  detail?: Record<string, unknown>;
}

const UNSCHEDULABLE_RETRY_MS = 3000;

export class BoxReconciler {
  private readonly due = new Map<string, number>();
  private timer: NodeJS.Timeout | undefined;
  private resyncTimer: NodeJS.Timeout | undefined;
  private running = false;
  private stopped = true;
  private readonly onBox = (b: BoxRecord) => this.enqueue(b.id, 0);
  private readonly leaseTtlMs: number;
  private readonly retry: RetryPolicy;

  constructor(
    private readonly store: Store,
    private readonly feed: ChangeFeed,
    private readonly now: () => number,
    private readonly opts: ReconcilerOptions,
  ) {
    this.leaseTtlMs = opts.leaseTtlMs ?? 30_000;
    this.retry = opts.retry ?? DEFAULT_RETRY_POLICY;
  }

  start(): void {
    this.stopped = false;
    this.feed.on('box', this.onBox);
    const resync = async () => {
      try {
        for (const b of await this.store.listBoxes()) this.enqueue(b.id, 0);
      } catch (e) {
        this.opts.log?.('resync failed', { err: String(e) });
      }
    };
    void resync();
    this.resyncTimer = setInterval(resync, this.opts.resyncMs ?? 5000);
  }

  async stop(): Promise<void> {
    this.stopped = true;
    this.feed.off('box', this.onBox);
    clearInterval(this.resyncTimer);
    clearTimeout(this.timer);
    while (this.running) await new Promise((r) => setTimeout(r, 5));
  }

  /** Number of boxes waiting for a pass (the reconcile queue depth). */
  get queueDepth(): number {
    return this.due.size;
  }

  enqueue(boxId: string, delayMs: number): void {
    const at = this.now() + delayMs;
    const prev = this.due.get(boxId);
    if (prev === undefined || at < prev) this.due.set(boxId, at);
    this.schedulePump();
  }

  private schedulePump(): void {
    if (this.stopped || this.running) return;
    clearTimeout(this.timer);
    const next = Math.min(...this.due.values());
    if (!Number.isFinite(next)) return;
    this.timer = setTimeout(() => void this.pump(), Math.max(0, next - this.now()));
  }

  private async pump(): Promise<void> {
    if (this.running || this.stopped) return;
    this.running = true;
    try {
      for (;;) {
        const now = this.now();
        const ready = [...this.due.entries()].filter(([, at]) => at <= now).map(([id]) => id);
        if (ready.length === 0 || this.stopped) break;
        for (const id of ready) {
          this.due.delete(id);
          const requeue = await this.reconcileSafely(id);
          if (requeue !== null) this.enqueue(id, requeue);
        }
      }
    } finally {
      this.running = false;
      this.schedulePump();
    }
  }

  private async reconcileSafely(boxId: string): Promise<number | null> {
    try {
      return await this.reconcile(boxId);
    } catch (e) {
      // Conflicts and stale leases mean someone else moved the box: look again soon.
      const expected = e instanceof DomainError && (e.code === 'conflict' || e.code === 'stale-lease');
      if (!expected) {
        this.opts.log?.('reconcile error', { boxId, err: String(e) });
        this.opts.onError?.();
      }
      return expected ? 50 : 1000;
    }
  }

  /** One pass over one box. Returns when to look again (ms), or null when it is settled. */
  async reconcile(boxId: string): Promise<number | null> {
    const leaseName = `box:${boxId}`;
    const token = await this.store.acquireLease(leaseName, this.opts.holder, this.leaseTtlMs, this.now(), this.opts.holderIsDead);
    if (token === null) return this.leaseTtlMs / 2;
    try {
      const box = await this.store.getBox(boxId);
      if (!box) return null;
      const decision = decideBox({ ...box, finalized: box.deletedAt !== null, moving: box.moveFromNodeId !== null }, this.now(), this.retry);
      return await this.perform(box, decision, leaseName, token);
    } finally {
      await this.store.releaseLease(leaseName, this.opts.holder, token);
    }
  }

  private async perform(box: BoxRecord, d: BoxDecision, leaseName: string, token: number): Promise<number | null> {
    switch (d.kind) {
      case 'done':
        return null;
      case 'wait':
        return d.requeueAfterMs;
      case 'schedule':
        return this.scheduleBox(box, leaseName, token);
      case 'reserve-compute':
        return this.reserveCompute(box, leaseName, token);
      case 'release-compute':
        await this.write(box, leaseName, token, async (tx, now) => {
          const node = box.nodeId ? await this.store.getNode(box.nodeId, tx) : undefined;
          if (node) await this.store.updateNode({ ...node, allocated: subtract(node.allocated, computeOnly(box.resources)) }, node.version, tx);
          return { next: { ...box, computeReserved: false, updatedAt: now }, event: null };
        });
        return 0;
      case 'retry':
        await this.write(box, leaseName, token, async (_tx, now) => ({
          next: { ...box, attempt: d.attempt, nextAttemptAt: null, updatedAt: now },
          event: { type: 'Retrying', message: `retrying (attempt ${d.attempt} of ${this.retry.maxAttempts})` },
        }));
        return 0;
      case 'fail':
        await this.write(box, leaseName, token, async (_tx, now) => ({
          next: {
            ...box,
            phase: 'failed',
            lastError: box.lastError && { ...box.lastError, message: d.reason },
            updatedAt: now,
            conditions: setCondition(box.conditions, { type: 'Ready', status: 'False', reason: 'Failed', message: d.reason }, now),
          },
          event: { type: 'Failed', message: d.reason },
          audit: { action: 'failBox', detail: { reason: d.reason } },
        }));
        return null;
      case 'abort-move':
        return this.abortMove(box, d.reason, leaseName, token);
      case 'finalize-delete':
        await this.write(box, leaseName, token, async (tx, now) => {
          const node = box.nodeId ? await this.store.getNode(box.nodeId, tx) : undefined;
          if (node) {
            const held = box.computeReserved ? box.resources : diskOnly(box.resources);
            await this.store.updateNode({ ...node, allocated: subtract(node.allocated, held) }, node.version, tx);
          }
          return {
            next: { ...box, phase: 'deleted', computeReserved: false, deletedAt: now, updatedAt: now },
            event: { type: 'Deleted', message: 'box deleted; its name is free again' },
            audit: { action: 'finalizeBoxDelete', detail: { node: node?.name ?? null } },
          };
        });
        return null;
    }
  }

  /** Writes the box (and whatever fn wrote) only if the lease is still ours. */
  private async write(
    box: BoxRecord,
    leaseName: string,
    token: number,
    fn: (tx: Executor, now: number) => Promise<{ next: BoxRecord; event: { type: string; message: string } | null; audit?: WriteAudit }>,
  ): Promise<BoxRecord> {
    const saved = await this.store.transaction(async (tx) => {
      const now = this.now();
      await this.store.assertLease(leaseName, this.opts.holder, token, now, tx);
      const { next, event, audit } = await fn(tx, now);
      const stored = await this.store.updateBox(next, box.version, tx);
      if (event) await this.store.appendEvent({ boxId: box.id, boxName: box.name, owner: box.owner, time: now, type: event.type, phase: stored.phase, message: event.message }, tx);
      if (audit && this.opts.audit) {
        await this.opts.audit.append(
          { orgId: orgOfBox(stored), actor: RECONCILER_ACTOR, action: audit.action, target: `box/${box.name}`, result: 'ok', detail: { boxId: box.id, owner: box.owner, ...audit.detail }, time: now },
          tx,
        );
      }
      return stored;
    });
    this.feed.emit('box', saved);
    if (saved.nodeId) this.feed.emit('node', saved.nodeId);
    return saved;
  }

  private async scheduleBox(box: BoxRecord, leaseName: string, token: number): Promise<number | null> {
    const now = this.now();
    const nodes = await this.store.listNodes();
    const wantsCompute = box.desiredState === 'running' || box.desiredState === 'paused';
    const request: Resources = wantsCompute ? box.resources : diskOnly(box.resources);
    const result = schedule(nodes.map((n) => nodeSnapshot(n, now)), { runtime: box.runtime, resources: request, image: box.image });
    if (!result.ok) {
      const message = describeRejection(result.reasons);
      await this.markUnschedulable(box, leaseName, token, message);
      return UNSCHEDULABLE_RETRY_MS;
    }
    const node = nodes.find((n) => n.id === result.nodeId)!;
    await this.write(box, leaseName, token, async (tx, t) => {
      // Optimistic on the node's version: if another box took the capacity meanwhile, this throws
      // a conflict and the next pass schedules against fresh numbers.
      await this.store.updateNode({ ...node, allocated: add(node.allocated, request) }, node.version, tx);
      return {
        next: {
          ...box,
          nodeId: node.id,
          computeReserved: wantsCompute,
          phase: box.desiredState === 'deleted' ? box.phase : 'provisioning',
          updatedAt: t,
          conditions: setCondition(box.conditions, { type: 'Scheduled', status: 'True', reason: 'Scheduled', message: `placed on ${node.name}` }, t),
        },
        event: { type: 'Scheduled', message: `placed on node ${node.name}` },
        audit: { action: 'scheduleBox', detail: { node: node.name } },
      };
    });
    return 0;
  }

  private async reserveCompute(box: BoxRecord, leaseName: string, token: number): Promise<number | null> {
    const node = box.nodeId ? await this.store.getNode(box.nodeId) : undefined;
    if (!node) return UNSCHEDULABLE_RETRY_MS;
    const short = shortfall(node.capacity, node.allocated, computeOnly(box.resources));
    if (short.length > 0) {
      await this.markUnschedulable(box, leaseName, token, `node ${node.name} has no room to start the box: ${short.join(', ')} short`);
      return UNSCHEDULABLE_RETRY_MS;
    }
    await this.write(box, leaseName, token, async (tx, now) => {
      await this.store.updateNode({ ...node, allocated: add(node.allocated, computeOnly(box.resources)) }, node.version, tx);
      return {
        next: { ...box, computeReserved: true, updatedAt: now, conditions: setCondition(box.conditions, { type: 'Scheduled', status: 'True', reason: 'Reserved', message: `compute reserved on ${node.name}` }, now) },
        event: null,
      };
    });
    return 0;
  }

  /**
   * The new node could not import a moving box: bind it to the node it came from again, where it
   * is still paused (that node's desired set kept it so), with its reservation moved back, and a
   * new generation so that node confirms it. The new node is told to delete whatever it has of the
   * box (`cleanupNodeId`). The reservation is taken back even on a node that has filled up
   * meanwhile: the box is there either way, and the event says so.
   */
  private async abortMove(box: BoxRecord, reason: string, leaseName: string, token: number): Promise<number | null> {
    const saved = await this.write(box, leaseName, token, async (tx, now) => {
      const from = await this.store.getNode(box.moveFromNodeId!, tx);
      if (!from) throw new DomainError('internal', `node ${box.moveFromNodeId} that box ${box.name} is moving from is gone`, { boxId: box.id });
      const to = box.nodeId ? await this.store.getNode(box.nodeId, tx) : undefined;
      if (to) await this.store.updateNode({ ...to, allocated: subtract(to.allocated, box.computeReserved ? box.resources : diskOnly(box.resources)) }, to.version, tx);
      const short = shortfall(from.capacity, from.allocated, box.resources);
      await this.store.updateNode({ ...from, allocated: add(from.allocated, box.resources) }, from.version, tx);
      const over = short.length > 0 ? ` (node ${from.name} is over its capacity now: ${short.join(', ')} short)` : '';
      const message = `move to node ${to?.name ?? box.nodeId} failed: ${reason}; the box stays paused on node ${from.name}${over}`;
      return {
        next: {
          ...box,
          nodeId: from.id,
          moveFromNodeId: null,
          cleanupNodeId: to?.id ?? null,
          computeReserved: true,
          phase: 'paused',
          generation: box.generation + 1,
          attempt: 1,
          lastError: null,
          nextAttemptAt: null,
          updatedAt: now,
          conditions: setCondition(box.conditions, { type: 'Scheduled', status: 'True', reason: 'MoveFailed', message }, now),
        },
        event: { type: 'MoveFailed', message },
        audit: { action: 'abortBoxMove', detail: { failedNode: to?.name ?? null, backOn: from.name, reason } },
      };
    });
    // The failed node's desired set changed too (the box is to be deleted there).
    if (saved.cleanupNodeId) this.feed.emit('node', saved.cleanupNodeId);
    return 0;
  }

  private async markUnschedulable(box: BoxRecord, leaseName: string, token: number, message: string): Promise<void> {
    const prev = box.conditions.find((c) => c.type === 'Scheduled');
    if (prev?.status === 'False' && prev.message === message) return;
    await this.write(box, leaseName, token, async (_tx, now) => ({
      next: {
        ...box,
        phase: box.nodeId === null && box.desiredState !== 'deleted' ? 'pending' : box.phase,
        updatedAt: now,
        conditions: setCondition(box.conditions, { type: 'Scheduled', status: 'False', reason: 'Unschedulable', message }, now),
      },
      event: { type: 'Unschedulable', message },
    }));
  }
}

/**
 * Holder names are `<hostname>:<pid>`. A holder on this host whose process no longer exists is
 * dead: a server restarted after a crash need not wait for the leases of its previous self.
 * Holders on other hosts are never presumed dead (their leases expire on their own).
 */
export function deadLocalHolder(host: string): (holder: string) => boolean {
  return (holder) => {
    const m = /^(.*):(\d+)$/.exec(holder);
    if (!m || m[1] !== host) return false;
    const pid = Number(m[2]);
    if (pid === process.pid) return false;
    try {
      process.kill(pid, 0);
      return false;
    } catch (e) {
      return (e as NodeJS.ErrnoException).code === 'ESRCH';
    }
  };
}
