/**
 * Session activity per box: the last time a byte went through any session of this gateway and the
 * number of open sessions, reported to the server with each sync (idle policies read it there).
 */
import type { BoxActivity } from '@devyard/api/gateway-schemas';

export class ActivityTracker {
  private readonly boxes = new Map<string, { lastActiveAt: number; sessions: number; dirty: boolean }>();

  constructor(private readonly now: () => number = Date.now) {}

  private entry(boxId: string) {
    let e = this.boxes.get(boxId);
    if (!e) this.boxes.set(boxId, (e = { lastActiveAt: this.now(), sessions: 0, dirty: true }));
    return e;
  }

  /** A session opened; call the returned function when it closes. */
  open(boxId: string): () => void {
    const e = this.entry(boxId);
    e.sessions++;
    e.lastActiveAt = this.now();
    e.dirty = true;
    let closed = false;
    return () => {
      if (closed) return;
      closed = true;
      e.sessions--;
      e.lastActiveAt = this.now();
      e.dirty = true;
    };
  }

  /** Bytes went through a session of the box. Cheap: called per chunk. */
  touch(boxId: string): void {
    const e = this.entry(boxId);
    e.lastActiveAt = this.now();
    e.dirty = true;
  }

  /** Boxes whose activity changed since the last drain. */
  drain(): BoxActivity[] {
    const out: BoxActivity[] = [];
    for (const [boxId, e] of this.boxes) {
      if (!e.dirty) continue;
      e.dirty = false;
      out.push({ boxId, lastActiveAt: e.lastActiveAt, sessions: e.sessions });
      if (e.sessions === 0) this.boxes.delete(boxId);
    }
    return out;
  }

  /** Puts back activity a failed sync could not deliver (newer local state wins). */
  restore(items: BoxActivity[]): void {
    for (const a of items) {
      const e = this.boxes.get(a.boxId);
      if (e) e.dirty = true;
      else this.boxes.set(a.boxId, { lastActiveAt: a.lastActiveAt, sessions: a.sessions, dirty: true });
    }
  }

  /** Open sessions of a box on this gateway. */
  sessions(boxId: string): number {
    return this.boxes.get(boxId)?.sessions ?? 0;
  }
}
