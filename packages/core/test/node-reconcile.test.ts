import { describe, expect, it } from 'vitest';
import { DESIRED_STATES, TARGET_PHASE, type DesiredState } from '@devyard/core/box-lifecycle';
import { decideNodeStep, settledPhase, type NodeStep, type ObservedRuntimeState } from '@devyard/core/node-reconcile';

const OBSERVED: ObservedRuntimeState[] = ['absent', 'stopped', 'running', 'paused'];

const TABLE: Record<DesiredState, Record<ObservedRuntimeState, NodeStep>> = {
  running: {
    absent: { kind: 'start', phase: 'provisioning', then: 'running' },
    stopped: { kind: 'start', phase: 'starting', then: 'running' },
    running: { kind: 'none', phase: 'running' },
    paused: { kind: 'resume', phase: 'resuming', then: 'running' },
  },
  paused: {
    absent: { kind: 'start', phase: 'provisioning', then: 'running' },
    stopped: { kind: 'start', phase: 'starting', then: 'running' },
    running: { kind: 'pause', phase: 'pausing', then: 'paused' },
    paused: { kind: 'none', phase: 'paused' },
  },
  stopped: {
    absent: { kind: 'create', phase: 'provisioning', then: 'stopped' },
    stopped: { kind: 'none', phase: 'stopped' },
    running: { kind: 'stop', phase: 'stopping', then: 'stopped' },
    paused: { kind: 'stop', phase: 'stopping', then: 'stopped' },
  },
  deleted: {
    absent: { kind: 'none', phase: 'deleted' },
    stopped: { kind: 'destroy', phase: 'deleting', then: 'deleted' },
    running: { kind: 'destroy', phase: 'deleting', then: 'deleted' },
    paused: { kind: 'destroy', phase: 'deleting', then: 'deleted' },
  },
};

/** What the runtime shows after a step succeeded. */
const AFTER: Record<NodeStep['kind'], ObservedRuntimeState | null> = {
  none: null,
  start: 'running',
  create: 'stopped',
  stop: 'stopped',
  pause: 'paused',
  resume: 'running',
  destroy: 'absent',
};

describe('decideNodeStep', () => {
  for (const desired of DESIRED_STATES) {
    for (const observed of OBSERVED) {
      it(`desired ${desired}, observed ${observed}`, () => {
        expect(decideNodeStep(desired, observed)).toEqual(TABLE[desired][observed]);
      });
    }
  }

  it('does nothing exactly when the runtime already shows the target', () => {
    for (const desired of DESIRED_STATES) {
      for (const observed of OBSERVED) {
        const step = decideNodeStep(desired, observed);
        expect(step.kind === 'none', `${desired}/${observed}`).toBe(settledPhase(observed) === TARGET_PHASE[desired]);
        if (step.kind === 'none') expect(step.phase).toBe(TARGET_PHASE[desired]);
      }
    }
  });

  it('reaches the target in at most two successful steps from anywhere, reporting the step outcome', () => {
    for (const desired of DESIRED_STATES) {
      for (const start of OBSERVED) {
        let observed = start;
        let steps = 0;
        for (;;) {
          const step = decideNodeStep(desired, observed);
          if (step.kind === 'none') break;
          const next = AFTER[step.kind]!;
          expect(settledPhase(next), `${desired}/${observed} ${step.kind}`).toBe(step.then);
          observed = next;
          steps++;
          expect(steps).toBeLessThanOrEqual(2);
        }
        expect(settledPhase(observed)).toBe(TARGET_PHASE[desired]);
      }
    }
  });

  it('a paused box that must stop is stopped directly, never resumed first', () => {
    expect(decideNodeStep('stopped', 'paused').kind).toBe('stop');
  });
});

describe('settledPhase', () => {
  it('maps what the runtime shows to a phase', () => {
    expect(OBSERVED.map(settledPhase)).toEqual(['deleted', 'stopped', 'running', 'paused']);
  });
});
