/** Leases with fencing tokens in the real SQLite store, including the dead-holder takeover. */
import { mkdtempSync, rmSync } from 'node:fs';
import { hostname, tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { deadLocalHolder } from '@devyard/server/loops/box-reconciler';
import { openSqliteDatabase } from '@devyard/server/store/sqlite-database';
import { Store } from '@devyard/server/store/store';

let dir: string;
let store: Store;

beforeAll(async () => {
  dir = mkdtempSync(join(tmpdir(), 'devyard-lease-'));
  store = new Store(await openSqliteDatabase(join(dir, 'db.sqlite')));
});

afterAll(async () => {
  await store.close();
  rmSync(dir, { recursive: true, force: true });
});

describe('leases', () => {
  it('are exclusive until they expire; the token grows when the holder changes', async () => {
    expect(await store.acquireLease('a', 'w1', 1000, 0)).toBe(1);
    expect(await store.acquireLease('a', 'w1', 1000, 10)).toBe(1); // renewal keeps the token
    expect(await store.acquireLease('a', 'w2', 1000, 500)).toBeNull();
    expect(await store.acquireLease('a', 'w2', 1000, 2000)).toBe(2);
    // The old holder's writes are now refused.
    await expect(store.transaction((tx) => store.assertLease('a', 'w1', 1, 2001, tx))).rejects.toMatchObject({ code: 'stale-lease' });
    await store.transaction((tx) => store.assertLease('a', 'w2', 2, 2001, tx));
  });

  it('are taken over at once from a crashed process on this host, never from a live one', async () => {
    const dead = `${hostname()}:2147483646`; // no such pid
    const live = `${hostname()}:1`; // init is always alive
    const other = `elsewhere:2147483646`; // another host: never presumed dead
    const isDead = deadLocalHolder(hostname());
    expect([isDead(dead), isDead(live), isDead(other)]).toEqual([true, false, false]);
    for (const [name, holder, expected] of [
      ['d', dead, 2],
      ['l', live, null],
      ['o', other, null],
    ] as const) {
      expect(await store.acquireLease(name, holder, 60_000, 0)).toBe(1);
      expect(await store.acquireLease(name, `${hostname()}:${process.pid}`, 60_000, 10, isDead)).toBe(expected);
    }
  });
});
