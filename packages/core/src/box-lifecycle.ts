/**
 * The box lifecycle: what the user wants (`desiredState`, set only by the API and by
 * policies) and what was last observed (`phase`). Verbs change only the desired state; reconcilers
 * move the phase towards it.
 */
import { DomainError } from './domain-error.js';

export const DESIRED_STATES = ['running', 'paused', 'stopped', 'deleted'] as const;
export type DesiredState = (typeof DESIRED_STATES)[number];

export const PHASES = [
  'pending',
  'scheduling',
  'provisioning',
  'starting',
  'running',
  'pausing',
  'paused',
  'stopping',
  'stopped',
  'resuming',
  'deleting',
  'deleted',
  'failed',
] as const;
export type Phase = (typeof PHASES)[number];

export const VERBS = ['start', 'stop', 'pause', 'resume', 'delete'] as const;
export type Verb = (typeof VERBS)[number];

/** The settled phase that corresponds to each desired state. */
export const TARGET_PHASE: Record<DesiredState, Phase> = {
  running: 'running',
  paused: 'paused',
  stopped: 'stopped',
  deleted: 'deleted',
};

/** Phases that are on the way somewhere: the box is neither settled nor failed. */
export const TRANSIENT_PHASES: ReadonlySet<Phase> = new Set<Phase>([
  'pending',
  'scheduling',
  'provisioning',
  'starting',
  'pausing',
  'stopping',
  'resuming',
  'deleting',
]);

/** Which phase a box shows right after a verb was accepted, until the agent reports otherwise. */
const PHASE_AFTER_VERB: Record<Verb, Phase> = {
  start: 'starting',
  stop: 'stopping',
  pause: 'pausing',
  resume: 'resuming',
  delete: 'deleting',
};

const DESIRED_AFTER_VERB: Record<Verb, DesiredState> = {
  start: 'running',
  stop: 'stopped',
  pause: 'paused',
  resume: 'running',
  delete: 'deleted',
};

export interface VerbPlan {
  /** The desired state after the verb. */
  desiredState: DesiredState;
  /** The phase to show right away. */
  phase: Phase;
  /** False when the verb asks for what is already desired: accepted, nothing changes. */
  changed: boolean;
}

/**
 * Decides whether a verb makes sense for a box in its current state. Repeating a verb is accepted
 * and changes nothing (idempotent); a verb that contradicts the state (resume a stopped box) is an
 * `invalid-state` error that names the phase and what to do instead.
 */
export function planVerb(box: { desiredState: DesiredState; phase: Phase }, verb: Verb): VerbPlan {
  const { desiredState, phase } = box;
  if (desiredState === 'deleted') {
    // A deletion that ran out of attempts is retried by deleting again (a new generation).
    if (verb === 'delete' && phase === 'failed') return { desiredState, phase: PHASE_AFTER_VERB.delete, changed: true };
    // DELETE is idempotent: asking again while the deletion runs is accepted and changes nothing.
    if (verb === 'delete') return { desiredState, phase, changed: false };
    throw new DomainError('invalid-state', 'box is being deleted', { verb, desiredState, phase });
  }
  const target = DESIRED_AFTER_VERB[verb];
  const failed = phase === 'failed';
  if (target === desiredState && !failed) return { desiredState, phase, changed: false };
  const refuse = (why: string): never => {
    throw new DomainError('invalid-state', why, { verb, desiredState, phase });
  };
  switch (verb) {
    case 'start':
      if (desiredState === 'paused') refuse('box is paused; use resume to continue it');
      break;
    case 'pause':
      if (desiredState === 'stopped') refuse('box is stopped; there is nothing to pause (start it first)');
      if (failed) refuse('box has failed; stop or delete it, or start it again');
      break;
    case 'resume':
      if (desiredState === 'stopped') refuse('box is stopped, not paused; use start');
      if (failed && desiredState !== 'paused') refuse('box has failed and is not paused; use start');
      break;
    case 'stop':
    case 'delete':
      break;
  }
  return { desiredState: target, phase: PHASE_AFTER_VERB[verb], changed: true };
}

/** Whether the box's phase has reached what its desired state asks for. */
export function isConverged(box: { desiredState: DesiredState; phase: Phase }): boolean {
  return box.phase === TARGET_PHASE[box.desiredState];
}

/** Phases only the control plane sets: before a node has the box, and the retry budget spent. */
export const CONTROL_PLANE_PHASES: ReadonlySet<Phase> = new Set<Phase>(['pending', 'scheduling', 'failed']);

/** Phases an agent may report for a box it runs: all the others. */
export const AGENT_PHASES: ReadonlySet<Phase> = new Set<Phase>(PHASES.filter((p) => !CONTROL_PLANE_PHASES.has(p)));
