/**
 * How many watch streams (Server-Sent Events) each user may hold open at once. A stream costs the
 * server a connection, a change-feed listener and work on every change; without a cap one member's
 * script could open thousands and slow every other tenant's requests.
 */
import { DomainError } from '@devyard/core/domain-error';
import type { Subject } from '../services/box-service.js';

/** Open streams per user unless the operator sets another limit. */
export const DEFAULT_WATCHES_PER_USER = 32;

export class WatchSlots {
  private readonly open = new Map<string, number>();

  constructor(private readonly perUser: number = DEFAULT_WATCHES_PER_USER) {}

  /**
   * Takes a slot for a new stream of `subject`, or refuses with 429 when the user holds all of
   * theirs. Users are counted across organizations (one person, one budget); nodes, gateways and
   * system loops are the installation's own and are not counted. The returned function gives the
   * slot back, once, however often it is called.
   */
  take(subject: Subject): () => void {
    if (subject.kind !== 'user') return () => {};
    const key = subject.userId ?? subject.name;
    const held = this.open.get(key) ?? 0;
    if (held >= this.perUser) {
      throw new DomainError('too-many-requests', `${subject.name} has ${held} watches open, the most one user may hold; close one before opening another`, { limit: this.perUser });
    }
    this.open.set(key, held + 1);
    let released = false;
    return () => {
      if (released) return;
      released = true;
      const left = (this.open.get(key) ?? 1) - 1;
      if (left <= 0) this.open.delete(key);
      else this.open.set(key, left);
    };
  }

  /** Streams `subject` holds open now. */
  heldBy(subject: Pick<Subject, 'name' | 'userId'>): number {
    return this.open.get(subject.userId ?? subject.name) ?? 0;
  }
}
