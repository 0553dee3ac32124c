import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { describeRejection, filterNode, schedule, scoreNode, type NodeSnapshot, type ScheduleRequest } from '@devyard/core/scheduler';

const GiB = 1024 ** 3;

function node(name: string, over: Partial<NodeSnapshot> = {}): NodeSnapshot {
  return {
    id: `id-${name}`,
    name,
    ready: true,
    cordoned: false,
    runtimes: ['sandbox', 'microvm'],
    arch: 'amd64',
    region: 'eu-1',
    capacity: { cpuMillis: 8000, memoryBytes: 16 * GiB, diskBytes: 200 * GiB },
    allocated: { cpuMillis: 0, memoryBytes: 0, diskBytes: 0 },
    images: [],
    ...over,
  };
}

const req: ScheduleRequest = {
  runtime: 'sandbox',
  resources: { cpuMillis: 2000, memoryBytes: 4 * GiB, diskBytes: 20 * GiB },
};

describe('filterNode', () => {
  it('accepts a healthy node with room', () => {
    expect(filterNode(node('a'), req)).toEqual([]);
  });

  it.each<[string, Partial<NodeSnapshot>, ScheduleRequest, RegExp]>([
    ['not ready', { ready: false }, req, /not ready/],
    ['cordoned', { cordoned: true }, req, /cordoned/],
    ['runtime', { runtimes: ['microvm'] }, req, /runtime sandbox not offered/],
    ['arch', { arch: 'arm64' }, { ...req, arch: 'amd64' }, /architecture arm64 ≠ amd64/],
    ['region', { region: 'us-1' }, { ...req, region: 'eu-1' }, /region us-1 ≠ eu-1/],
    ['no region', { region: null }, { ...req, region: 'eu-1' }, /region none ≠ eu-1/],
    ['cpu', { allocated: { cpuMillis: 6001, memoryBytes: 0, diskBytes: 0 } }, req, /not enough free CPU/],
    ['memory', { allocated: { cpuMillis: 0, memoryBytes: 12 * GiB + 1, diskBytes: 0 } }, req, /not enough free memory/],
    ['disk', { allocated: { cpuMillis: 0, memoryBytes: 0, diskBytes: 180 * GiB + 1 } }, req, /not enough free disk/],
  ])('rejects for %s with exactly one reason', (_what, over, request, reason) => {
    const why = filterNode(node('a', over), request);
    expect(why).toHaveLength(1);
    expect(why[0]).toMatch(reason);
  });

  it('accepts an exact fit', () => {
    expect(filterNode(node('a', { allocated: { cpuMillis: 6000, memoryBytes: 12 * GiB, diskBytes: 180 * GiB } }), req)).toEqual([]);
  });

  it('ignores arch and region when the request does not ask for them', () => {
    expect(filterNode(node('a', { arch: 'riscv64', region: null }), req)).toEqual([]);
    expect(filterNode(node('a', { region: 'us-1' }), { ...req, region: null })).toEqual([]);
  });

  it('lists every reason at once', () => {
    const why = filterNode(
      node('a', { ready: false, cordoned: true, runtimes: [], capacity: { cpuMillis: 0, memoryBytes: 0, diskBytes: 0 } }),
      req,
    );
    expect(why).toHaveLength(6);
  });
});

