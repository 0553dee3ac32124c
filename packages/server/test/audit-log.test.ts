/**
 * The audit hash chain against a real SQLite file: append and verify, tampering done the way an
 * attacker with the database file would (a second connection editing rows), and concurrent writers.
 */
import { createHash } from 'node:crypto';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import SqliteDb from 'better-sqlite3';
import { Kysely, SqliteDialect } from 'kysely';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { AuditLog, canonicalJson, GENESIS_HASH, type AuditEntryInput } from '@devyard/server/audit/audit-log';
import type { Database } from '@devyard/server/store/database-schema';
import { migrate, openSqliteDatabase } from '@devyard/server/store/sqlite-database';
import { Store } from '@devyard/server/store/store';

let dir: string;
let file: string;
let store: Store;
let log: AuditLog;
let clock: number;

const entry = (i: number, over: Partial<AuditEntryInput> = {}): AuditEntryInput => ({
  orgId: 'org_a',
  actor: i % 2 ? 'alice' : 'bob',
  action: 'createBox',
  target: `box/b${i}`,
  requestId: `req-${i}`,
  source: '127.0.0.1',
  result: 'ok',
  ...over,
});

/** A second connection to the file, as someone with access to the database would open it. */
function tamper(statement: string, ...params: unknown[]): number {
  const db = new SqliteDb(file);
  try {
    return db.prepare(statement).run(...params).changes;
  } finally {
    db.close();
  }
}

async function appendN(n: number, over: Partial<AuditEntryInput> = {}) {
  for (let i = 1; i <= n; i++) await log.append(entry(i, over));
}

beforeEach(async () => {
  dir = mkdtempSync(join(tmpdir(), 'devyard-audit-'));
  file = join(dir, 'devyard.db');
  store = new Store(await openSqliteDatabase(file));
  clock = Date.parse('2025-01-01T00:00:00Z');
  log = new AuditLog(store, () => (clock += 1000));
});

afterEach(async () => {
  await store.close();
  rmSync(dir, { recursive: true, force: true });
});

describe('canonical JSON', () => {
  it('sorts keys at every depth and has no whitespace', () => {
    expect(canonicalJson({ b: 1, a: { d: [1, { z: null, y: 'x' }], c: true }, u: undefined })).toBe('{"a":{"c":true,"d":[1,{"y":"x","z":null}]},"b":1}');
    expect(canonicalJson('a"b')).toBe('"a\\"b"');
    expect(canonicalJson(null)).toBe('null');
  });
});

