/**
 * Scheduler v1: filter, then score, as a pure function over a snapshot of the nodes.
 * "No node fits" is an answer with a reason per node, not an exception.
 */
import { shortfall, type Resources } from './resources.js';

export interface NodeSnapshot {
  id: string;
  name: string;
  /** Heartbeat lease still valid. */
  ready: boolean;
  cordoned: boolean;
  runtimes: string[];
  arch: string;
  region: string | null;
  capacity: Resources;
  allocated: Resources;
  /** Image names/digests cached on the node. */
  images: string[];
  /** Boxes of the requesting org already on the node (tenant anti-affinity). */
  orgBoxes?: number;
}

export interface ScheduleRequest {
  runtime: string;
  arch?: string;
  region?: string | null;
  resources: Resources;
  /** Image name or digest, for cache affinity. */
  image?: string;
}

export type SpreadPolicy = 'binpack' | 'spread';

export type ScheduleResult =
  | { ok: true; nodeId: string; scores: Record<string, number> }
  | { ok: false; reasons: Record<string, string[]> };

const DIMENSION_LABEL: Record<keyof Resources, string> = {
  cpuMillis: 'not enough free CPU',
  memoryBytes: 'not enough free memory',
  diskBytes: 'not enough free disk',
};

/** Why a node cannot take the request; empty when it can. */
export function filterNode(node: NodeSnapshot, req: ScheduleRequest): string[] {
  const reasons: string[] = [];
  if (!node.ready) reasons.push('node is not ready (no recent heartbeat)');
  if (node.cordoned) reasons.push('node is cordoned');
  if (!node.runtimes.includes(req.runtime)) reasons.push(`runtime ${req.runtime} not offered`);
  if (req.arch && node.arch !== req.arch) reasons.push(`architecture ${node.arch} ≠ ${req.arch}`);
  if (req.region && node.region !== req.region) reasons.push(`region ${node.region ?? 'none'} ≠ ${req.region}`);
  for (const dim of shortfall(node.capacity, node.allocated, req.resources)) reasons.push(DIMENSION_LABEL[dim]);
  return reasons;
}

/** Higher is better. Weights are small integers so ties are common and broken by name. */
export function scoreNode(node: NodeSnapshot, req: ScheduleRequest, policy: SpreadPolicy): number {
  let score = 0;
  if (req.image && node.images.includes(req.image)) score += 40;
  const free = (k: keyof Resources) =>
    node.capacity[k] === 0 ? 0 : (node.capacity[k] - node.allocated[k] - req.resources[k]) / node.capacity[k];
  const freeFraction = (free('cpuMillis') + free('memoryBytes')) / 2;
  // binpack prefers the fullest node that fits; spread the emptiest.
  score += Math.round((policy === 'spread' ? freeFraction : 1 - freeFraction) * 30);
  score -= Math.min(20, (node.orgBoxes ?? 0) * 5);
  return score;
}

export function schedule(nodes: NodeSnapshot[], req: ScheduleRequest, policy: SpreadPolicy = 'spread'): ScheduleResult {
  const reasons: Record<string, string[]> = {};
  const scores: Record<string, number> = {};
  let best: NodeSnapshot | undefined;
  for (const node of nodes) {
    const why = filterNode(node, req);
    if (why.length > 0) {
      reasons[node.name] = why;
      continue;
    }
    const s = scoreNode(node, req, policy);
    scores[node.name] = s;
    if (!best || s > scores[best.name]! || (s === scores[best.name] && node.name < best.name)) best = node;
  }
  if (!best) return { ok: false, reasons };
  return { ok: true, nodeId: best.id, scores };
}

/** One line that explains a failed schedule, e.g. for a box condition. */
export function describeRejection(reasons: Record<string, string[]>): string {
  const entries = Object.entries(reasons);
  if (entries.length === 0) return 'no nodes are registered';
  return `no node fits: ${entries.map(([n, r]) => `${n}: ${r.join(', ')}`).join('; ')}`;
}
