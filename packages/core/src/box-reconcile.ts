/**
 * The control plane's reconcile decision for one box: a pure function from the box's current state
 * (read whole on every pass: level-triggered) to the next step. The caller performs the step under
 * the box's lease and calls again; calling twice with the same input gives the same answer, so
 * retries, duplicated wake-ups and crashed workers are harmless.
 */
import { TARGET_PHASE, type DesiredState, type Phase } from './box-lifecycle.js';

/** What the reconciler reads of a box. */
export interface BoxReconcileState {
  desiredState: DesiredState;
  phase: Phase;
  /** Bumped by every accepted change of desired state. */
  generation: number;
  /** The generation the agent last acted on (reported with its phase). */
  observedGeneration: number;
  /** Node the box is bound to, once scheduled. */
  nodeId: string | null;
  /** Whether the box's CPU and memory are reserved on its node (false while stopped). */
  computeReserved: boolean;
  /** Retry counter of the current generation; part of the operation id the agent sees. */
  attempt: number;
  /** Last failure the agent reported, for the generation/attempt it happened in. */
  lastError: { generation: number; attempt: number; message: string } | null;
  /** Earliest time (ms since epoch) the next retry may be issued. */
  nextAttemptAt: number | null;
  /** Set once the deletion is finalized (capacity released, name freed). */
  finalized: boolean;
  /**
   * Whether the box is moving: bound to a new node that is importing its snapshot from the node it
   * was paused on, which still holds it. Absent: false.
   */
  moving?: boolean;
}

export interface RetryPolicy {
  /** Attempts per generation before the box goes to `failed`. */
  maxAttempts: number;
  /** Backoff before retry n (1-based) is base · 2^(n−1), capped. */
  baseBackoffMs: number;
  maxBackoffMs: number;
}

export const DEFAULT_RETRY_POLICY: RetryPolicy = { maxAttempts: 4, baseBackoffMs: 1000, maxBackoffMs: 30_000 };

export type BoxDecision =
  /** Nothing to do until something changes. */
  | { kind: 'done' }
  /** Waiting for the agent; look again after this long even without a wake-up. */
  | { kind: 'wait'; requeueAfterMs: number; reason: string }
  /** Run the scheduler and bind the box to a node, reserving capacity. */
  | { kind: 'schedule' }
  /** Reserve CPU and memory again on the bound node (start after stop). */
  | { kind: 'reserve-compute' }
  /** The box is stopped on its node: release its CPU and memory, keep the disk. */
  | { kind: 'release-compute' }
  /** Issue the operation again (a new operation id) after a failure. */
  | { kind: 'retry'; attempt: number }
  /** The retry budget is spent: move to `failed` with a reason the user sees. */
  | { kind: 'fail'; reason: string }
  /**
   * The new node of a moving box could not import it: bind the box to the node it came from again
   * (it is still paused there), moving its reservation back, instead of retrying or failing it.
   */
  | { kind: 'abort-move'; reason: string }
  /** The box is gone from its node (or never reached one): release everything, free the name. */
  | { kind: 'finalize-delete' };

export function backoffMs(policy: RetryPolicy, attempt: number): number {
  return Math.min(policy.maxBackoffMs, policy.baseBackoffMs * 2 ** Math.max(0, attempt - 1));
}

/** How long to wait for an agent before looking again (a safety net; reports wake the loop). */
const AGENT_WAIT_MS = 15_000;

export function decideBox(box: BoxReconcileState, now: number, policy: RetryPolicy = DEFAULT_RETRY_POLICY): BoxDecision {
  if (box.finalized) return { kind: 'done' };
  const observed = box.observedGeneration >= box.generation;

  if (box.desiredState === 'deleted') {
    if (box.nodeId === null) return { kind: 'finalize-delete' };
    if (observed && box.phase === 'deleted') return { kind: 'finalize-delete' };
  }

  const err = box.lastError;
  const errIsCurrent = err !== null && err.generation === box.generation && err.attempt === box.attempt;
  // A failed import leaves the box whole on its old node: going back there keeps it usable, where
  // retries could only fail it (the user may move it again).
  if (box.moving && err && errIsCurrent) return { kind: 'abort-move', reason: err.message };
  // A failure stays terminal for its generation: only a new verb (a new generation) tries again.
  // A box deleted after an earlier failure is not failed in this generation, so its deletion proceeds.
  if (box.phase === 'failed' && (box.desiredState !== 'deleted' || errIsCurrent)) return { kind: 'done' };

  if (err && errIsCurrent) {
    if (box.attempt >= policy.maxAttempts) {
      return { kind: 'fail', reason: `${err.message} (gave up after ${box.attempt} attempts)` };
    }
    if (box.nextAttemptAt !== null && now < box.nextAttemptAt) {
      return { kind: 'wait', requeueAfterMs: box.nextAttemptAt - now, reason: 'backing off before retry' };
    }
    return { kind: 'retry', attempt: box.attempt + 1 };
  }

  if (box.nodeId === null) return { kind: 'schedule' };

  const wantsCompute = box.desiredState === 'running' || box.desiredState === 'paused';
  if (wantsCompute && !box.computeReserved) return { kind: 'reserve-compute' };
  if (box.desiredState === 'stopped' && box.computeReserved && observed && box.phase === 'stopped') {
    return { kind: 'release-compute' };
  }

  if (!observed || box.phase !== TARGET_PHASE[box.desiredState]) {
    return { kind: 'wait', requeueAfterMs: AGENT_WAIT_MS, reason: 'waiting for the node agent' };
  }
  return { kind: 'done' };
}

/** What the agent is told to converge to; derived, never stored. */
export interface AgentDesiredBox {
  desiredState: DesiredState;
  generation: number;
  /** Unique per (generation, attempt): the agent does a failed operation again only under a new id. */
  operationId: string;
}

/**
 * The state the agent should drive the box to. A box that wants to run but has no compute
 * reserved yet is held stopped: the agent must never use capacity the scheduler has not granted.
 */
export function agentDesired(box: { id: string } & Pick<BoxReconcileState, 'desiredState' | 'generation' | 'attempt' | 'computeReserved'>): AgentDesiredBox {
  const wantsCompute = box.desiredState === 'running' || box.desiredState === 'paused';
  return {
    desiredState: wantsCompute && !box.computeReserved ? 'stopped' : box.desiredState,
    generation: box.generation,
    operationId: `${box.id}:${box.generation}.${box.attempt}`,
  };
}
