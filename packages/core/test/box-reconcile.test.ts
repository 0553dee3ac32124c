import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { DESIRED_STATES, PHASES } from '@devyard/core/box-lifecycle';
import {
  agentDesired,
  backoffMs,
  decideBox,
  DEFAULT_RETRY_POLICY,
  type BoxReconcileState,
  type RetryPolicy,
} from '@devyard/core/box-reconcile';

const NOW = 1_700_000_000_000;
const policy: RetryPolicy = { maxAttempts: 3, baseBackoffMs: 1000, maxBackoffMs: 5000 };

/** A box that is running and settled on node n1, generation 2. */
function box(over: Partial<BoxReconcileState> = {}): BoxReconcileState {
  return {
    desiredState: 'running',
    phase: 'running',
    generation: 2,
    observedGeneration: 2,
    nodeId: 'n1',
    computeReserved: true,
    attempt: 1,
    lastError: null,
    nextAttemptAt: null,
    finalized: false,
    ...over,
  };
}

describe('backoffMs', () => {
  it('doubles from the base and is capped', () => {
    expect([1, 2, 3, 4, 5].map((n) => backoffMs(policy, n))).toEqual([1000, 2000, 4000, 5000, 5000]);
    expect(backoffMs(DEFAULT_RETRY_POLICY, 1)).toBe(1000);
    expect(backoffMs(DEFAULT_RETRY_POLICY, 10)).toBe(30_000);
    expect(backoffMs(policy, 0)).toBe(1000);
  });
});