describe('schedule', () => {
  it('returns per-node reasons when no node fits, and describes them', () => {
    const res = schedule([node('a', { cordoned: true }), node('b', { runtimes: ['microvm'] })], req);
    expect(res.ok).toBe(false);
    if (res.ok) return;
    expect(Object.keys(res.reasons).sort()).toEqual(['a', 'b']);
    expect(res.reasons.a).toEqual(['node is cordoned']);
    expect(describeRejection(res.reasons)).toBe('no node fits: a: node is cordoned; b: runtime sandbox not offered');
  });

  it('answers no-fit for an empty cluster without throwing', () => {
    const res = schedule([], req);
    expect(res).toEqual({ ok: false, reasons: {} });
    expect(describeRejection({})).toBe('no nodes are registered');
  });

  it('skips unfit nodes and scores only the fit ones', () => {
    const res = schedule([node('a', { ready: false }), node('b')], req);
    expect(res.ok && res.nodeId).toBe('id-b');
    expect(res.ok && Object.keys(res.scores)).toEqual(['b']);
  });

  it('prefers a node that caches the image', () => {
    const withImage = { ...req, image: 'sha256:abc' };
    const res = schedule([node('a'), node('b', { images: ['sha256:abc'] })], withImage);
    expect(res.ok && res.nodeId).toBe('id-b');
    expect(scoreNode(node('b', { images: ['sha256:abc'] }), withImage, 'spread') - scoreNode(node('a'), withImage, 'spread')).toBe(40);
    // Without an image in the request the cache does not matter.
    expect(scoreNode(node('b', { images: ['sha256:abc'] }), req, 'spread')).toBe(scoreNode(node('a'), req, 'spread'));
  });

  it('spread picks the emptiest node, binpack the fullest that fits', () => {
    const empty = node('empty');
    const half = node('half', { allocated: { cpuMillis: 4000, memoryBytes: 8 * GiB, diskBytes: 0 } });
    const full = node('full', { allocated: { cpuMillis: 7000, memoryBytes: 0, diskBytes: 0 } }); // does not fit
    const spread = schedule([half, empty, full], req, 'spread');
    const binpack = schedule([empty, half, full], req, 'binpack');
    expect(spread.ok && spread.nodeId).toBe('id-empty');
    expect(binpack.ok && binpack.nodeId).toBe('id-half');
    expect(spread.ok && spread.scores).toEqual({ empty: 23, half: 8 });
    expect(binpack.ok && binpack.scores).toEqual({ empty: 8, half: 23 });
  });

  it('defaults to spread', () => {
    const empty = node('b-empty');
    const half = node('a-half', { allocated: { cpuMillis: 4000, memoryBytes: 8 * GiB, diskBytes: 0 } });
    const res = schedule([half, empty], req);
    expect(res.ok && res.nodeId).toBe('id-b-empty');
  });

  it('tenant anti-affinity spreads one org over nodes, with a capped penalty', () => {
    const res = schedule([node('a', { orgBoxes: 2 }), node('b', { orgBoxes: 0 })], req);
    expect(res.ok && res.nodeId).toBe('id-b');
    expect(res.ok && res.scores.a! - res.scores.b!).toBe(-10);
    expect(scoreNode(node('a', { orgBoxes: 100 }), req, 'spread') - scoreNode(node('a'), req, 'spread')).toBe(-20);
    // The image cache outweighs the org penalty.
    const img = { ...req, image: 'img' };
    const r2 = schedule([node('a', { orgBoxes: 4, images: ['img'] }), node('b')], img);
    expect(r2.ok && r2.nodeId).toBe('id-a');
  });

  it('breaks ties by node name, whatever the order of the snapshot', () => {
    const nodes = [node('c'), node('a'), node('b')];
    for (const order of [nodes, [...nodes].reverse(), [nodes[1]!, nodes[2]!, nodes[0]!]]) {
      const res = schedule(order, req);
      expect(res.ok && res.nodeId).toBe('id-a');
    }
  });

  it('treats a zero-capacity dimension as no free room rather than dividing by zero', () => {
    const s = scoreNode(node('a', { capacity: { cpuMillis: 8000, memoryBytes: 0, diskBytes: 200 * GiB } }), { ...req, resources: { ...req.resources, memoryBytes: 0 } }, 'spread');
    expect(Number.isFinite(s)).toBe(true);
  });

  it('property: the choice fits, is the best score, and does not depend on the input order', () => {
    const arbNode = fc.record({
      name: fc.constantFrom('n1', 'n2', 'n3', 'n4', 'n5'),
      ready: fc.boolean(),
      cordoned: fc.boolean(),
      cpuUsed: fc.integer({ min: 0, max: 8000 }),
      memUsed: fc.integer({ min: 0, max: 16 }),
      cached: fc.boolean(),
      orgBoxes: fc.nat(5),
    });
    fc.assert(
      fc.property(
        fc.uniqueArray(arbNode, { selector: (n) => n.name, maxLength: 5 }),
        fc.constantFrom<'spread' | 'binpack'>('spread', 'binpack'),
        fc.infiniteStream(fc.nat()),
        (specs, policy, rnd) => {
          const nodes = specs.map((s) =>
            node(s.name, {
              ready: s.ready,
              cordoned: s.cordoned,
              allocated: { cpuMillis: s.cpuUsed, memoryBytes: s.memUsed * GiB, diskBytes: 0 },
              images: s.cached ? ['img'] : [],
              orgBoxes: s.orgBoxes,
            }),
          );
          const r = { ...req, image: 'img' };
          const res = schedule(nodes, r, policy);
          const fit = nodes.filter((n) => filterNode(n, r).length === 0);
          if (fit.length === 0) {
            expect(res.ok).toBe(false);
            if (!res.ok) expect(Object.keys(res.reasons).length).toBe(nodes.length);
            return;
          }
          expect(res.ok).toBe(true);
          if (!res.ok) return;
          const chosen = nodes.find((n) => n.id === res.nodeId)!;
          expect(filterNode(chosen, r)).toEqual([]);
          const best = Math.max(...fit.map((n) => scoreNode(n, r, policy)));
          expect(res.scores[chosen.name]).toBe(best);
          const ties = fit.filter((n) => scoreNode(n, r, policy) === best).map((n) => n.name).sort();
          expect(chosen.name).toBe(ties[0]);
          // Shuffle and ask again.
          const it = rnd[Symbol.iterator]();
          const shuffled = [...nodes].sort(() => ((it.next().value as number) % 3) - 1);
          const again = schedule(shuffled, r, policy);
          expect(again.ok && again.nodeId).toBe(res.nodeId);
        },
      ),
      { numRuns: 300 },
    );
  });
});