describe('append and verify', () => {
  it('chains entries from the genesis hash with seq 1, 2, 3 per org', async () => {
    const first = await log.append(entry(1, { detail: { z: 1, a: 'x' } }));
    expect(first).toMatchObject({ seq: 1, orgId: 'org_a', prevHash: GENESIS_HASH, detail: { a: 'x', z: 1 } });
    const fields = { org: 'org_a', seq: 1, time: first.time, actor: 'alice', action: 'createBox', target: 'box/b1', requestId: 'req-1', source: '127.0.0.1', result: 'ok', detail: { a: 'x', z: 1 } };
    // Independent of the implementation: sha256(prevHash + canonical JSON of the fields).
    expect(first.hash).toBe(createHash('sha256').update(GENESIS_HASH + canonicalJson(fields)).digest('hex'));
    const second = await log.append(entry(2));
    expect(second).toMatchObject({ seq: 2, prevHash: first.hash });
    const other = await log.append(entry(3, { orgId: 'org_b' }));
    expect(other).toMatchObject({ seq: 1, prevHash: GENESIS_HASH });
    expect(await log.verify('org_a')).toEqual({ ok: true, entries: 2 });
    expect(await log.verify('org_b')).toEqual({ ok: true, entries: 1 });
    expect(await log.verify('org_empty')).toEqual({ ok: true, entries: 0 });
  });

  it('lists by time, actor, page and order', async () => {
    await appendN(6);
    const all = await log.list({ orgId: 'org_a' });
    expect(all.map((e) => e.seq)).toEqual([1, 2, 3, 4, 5, 6]);
    expect((await log.list({ orgId: 'org_a', actor: 'bob' })).map((e) => e.seq)).toEqual([2, 4, 6]);
    expect((await log.list({ orgId: 'org_a', since: all[3]!.time })).map((e) => e.seq)).toEqual([4, 5, 6]);
    expect((await log.list({ orgId: 'org_a', afterSeq: 2, limit: 2 })).map((e) => e.seq)).toEqual([3, 4]);
    expect((await log.list({ orgId: 'org_a', order: 'desc', limit: 2 })).map((e) => e.seq)).toEqual([6, 5]);
    expect((await log.list({ orgId: 'org_b' })).length).toBe(0);
    const it = log.iterate({ orgId: 'org_a', afterSeq: 1 }, 4);
    const seqs: number[] = [];
    for await (const e of it) seqs.push(e.seq);
    expect(seqs).toEqual([2, 3, 4, 5]);
  });

  it("appends within the caller's transaction: rolled back with it", async () => {
    await appendN(2);
    await expect(
      store.transaction(async (tx) => {
        await log.append(entry(3), tx);
        throw new Error('caller fails');
      }),
    ).rejects.toThrow('caller fails');
    expect((await log.list({ orgId: 'org_a' })).length).toBe(2);
    await store.transaction(async (tx) => {
      await log.append(entry(3), tx);
    });
    expect(await log.verify('org_a')).toEqual({ ok: true, entries: 3 });
  });
});

