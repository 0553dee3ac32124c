/** Row ↔ record mapping for boxes, so callers never see JSON-in-text columns. */
import type { DesiredState, Phase } from '@devyard/core/box-lifecycle';
import type { Resources } from '@devyard/core/resources';
import type { Selectable } from 'kysely';
import type { BoxTable } from './database-schema.js';

export interface Condition {
  type: string;
  status: 'True' | 'False' | 'Unknown';
  reason: string;
  message: string;
  lastTransitionTime: string;
}

export interface BoxRecord {
  id: string;
  name: string;
  owner: string;
  /** Organization the box belongs to. */
  orgId: string;
  templateName: string;
  templateVersion: number;
  image: string;
  runtime: string;
  desiredState: DesiredState;
  phase: Phase;
  generation: number;
  observedGeneration: number;
  nodeId: string | null;
  computeReserved: boolean;
  resources: Resources;
  env: Record<string, string>;
  attempt: number;
  lastError: { generation: number; attempt: number; message: string } | null;
  nextAttemptAt: number | null;
  conditions: Condition[];
  ip: string | null;
  createdAt: number;
  updatedAt: number;
  deletedAt: number | null;
  version: number;
  /** Id of the box this one was forked from (its node agent clones that box's RAM and disk); null for created boxes. */
  forkOf: string | null;
  /**
   * While the box moves: the node it was paused on, whose agent still holds it and serves its
   * snapshot to the new node (`nodeId`). Null when no move is in flight.
   */
  moveFromNodeId: string | null;
  /**
   * A node that must still delete its copy of the box: the old node once a move succeeded (or the
   * new one after a failed import). Null when nothing is left behind.
   */
  cleanupNodeId: string | null;
}

/**
 * A box as lists and watchers carry it: everything but `env`, which may be large (up to the API's
 * limit per box) and which no list shows. Kept a separate type so that a listing can never be
 * written back as a whole box and lose the env.
 */
export type BoxListing = Omit<BoxRecord, 'env'>;

/** The columns of a listing, in the order of BoxTable. */
export const BOX_LISTING_COLUMNS = [
  'id', 'name', 'owner', 'org_id', 'template_name', 'template_version', 'image', 'runtime', 'desired_state', 'phase', 'generation',
  'observed_generation', 'node_id', 'compute_reserved', 'resources', 'attempt', 'last_error', 'next_attempt_at', 'conditions', 'ip',
  'created_at', 'updated_at', 'deleted_at', 'version', 'fork_of', 'move_from_node_id', 'cleanup_node_id',
] as const satisfies ReadonlyArray<Exclude<keyof BoxTable, 'env'>>;

/** A box as lists show it, from a row read without its `env` column. */
export function boxListingFromRow(r: Omit<Selectable<BoxTable>, 'env'>): BoxListing {
  return {
    id: r.id,
    name: r.name,
    owner: r.owner,
    orgId: r.org_id,
    templateName: r.template_name,
    templateVersion: r.template_version,
    image: r.image,
    runtime: r.runtime,
    desiredState: r.desired_state as DesiredState,
    phase: r.phase as Phase,
    generation: Number(r.generation),
    observedGeneration: Number(r.observed_generation),
    nodeId: r.node_id,
    computeReserved: r.compute_reserved === 1,
    resources: JSON.parse(r.resources) as Resources,
    attempt: Number(r.attempt),
    lastError: r.last_error ? (JSON.parse(r.last_error) as BoxRecord['lastError']) : null,
    nextAttemptAt: r.next_attempt_at === null ? null : Number(r.next_attempt_at),
    conditions: JSON.parse(r.conditions) as Condition[],
    ip: r.ip,
    createdAt: Number(r.created_at),
    updatedAt: Number(r.updated_at),
    deletedAt: r.deleted_at === null ? null : Number(r.deleted_at),
    version: Number(r.version),
    forkOf: r.fork_of ?? null,
    moveFromNodeId: r.move_from_node_id ?? null,
    cleanupNodeId: r.cleanup_node_id ?? null,
  };
}

export function boxFromRow(r: Selectable<BoxTable>): BoxRecord {
  return { ...boxListingFromRow(r), env: JSON.parse(r.env) as Record<string, string> };
}

export function boxToRow(b: BoxRecord): Selectable<BoxTable> {
  return {
    id: b.id,
    name: b.name,
    owner: b.owner,
    org_id: b.orgId,
    template_name: b.templateName,
    template_version: b.templateVersion,
    image: b.image,
    runtime: b.runtime,
    desired_state: b.desiredState,
    phase: b.phase,
    generation: b.generation,
    observed_generation: b.observedGeneration,
    node_id: b.nodeId,
    compute_reserved: b.computeReserved ? 1 : 0,
    resources: JSON.stringify(b.resources),
    env: JSON.stringify(b.env),
    attempt: b.attempt,
    last_error: b.lastError ? JSON.stringify(b.lastError) : null,
    next_attempt_at: b.nextAttemptAt,
    conditions: JSON.stringify(b.conditions),
    ip: b.ip,
    created_at: b.createdAt,
    updated_at: b.updatedAt,
    deleted_at: b.deletedAt,
    version: b.version,
    fork_of: b.forkOf,
    move_from_node_id: b.moveFromNodeId,
    cleanup_node_id: b.cleanupNodeId,
  };
}

/** Sets or replaces a condition, keeping lastTransitionTime when the status did not change. */
export function setCondition(list: Condition[], c: Omit<Condition, 'lastTransitionTime'>, now: number): Condition[] {
  const prev = list.find((x) => x.type === c.type);
  const time = prev && prev.status === c.status ? prev.lastTransitionTime : new Date(now).toISOString();
  return [...list.filter((x) => x.type !== c.type), { ...c, lastTransitionTime: time }];
}
