import { describe, expect, it } from 'vitest';
import {
  AGENT_PHASES,
  DESIRED_STATES,
  isConverged,
  PHASES,
  planVerb,
  TARGET_PHASE,
  TRANSIENT_PHASES,
  VERBS,
  type DesiredState,
  type Phase,
  type Verb,
} from '@devyard/core/box-lifecycle';
import { DomainError } from '@devyard/core/domain-error';

function refusal(box: { desiredState: DesiredState; phase: Phase }, verb: Verb): DomainError {
  try {
    planVerb(box, verb);
  } catch (e) {
    expect(e).toBeInstanceOf(DomainError);
    return e as DomainError;
  }
  throw new Error(`expected ${verb} on ${box.desiredState}/${box.phase} to be refused`);
}

const NON_FAILED_PHASES = PHASES.filter((p) => p !== 'failed');
const LIVE_DESIRED = DESIRED_STATES.filter((d) => d !== 'deleted');

describe('planVerb: repeating what is already desired is an accepted no-op', () => {
  const repeats: Array<[Verb, DesiredState]> = [
    ['start', 'running'],
    ['resume', 'running'],
    ['stop', 'stopped'],
    ['pause', 'paused'],
  ];
  for (const [verb, desiredState] of repeats) {
    it.each(NON_FAILED_PHASES)(`${verb} on desired ${desiredState} in phase %s changes nothing`, (phase) => {
      expect(planVerb({ desiredState, phase }, verb)).toEqual({ desiredState, phase, changed: false });
    });
  }
});

describe('planVerb: accepted changes', () => {
  it.each(PHASES)('stop is accepted from running/paused in phase %s', (phase) => {
    for (const desiredState of ['running', 'paused'] as const) {
      expect(planVerb({ desiredState, phase }, 'stop')).toEqual({ desiredState: 'stopped', phase: 'stopping', changed: true });
    }
  });

  it.each(PHASES)('delete is accepted from every live desired state in phase %s', (phase) => {
    for (const desiredState of LIVE_DESIRED) {
      expect(planVerb({ desiredState, phase }, 'delete')).toEqual({ desiredState: 'deleted', phase: 'deleting', changed: true });
    }
  });

  it.each(PHASES)('start is accepted on a stopped box in phase %s (cold boot)', (phase) => {
    expect(planVerb({ desiredState: 'stopped', phase }, 'start')).toEqual({
      desiredState: 'running',
      phase: 'starting',
      changed: true,
    });
  });

  it.each(NON_FAILED_PHASES)('pause is accepted on a running box in phase %s', (phase) => {
    expect(planVerb({ desiredState: 'running', phase }, 'pause')).toEqual({ desiredState: 'paused', phase: 'pausing', changed: true });
  });

  it.each(PHASES)('resume is accepted on a paused box in phase %s', (phase) => {
    expect(planVerb({ desiredState: 'paused', phase }, 'resume')).toEqual({
      desiredState: 'running',
      phase: 'resuming',
      changed: true,
    });
  });
});

describe('planVerb: a failed box', () => {
  it('start on a failed running box tries again (a new generation)', () => {
    expect(planVerb({ desiredState: 'running', phase: 'failed' }, 'start')).toEqual({
      desiredState: 'running',
      phase: 'starting',
      changed: true,
    });
  });

  it('stop on a failed stopped box tries the stop again', () => {
    expect(planVerb({ desiredState: 'stopped', phase: 'failed' }, 'stop')).toEqual({
      desiredState: 'stopped',
      phase: 'stopping',
      changed: true,
    });
  });

  it('resume on a failed running box is refused and points to start', () => {
    const e = refusal({ desiredState: 'running', phase: 'failed' }, 'resume');
    expect(e.code).toBe('invalid-state');
    expect(e.message).toMatch(/use start/);
  });

  it('pause on a failed box is refused', () => {
    for (const desiredState of ['running', 'paused'] as const) {
      const e = refusal({ desiredState, phase: 'failed' }, 'pause');
      expect(e.code).toBe('invalid-state');
      expect(e.message).toMatch(/failed/);
    }
  });

  it('resume on a failed paused box continues it', () => {
    expect(planVerb({ desiredState: 'paused', phase: 'failed' }, 'resume')).toEqual({
      desiredState: 'running',
      phase: 'resuming',
      changed: true,
    });
  });
});

