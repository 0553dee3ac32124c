/** The scheduler's view of a node row: what its filters and scoring read (core knows no store). */
import type { NodeSnapshot } from '@devyard/core/scheduler';
import type { NodeRecord } from '../store/store.js';

export function nodeSnapshot(n: NodeRecord, now: number): NodeSnapshot {
  return {
    id: n.id,
    name: n.name,
    ready: n.leaseExpiresAt > now,
    cordoned: n.cordoned,
    runtimes: n.runtimes,
    arch: n.arch,
    region: n.region,
    capacity: n.capacity,
    allocated: n.allocated,
    images: n.images,
  };
}
