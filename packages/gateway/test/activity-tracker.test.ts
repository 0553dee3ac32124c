import { describe, expect, it } from 'vitest';
import { ActivityTracker } from '@devyard/gateway/activity-tracker';

describe('activity tracker', () => {
  it('reports open sessions and the last activity once per change', () => {
    let now = 1000;
    const t = new ActivityTracker(() => now);
    const close = t.open('b1');
    now = 2000;
    t.touch('b1');
    expect(t.drain()).toEqual([{ boxId: 'b1', lastActiveAt: 2000, sessions: 1 }]);
    expect(t.drain()).toEqual([]);
    now = 3000;
    close();
    close(); // idempotent
    expect(t.drain()).toEqual([{ boxId: 'b1', lastActiveAt: 3000, sessions: 0 }]);
    expect(t.sessions('b1')).toBe(0);
  });

  it('keeps activity a failed sync could not deliver', () => {
    const t = new ActivityTracker(() => 5);
    t.touch('b2');
    const lost = t.drain();
    t.restore(lost);
    expect(t.drain()).toEqual([{ boxId: 'b2', lastActiveAt: 5, sessions: 0 }]);
  });
});