describe('decideBox', () => {
  it('is done for a settled box', () => {
    for (const desiredState of ['running', 'paused'] as const) {
      expect(decideBox(box({ desiredState, phase: desiredState }), NOW, policy)).toEqual({ kind: 'done' });
    }
    expect(decideBox(box({ desiredState: 'stopped', phase: 'stopped', computeReserved: false }), NOW, policy)).toEqual({ kind: 'done' });
  });

  it('is done for a finalized box whatever else it says', () => {
    expect(decideBox(box({ desiredState: 'deleted', phase: 'deleted', finalized: true }), NOW, policy)).toEqual({ kind: 'done' });
    expect(decideBox(box({ desiredState: 'deleted', nodeId: null, finalized: true }), NOW, policy)).toEqual({ kind: 'done' });
  });

  it('schedules an unbound box that should exist', () => {
    for (const desiredState of ['running', 'paused', 'stopped'] as const) {
      const b = box({ desiredState, phase: 'pending', nodeId: null, computeReserved: false, observedGeneration: 0 });
      expect(decideBox(b, NOW, policy)).toEqual({ kind: 'schedule' });
    }
  });

  it('reserves compute again for a bound box that should run or pause', () => {
    for (const desiredState of ['running', 'paused'] as const) {
      const b = box({ desiredState, phase: 'starting', generation: 3, computeReserved: false });
      expect(decideBox(b, NOW, policy)).toEqual({ kind: 'reserve-compute' });
    }
  });

  it('releases compute only once the agent observed the stop of this generation', () => {
    const stopped = box({ desiredState: 'stopped', phase: 'stopped', generation: 3, observedGeneration: 3 });
    expect(decideBox(stopped, NOW, policy)).toEqual({ kind: 'release-compute' });
    // A "stopped" left over from an older generation does not count.
    expect(decideBox({ ...stopped, observedGeneration: 2 }, NOW, policy).kind).toBe('wait');
    // Still stopping: keep the reservation.
    expect(decideBox({ ...stopped, phase: 'stopping' }, NOW, policy).kind).toBe('wait');
    // Already released: nothing left to do.
    expect(decideBox({ ...stopped, computeReserved: false }, NOW, policy)).toEqual({ kind: 'done' });
  });

  it('waits for the agent while the generation is not observed or the phase is off target', () => {
    const notObserved = decideBox(box({ generation: 3, phase: 'running', observedGeneration: 2 }), NOW, policy);
    expect(notObserved).toMatchObject({ kind: 'wait', reason: 'waiting for the node agent' });
    expect(notObserved.kind === 'wait' && notObserved.requeueAfterMs).toBeGreaterThan(0);
    expect(decideBox(box({ phase: 'starting' }), NOW, policy).kind).toBe('wait');
    expect(decideBox(box({ desiredState: 'paused', phase: 'running' }), NOW, policy).kind).toBe('wait');
    expect(decideBox(box({ desiredState: 'deleted', phase: 'deleting', generation: 3 }), NOW, policy).kind).toBe('wait');
  });

  describe('failures', () => {
    const failing = box({
      generation: 3,
      observedGeneration: 3,
      phase: 'provisioning',
      attempt: 1,
      lastError: { generation: 3, attempt: 1, message: 'image pull failed: 404' },
      nextAttemptAt: NOW + 1000,
    });

    it('backs off until nextAttemptAt, then retries with the next attempt', () => {
      expect(decideBox(failing, NOW, policy)).toEqual({ kind: 'wait', requeueAfterMs: 1000, reason: 'backing off before retry' });
      expect(decideBox(failing, NOW + 999, policy)).toMatchObject({ kind: 'wait', requeueAfterMs: 1 });
      expect(decideBox(failing, NOW + 1000, policy)).toEqual({ kind: 'retry', attempt: 2 });
      expect(decideBox(failing, NOW + 60_000, policy)).toEqual({ kind: 'retry', attempt: 2 });
      expect(decideBox({ ...failing, nextAttemptAt: null }, NOW, policy)).toEqual({ kind: 'retry', attempt: 2 });
    });

    it('fails after the budget with the agent message in the reason', () => {
      const spent = { ...failing, attempt: 3, lastError: { generation: 3, attempt: 3, message: 'image pull failed: 404' } };
      const d = decideBox(spent, NOW, policy);
      expect(d.kind).toBe('fail');
      expect(d.kind === 'fail' && d.reason).toContain('image pull failed: 404');
      expect(d.kind === 'fail' && d.reason).toContain('3 attempts');
      // Even while the backoff would still run: no point waiting for a retry that will not come.
      expect(decideBox(spent, NOW - 10_000, policy).kind).toBe('fail');
      // The default policy allows four attempts.
      expect(decideBox(spent, NOW + 5000).kind).toBe('retry');
    });

    it('ignores errors of an older attempt or generation', () => {
      expect(decideBox({ ...failing, attempt: 2 }, NOW, policy).kind).toBe('wait');
      expect(decideBox({ ...failing, attempt: 2 }, NOW, policy)).toMatchObject({ reason: 'waiting for the node agent' });
      expect(decideBox({ ...failing, generation: 4, phase: 'stopping', desiredState: 'stopped' }, NOW, policy)).toMatchObject({
        reason: 'waiting for the node agent',
      });
    });

    it('leaves a failed box alone until a new verb', () => {
      expect(decideBox(box({ phase: 'failed' }), NOW, policy)).toEqual({ kind: 'done' });
      expect(decideBox(box({ phase: 'failed', lastError: { generation: 2, attempt: 3, message: 'x' }, attempt: 3 }), NOW, policy)).toEqual({
        kind: 'done',
      });
    });

    it('a failed deletion is terminal too: the pass after `fail` is done, not another fail', () => {
      const failedDelete = box({
        desiredState: 'deleted',
        phase: 'failed',
        generation: 4,
        observedGeneration: 4,
        attempt: 3,
        lastError: { generation: 4, attempt: 3, message: 'cannot remove volume' },
      });
      expect(decideBox(failedDelete, NOW, policy)).toEqual({ kind: 'done' });
    });
  });

  describe('moves', () => {
    const importing = box({ desiredState: 'paused', phase: 'provisioning', generation: 5, observedGeneration: 4, moving: true });

    it('waits for the new node while it imports the box', () => {
      expect(decideBox(importing, NOW, policy)).toMatchObject({ kind: 'wait', reason: 'waiting for the node agent' });
      expect(decideBox({ ...importing, phase: 'paused', observedGeneration: 5 }, NOW, policy)).toEqual({ kind: 'done' });
    });

    it('moves the box back at the first failed import instead of retrying or failing it', () => {
      const failed = { ...importing, observedGeneration: 5, lastError: { generation: 5, attempt: 1, message: 'move failed: 503' }, nextAttemptAt: NOW + 1000 };
      expect(decideBox(failed, NOW, policy)).toEqual({ kind: 'abort-move', reason: 'move failed: 503' });
      // Also past the retry budget: the box is never failed for a move.
      expect(decideBox({ ...failed, attempt: 3, lastError: { ...failed.lastError, attempt: 3 } }, NOW, policy).kind).toBe('abort-move');
      // An error of an older generation is not the import's.
      expect(decideBox({ ...failed, lastError: { ...failed.lastError, generation: 4 } }, NOW, policy).kind).toBe('wait');
      // The same error once the box is no longer moving is an ordinary failure again.
      expect(decideBox({ ...failed, moving: false }, NOW + 1000, policy)).toEqual({ kind: 'retry', attempt: 2 });
    });
  });

  describe('deletion', () => {
    it('finalizes at once when the box never reached a node', () => {
      expect(decideBox(box({ desiredState: 'deleted', phase: 'deleting', nodeId: null, computeReserved: false, generation: 3 }), NOW, policy)).toEqual({
        kind: 'finalize-delete',
      });
    });

    it('finalizes a bound box once the agent reported it deleted for this generation', () => {
      const gone = box({ desiredState: 'deleted', phase: 'deleted', generation: 3, observedGeneration: 3 });
      expect(decideBox(gone, NOW, policy)).toEqual({ kind: 'finalize-delete' });
      expect(decideBox({ ...gone, computeReserved: false }, NOW, policy)).toEqual({ kind: 'finalize-delete' });
      expect(decideBox({ ...gone, observedGeneration: 2 }, NOW, policy).kind).toBe('wait');
    });

    it('deletes a box that failed in an earlier generation', () => {
      const b = box({
        desiredState: 'deleted',
        phase: 'failed',
        generation: 4,
        observedGeneration: 3,
        lastError: { generation: 3, attempt: 3, message: 'boom' },
        attempt: 1,
      });
      expect(decideBox(b, NOW, policy).kind).toBe('wait');
      expect(decideBox({ ...b, phase: 'deleted', observedGeneration: 4 }, NOW, policy)).toEqual({ kind: 'finalize-delete' });
    });

    it('does not reserve compute for a box being deleted', () => {
      expect(decideBox(box({ desiredState: 'deleted', phase: 'deleting', generation: 3, computeReserved: false }), NOW, policy).kind).toBe('wait');
    });
  });

  it('is a pure function of its input (property)', () => {
    const arb = fc.record({
      desiredState: fc.constantFrom(...DESIRED_STATES),
      phase: fc.constantFrom(...PHASES),
      generation: fc.integer({ min: 1, max: 4 }),
      observedGeneration: fc.integer({ min: 0, max: 4 }),
      nodeId: fc.constantFrom(null, 'n1'),
      computeReserved: fc.boolean(),
      attempt: fc.integer({ min: 1, max: 4 }),
      lastError: fc.option(
        fc.record({ generation: fc.integer({ min: 1, max: 4 }), attempt: fc.integer({ min: 1, max: 4 }), message: fc.constant('m') }),
      ),
      nextAttemptAt: fc.option(fc.integer({ min: NOW - 5000, max: NOW + 5000 })),
      finalized: fc.boolean(),
    });
    fc.assert(
      fc.property(arb, (b) => {
        const frozen = structuredClone(b);
        const d = decideBox(b, NOW, policy);
        expect(decideBox(b, NOW, policy)).toEqual(d);
        expect(b).toEqual(frozen);
        if (d.kind === 'wait') expect(d.requeueAfterMs).toBeGreaterThan(0);
        if (d.kind === 'schedule') expect(b.nodeId).toBeNull();
        if (d.kind === 'reserve-compute') expect(b.computeReserved).toBe(false);
        if (d.kind === 'release-compute') expect(b.computeReserved && b.desiredState === 'stopped').toBe(true);
        if (d.kind === 'retry') expect(d.attempt).toBe(b.attempt + 1);
        if (d.kind === 'fail') expect(b.phase).not.toBe('failed');
      }),
      { numRuns: 1000 },
    );
  });
});