describe('tamper detection', () => {
  beforeEach(() => appendN(5));

  it('names the entry whose field was edited', async () => {
    expect(tamper("UPDATE audit_log SET actor = 'mallory' WHERE org_id = 'org_a' AND seq = 3")).toBe(1);
    const v = await log.verify('org_a');
    expect(v).toMatchObject({ ok: false, seq: 3 });
    expect(v.ok === false && v.reason).toContain('edited');
  });

  it('names an edited detail and an edited time', async () => {
    tamper("UPDATE audit_log SET detail = '{\"status\":200}' WHERE org_id = 'org_a' AND seq = 2");
    expect(await log.verify('org_a')).toMatchObject({ ok: false, seq: 2 });
    tamper("UPDATE audit_log SET detail = NULL WHERE org_id = 'org_a' AND seq = 2");
    expect(await log.verify('org_a')).toEqual({ ok: true, entries: 5 });
    tamper("UPDATE audit_log SET time = time - 1 WHERE org_id = 'org_a' AND seq = 4");
    expect(await log.verify('org_a')).toMatchObject({ ok: false, seq: 4 });
  });

  it('catches an entry rewritten with a matching hash at the next link', async () => {
    const [e2] = await log.list({ orgId: 'org_a', afterSeq: 1, limit: 1 });
    const { entryHash } = await import('@devyard/server/audit/audit-log');
    const forged = { ...e2!, result: 'denied' as const };
    tamper("UPDATE audit_log SET result = 'denied', hash = ? WHERE org_id = 'org_a' AND seq = 2", entryHash(forged.prevHash, forged));
    const v = await log.verify('org_a');
    expect(v).toMatchObject({ ok: false, seq: 3 });
    expect(v.ok === false && v.reason).toContain('does not link to entry 2');
  });

  it('names a deleted entry in the middle', async () => {
    tamper("DELETE FROM audit_log WHERE org_id = 'org_a' AND seq = 3");
    const v = await log.verify('org_a');
    expect(v).toMatchObject({ ok: false, seq: 3 });
    expect(v.ok === false && v.reason).toContain('missing');
  });

  it('names a deleted first entry', async () => {
    tamper("DELETE FROM audit_log WHERE org_id = 'org_a' AND seq = 1");
    expect(await log.verify('org_a')).toMatchObject({ ok: false, seq: 1 });
  });

  it('detects deleted newest entries through the head', async () => {
    tamper("DELETE FROM audit_log WHERE org_id = 'org_a' AND seq >= 4");
    const v = await log.verify('org_a');
    expect(v).toMatchObject({ ok: false, seq: 4 });
    expect(v.ok === false && v.reason).toContain('head');
  });

  it('detects a deleted head, and a whole chain deleted with its entries still headed', async () => {
    tamper("DELETE FROM audit_heads WHERE org_id = 'org_a'");
    expect(await log.verify('org_a')).toMatchObject({ ok: false, seq: 5 });
    // Appends go on from the newest entry rather than failing for ever.
    await log.append(entry(6));
    expect(await log.verify('org_a')).toEqual({ ok: true, entries: 6 });
    tamper("DELETE FROM audit_log WHERE org_id = 'org_a'");
    expect(await log.verify('org_a')).toMatchObject({ ok: false, seq: 1 });
  });

  it('detects a head moved back to an earlier entry', async () => {
    const [e3] = await log.list({ orgId: 'org_a', afterSeq: 2, limit: 1 });
    tamper("UPDATE audit_heads SET seq = 3, hash = ? WHERE org_id = 'org_a'", e3!.hash);
    expect(await log.verify('org_a')).toMatchObject({ ok: false, seq: 4 });
  });

  it('does not mistake entries appended while it runs for tampering', async () => {
    const results = await Promise.all([log.verify('org_a'), ...Array.from({ length: 20 }, (_, i) => log.append(entry(i + 10))), log.verify('org_a')]);
    expect(results[0]).toMatchObject({ ok: true });
    expect(results.at(-1)).toMatchObject({ ok: true });
    expect(await log.verify('org_a')).toEqual({ ok: true, entries: 25 });
  });

  it('keeps appending after the newest entries were deleted, and verify still shows the gap', async () => {
    tamper("DELETE FROM audit_log WHERE org_id = 'org_a' AND seq = 5");
    const next = await log.append(entry(6));
    expect(next.seq).toBe(6);
    expect(await log.verify('org_a')).toMatchObject({ ok: false, seq: 5 });
  });
});

describe('concurrent appends', () => {
  it('50 appends at once make one unbroken chain', async () => {
    const done = await Promise.all(Array.from({ length: 50 }, (_, i) => log.append(entry(i + 1))));
    expect(done.map((e) => e.seq).sort((a, b) => a - b)).toEqual(Array.from({ length: 50 }, (_, i) => i + 1));
    expect(await log.verify('org_a')).toEqual({ ok: true, entries: 50 });
  });

  it('two connections racing for the same head make one unbroken chain', async () => {
    // Two independent writers on one file (as two server processes would be). busy_timeout 0:
    // a writer that finds the file locked fails at once and retries on the new head.
    const open = async () => {
      const raw = new SqliteDb(file);
      raw.pragma('journal_mode = WAL');
      raw.pragma('busy_timeout = 0');
      const db = new Kysely<Database>({ dialect: new SqliteDialect({ database: raw }) });
      await migrate(db);
      return new Store(db);
    };
    const [s1, s2] = await Promise.all([open(), open()]);
    try {
      const l1 = new AuditLog(s1);
      const l2 = new AuditLog(s2);
      await Promise.all(Array.from({ length: 50 }, (_, i) => (i % 2 ? l1 : l2).append(entry(i + 1, { actor: i % 2 ? 'one' : 'two' }))));
    } finally {
      await s1.close();
      await s2.close();
    }
    expect(await log.verify('org_a')).toEqual({ ok: true, entries: 50 });
    const all = await log.list({ orgId: 'org_a', limit: 100 });
    expect(all.filter((e) => e.actor === 'one').length).toBe(25);
  });
});