describe('planVerb: verbs that contradict the state are invalid-state', () => {
  it.each(PHASES)('resume on a stopped box (phase %s) is refused and points to start', (phase) => {
    const e = refusal({ desiredState: 'stopped', phase }, 'resume');
    expect(e.code).toBe('invalid-state');
    expect(e.message).toMatch(/use start/);
    expect(e.details).toEqual({ verb: 'resume', desiredState: 'stopped', phase });
  });

  it.each(PHASES)('pause on a stopped box (phase %s) is refused', (phase) => {
    const e = refusal({ desiredState: 'stopped', phase }, 'pause');
    expect(e.code).toBe('invalid-state');
    expect(e.details).toEqual({ verb: 'pause', desiredState: 'stopped', phase });
  });

  it.each(PHASES)('start on a paused box (phase %s) is refused and points to resume', (phase) => {
    const e = refusal({ desiredState: 'paused', phase }, 'start');
    expect(e.code).toBe('invalid-state');
    expect(e.message).toMatch(/use resume/);
  });

  it.each(PHASES.filter((p) => p !== 'failed'))('every verb but delete on a box being deleted (phase %s) is refused; delete is a no-op', (phase) => {
    expect(planVerb({ desiredState: 'deleted', phase }, 'delete')).toEqual({ desiredState: 'deleted', phase, changed: false });
    for (const verb of VERBS.filter((v) => v !== 'delete')) {
      const e = refusal({ desiredState: 'deleted', phase }, verb);
      expect(e.code).toBe('invalid-state');
      expect(e.details).toEqual({ verb, desiredState: 'deleted', phase });
    }
  });

  it('a failed deletion can be retried with delete, and only with delete', () => {
    // Without this, a box whose deletion ran out of attempts can never be deleted (see box-reconcile).
    expect(planVerb({ desiredState: 'deleted', phase: 'failed' }, 'delete')).toEqual({
      desiredState: 'deleted',
      phase: 'deleting',
      changed: true,
    });
    for (const verb of ['start', 'stop', 'pause', 'resume'] as const) {
      expect(refusal({ desiredState: 'deleted', phase: 'failed' }, verb).code).toBe('invalid-state');
    }
  });
});

describe('planVerb: the whole table', () => {
  /** Independent statement of the verb rules, checked against all 4 × 13 × 5 combinations. */
  function expected(desiredState: DesiredState, phase: Phase, verb: Verb): 'refuse' | 'same' | DesiredState {
    const failed = phase === 'failed';
    if (desiredState === 'deleted') return verb === 'delete' ? (failed ? 'deleted' : 'same') : 'refuse';
    const target: DesiredState = { start: 'running', resume: 'running', stop: 'stopped', pause: 'paused', delete: 'deleted' }[verb] as DesiredState;
    if (target === desiredState && !failed) return 'same';
    if (verb === 'start' && desiredState === 'paused') return 'refuse';
    if (verb === 'pause' && (desiredState === 'stopped' || failed)) return 'refuse';
    if (verb === 'resume' && (desiredState === 'stopped' || (failed && desiredState === 'running'))) return 'refuse';
    return target;
  }
  const AFTER: Record<Verb, Phase> = { start: 'starting', stop: 'stopping', pause: 'pausing', resume: 'resuming', delete: 'deleting' };

  for (const desiredState of DESIRED_STATES) {
    for (const phase of PHASES) {
      it(`${desiredState}/${phase}`, () => {
        for (const verb of VERBS) {
          const want = expected(desiredState, phase, verb);
          if (want === 'refuse') {
            expect(refusal({ desiredState, phase }, verb).code, verb).toBe('invalid-state');
          } else if (want === 'same') {
            expect(planVerb({ desiredState, phase }, verb), verb).toEqual({ desiredState, phase, changed: false });
          } else {
            const plan = planVerb({ desiredState, phase }, verb);
            expect(plan, verb).toEqual({ desiredState: want, phase: AFTER[verb], changed: true });
            // The phase shown right away is never the settled one: the reconciler still has work.
            expect(isConverged(plan), verb).toBe(false);
            // Repeating the verb on the result is an accepted no-op.
            expect(planVerb(plan, verb).changed, `${verb} twice`).toBe(false);
          }
        }
      });
    }
  }
});

describe('phase sets', () => {
  it('every desired state has a settled target phase that is neither transient nor failed', () => {
    for (const d of DESIRED_STATES) {
      expect(TRANSIENT_PHASES.has(TARGET_PHASE[d])).toBe(false);
      expect(TARGET_PHASE[d]).not.toBe('failed');
    }
  });

  it('isConverged compares the phase with the target of the desired state', () => {
    expect(isConverged({ desiredState: 'running', phase: 'running' })).toBe(true);
    expect(isConverged({ desiredState: 'running', phase: 'starting' })).toBe(false);
    expect(isConverged({ desiredState: 'paused', phase: 'running' })).toBe(false);
    expect(isConverged({ desiredState: 'stopped', phase: 'stopped' })).toBe(true);
    expect(isConverged({ desiredState: 'deleted', phase: 'deleted' })).toBe(true);
    expect(isConverged({ desiredState: 'running', phase: 'failed' })).toBe(false);
  });

  it('agents may report neither control-plane phases nor failed', () => {
    for (const p of ['pending', 'scheduling', 'failed'] as const) expect(AGENT_PHASES.has(p)).toBe(false);
    for (const d of DESIRED_STATES) expect(AGENT_PHASES.has(TARGET_PHASE[d])).toBe(true);
  });
});