describe('agentDesired', () => {
  it('holds a box stopped while its compute is not reserved', () => {
    for (const desiredState of ['running', 'paused'] as const) {
      expect(agentDesired({ id: 'b1', desiredState, generation: 5, attempt: 1, computeReserved: false }).desiredState).toBe('stopped');
      expect(agentDesired({ id: 'b1', desiredState, generation: 5, attempt: 1, computeReserved: true }).desiredState).toBe(desiredState);
    }
    for (const desiredState of ['stopped', 'deleted'] as const) {
      for (const computeReserved of [true, false]) {
        expect(agentDesired({ id: 'b1', desiredState, generation: 5, attempt: 1, computeReserved }).desiredState).toBe(desiredState);
      }
    }
  });

  it('carries the generation and an operation id unique per (box, generation, attempt)', () => {
    const a = agentDesired({ id: 'b1', desiredState: 'running', generation: 5, attempt: 1, computeReserved: true });
    expect(a.generation).toBe(5);
    const ids = new Set<string>();
    for (const id of ['b1', 'b2']) {
      for (const generation of [1, 2, 11]) {
        for (const attempt of [1, 2, 11]) {
          ids.add(agentDesired({ id, desiredState: 'running', generation, attempt, computeReserved: true }).operationId);
        }
      }
    }
    expect(ids.size).toBe(18);
    // Compute reservation does not change the operation: it is the same intent, released or not.
    expect(agentDesired({ id: 'b1', desiredState: 'running', generation: 5, attempt: 1, computeReserved: false }).operationId).toBe(
      a.operationId,
    );
    // The retry gets a new id, so the agent does the failed operation again.
    expect(agentDesired({ id: 'b1', desiredState: 'running', generation: 5, attempt: 2, computeReserved: true }).operationId).not.toBe(
      a.operationId,
    );
  });
});
