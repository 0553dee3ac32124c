/**
 * In-process notifications of store changes, used to wake reconcilers and push SSE watches.
 * It is only a hint: every consumer re-reads the store, so a lost notification delays work but
 * never loses it (periodic resyncs catch up). With PostgreSQL this becomes LISTEN/NOTIFY.
 */
import { EventEmitter } from 'node:events';
import type { BoxRecord } from './store/box-records.js';

export interface ChangeFeedEvents {
  /** A box row changed (and events may have been appended for it). */
  box: [BoxRecord];
  /** The desired set of a node may have changed. */
  node: [string];
}

export class ChangeFeed extends EventEmitter<ChangeFeedEvents> {
  constructor() {
    super();
    // Every SSE watcher adds a listener; the default cap of 10 would warn at the 11th client.
    this.setMaxListeners(0);
  }
}
