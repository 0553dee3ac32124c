/** Maps stored records to the API's shapes. */
import type { Box, BoxEvent } from '@devyard/api/box-schemas';
import type { Node } from '@devyard/api/node-schemas';
import type { Template } from '@devyard/api/template-schemas';
import type { BoxListing } from '../store/box-records.js';
import type { BoxEventRecord, NodeRecord, TemplateRecord } from '../store/store.js';

/** What pause keeps, per runtime: users must be able to tell an honest pause from a stop. */
const PAUSE_SEMANTICS: Record<string, { keepsMemory: boolean; description: string }> = {
  sandbox: { keepsMemory: true, description: 'cgroup freezer: processes keep their memory on the node; CPU stops; memory stays reserved' },
  microvm: { keepsMemory: true, description: 'RAM and device snapshot to a file; processes continue on resume' },
  sim: { keepsMemory: true, description: 'simulated' },
};

const iso = (ms: number) => new Date(ms).toISOString();

/**
 * The API view of a box. `names` are what the caller looked up of the box's references: the name
 * of the box it was forked from, when it is a fork, and of the node it is moving from, while it
 * moves (the view falls back to the ids for names the caller could not look up).
 */
export function toApiBox(b: BoxListing, nodeName: string | null, names: { forkOf?: string; movingFrom?: string } = {}): Box {
  return {
    id: b.id,
    name: b.name,
    owner: b.owner,
    template: b.templateName,
    templateVersion: b.templateVersion,
    image: b.image,
    runtime: b.runtime as Box['runtime'],
    desiredState: b.desiredState,
    phase: b.phase,
    generation: b.generation,
    observedGeneration: b.observedGeneration,
    node: nodeName,
    resources: b.resources,
    ip: b.ip,
    conditions: b.conditions,
    lastError: b.lastError?.message ?? null,
    pause: PAUSE_SEMANTICS[b.runtime] ?? { keepsMemory: false, description: 'unknown runtime' },
    createdAt: iso(b.createdAt),
    updatedAt: iso(b.updatedAt),
    version: b.version,
    ...(b.forkOf !== null ? { forkOf: names.forkOf ?? b.forkOf } : {}),
    ...(b.moveFromNodeId !== null ? { movingFrom: names.movingFrom ?? b.moveFromNodeId } : {}),
  };
}

export function toApiEvent(e: BoxEventRecord): BoxEvent {
  return { id: e.id, boxId: e.boxId, boxName: e.boxName, time: iso(e.time), type: e.type, phase: (e.phase as BoxEvent['phase']) ?? null, message: e.message };
}

export function toApiTemplate(t: TemplateRecord): Template {
  const s = t.spec;
  return {
    name: t.name,
    version: t.version,
    description: t.description,
    image: t.image,
    imageDigest: t.imageDigest,
    build: s.build ?? null,
    runtime: t.runtime as Template['runtime'],
    defaultResources: { ...t.defaultResources, gpu: s.defaultResources?.gpu ?? 0 },
    maxResources: { ...t.maxResources, gpu: s.maxResources?.gpu ?? s.defaultResources?.gpu ?? 0 },
    repository: s.repository ?? null,
    hooks: s.hooks ?? {},
    env: t.env,
    user: s.user ?? null,
    // Specs accept a bare port number for brevity; readers get one shape.
    ports: (s.ports ?? []).map((p) => (typeof p === 'number' ? { port: p, label: null } : { port: p.port, label: p.label ?? null })),
    idleTimeout: s.idleTimeout ?? null,
    maxLifetime: s.maxLifetime ?? null,
    warmPoolSize: s.warmPoolSize ?? 0,
    createdAt: iso(t.createdAt),
  };
}

export function toApiNode(n: NodeRecord, now: number, boxes: number): Node {
  return {
    id: n.id,
    name: n.name,
    status: n.leaseExpiresAt > now ? 'ready' : 'not-ready',
    cordoned: n.cordoned,
    runtimes: n.runtimes,
    arch: n.arch,
    region: n.region,
    labels: n.labels,
    capacity: n.capacity,
    allocated: n.allocated,
    images: n.images,
    leaseExpiresAt: iso(n.leaseExpiresAt),
    agentUrl: n.agentUrl,
    boxes,
  };
}
