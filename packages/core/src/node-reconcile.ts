/**
 * The node agent's reconcile decision for one box: compare what the control plane wants (the
 * desired set the agent was given) with what the runtime shows on the host, and pick one step.
 * Level-triggered like the server side: the agent calls it again after each step.
 */
import type { DesiredState, Phase } from './box-lifecycle.js';

/** What a runtime driver observes of a box on the host. */
export type ObservedRuntimeState = 'absent' | 'stopped' | 'running' | 'paused';

export type NodeStep =
  | { kind: 'none'; phase: Phase }
  /** Create disk state and start the processes (cold boot). */
  | { kind: 'start'; phase: Phase; then: Phase }
  /** Create disk state only (a box that should exist but not run). */
  | { kind: 'create'; phase: Phase; then: Phase }
  | { kind: 'stop'; phase: Phase; then: Phase }
  | { kind: 'pause'; phase: Phase; then: Phase }
  | { kind: 'resume'; phase: Phase; then: Phase }
  | { kind: 'destroy'; phase: Phase; then: Phase };

const SETTLED: Record<ObservedRuntimeState, Phase> = {
  absent: 'deleted',
  stopped: 'stopped',
  running: 'running',
  paused: 'paused',
};

/**
 * `phase` is what to report while the step runs, `then` what to report once it succeeded.
 * A paused box that must stop is stopped directly (the freezer is thawed by the kill);
 * a box that should be paused but is not running is started first and paused on the next pass.
 */
export function decideNodeStep(desired: DesiredState, observed: ObservedRuntimeState): NodeStep {
  switch (desired) {
    case 'running':
      if (observed === 'running') return { kind: 'none', phase: 'running' };
      if (observed === 'paused') return { kind: 'resume', phase: 'resuming', then: 'running' };
      return { kind: 'start', phase: observed === 'absent' ? 'provisioning' : 'starting', then: 'running' };
    case 'paused':
      if (observed === 'paused') return { kind: 'none', phase: 'paused' };
      if (observed === 'running') return { kind: 'pause', phase: 'pausing', then: 'paused' };
      return { kind: 'start', phase: observed === 'absent' ? 'provisioning' : 'starting', then: 'running' };
    case 'stopped':
      if (observed === 'stopped') return { kind: 'none', phase: 'stopped' };
      if (observed === 'absent') return { kind: 'create', phase: 'provisioning', then: 'stopped' };
      return { kind: 'stop', phase: 'stopping', then: 'stopped' };
    case 'deleted':
      if (observed === 'absent') return { kind: 'none', phase: 'deleted' };
      return { kind: 'destroy', phase: 'deleting', then: 'deleted' };
  }
}

export function settledPhase(observed: ObservedRuntimeState): Phase {
  return SETTLED[observed];
}
