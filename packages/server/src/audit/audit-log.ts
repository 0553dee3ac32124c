/**
 * The audit log: an append-only, hash-chained record of every mutation, one
 * chain per organization. Entry n stores `hash = sha256(prevHash + canonicalJson(fields of n))`
 * where prevHash is entry n-1's hash (64 zeros for n = 1), so editing any stored field breaks that
 * entry's hash and removing an entry leaves a gap in seq or a broken link. Removing the *newest*
 * entries leaves a shorter but valid chain, so the newest (seq, hash) of each org is also kept in
 * `audit_heads`, written in the same transaction as the entry, and verify compares the two.
 *
 * Limit: whoever can write the database can rewrite a whole chain and its head consistently. Only
 * a copy of the head kept elsewhere (an export, a log shipper, a notary) catches that.
 */
import { createHash } from 'node:crypto';
import { DomainError } from '@devyard/core/domain-error';
import type { Selectable } from 'kysely';
import { DEFAULT_ORG_ID } from '../services/box-service.js';
import type { AuditLogTable } from '../store/database-schema.js';
import { isUniqueViolation, type Executor, type Store } from '../store/store.js';

/** prevHash of the first entry of every chain. */
export const GENESIS_HASH = '0'.repeat(64);

export type AuditResult = 'ok' | 'denied' | 'error';

/** What a caller records; seq, time (unless given), prevHash and hash are assigned by append. */
export interface AuditEntryInput {
  /** Organization whose chain the entry joins. */
  orgId: string;
  /** Subject name, `system:<loop>` for background loops, `anonymous` when unauthenticated. */
  actor: string;
  /** operationId of the API route, or the system action (`scheduleBox`, `failBox`, …). */
  action: string;
  /** What was acted on, e.g. `box/demo`. */
  target?: string | null;
  /** The HTTP request id (x-request-id), when the entry comes from a request. */
  requestId?: string | null;
  /** Client address, when the entry comes from a request. */
  source?: string | null;
  /** Outcome of the action. */
  result: AuditResult;
  /** Small JSON object with context (problem status and code of a failed request, …). */
  detail?: Record<string, unknown> | null;
  /** Epoch milliseconds; defaults to the log's clock. */
  time?: number;
}

/** A stored entry. */
export interface AuditRecord {
  /** Organization of the chain. */
  orgId: string;
  /** Position in the org's chain, from 1, without gaps. */
  seq: number;
  /** Epoch milliseconds. */
  time: number;
  /** Who acted. */
  actor: string;
  /** What was done. */
  action: string;
  /** What it was done to. */
  target: string | null;
  /** HTTP request id, if any. */
  requestId: string | null;
  /** Client address, if any. */
  source: string | null;
  /** Outcome. */
  result: AuditResult;
  /** Context, if any. */
  detail: Record<string, unknown> | null;
  /** Hash of the previous entry (GENESIS_HASH for seq 1). */
  prevHash: string;
  /** sha256(prevHash + canonicalJson(hashed fields)), hex. */
  hash: string;
}

export interface AuditListFilter {
  /** Whose chain. */
  orgId: string;
  /** Only entries at or after this time (epoch ms). */
  since?: number;
  /** Only entries of this actor. */
  actor?: string;
  /** At most this many (default 100, at most 10 000). */
  limit?: number;
  /** Only entries with a larger seq (forward paging). */
  afterSeq?: number;
  /** asc (default): oldest first; desc: newest first. */
  order?: 'asc' | 'desc';
}

export type AuditVerification = { ok: true; entries: number } | { ok: false; entries: number; seq: number; reason: string };

/** The org a box's entries belong to. */
export function orgOfBox(box: { orgId?: string | null }): string {
  return box.orgId ?? DEFAULT_ORG_ID;
}

/** JSON with object keys sorted (by UTF-16 code unit, as Array#sort) and no whitespace. */
export function canonicalJson(value: unknown): string {
  if (value === null || typeof value !== 'object') return JSON.stringify(value) ?? 'null';
  if (Array.isArray(value)) return `[${value.map((v) => (v === undefined ? 'null' : canonicalJson(v))).join(',')}]`;
  const o = value as Record<string, unknown>;
  const keys = Object.keys(o)
    .filter((k) => o[k] !== undefined)
    .sort();
  return `{${keys.map((k) => `${JSON.stringify(k)}:${canonicalJson(o[k])}`).join(',')}}`;
}

/** The hash of an entry: every field except the hashes themselves, chained to the previous hash. */
export function entryHash(prevHash: string, e: Omit<AuditRecord, 'prevHash' | 'hash'>): string {
  const fields = {
    org: e.orgId,
    seq: e.seq,
    time: e.time,
    actor: e.actor,
    action: e.action,
    target: e.target,
    requestId: e.requestId,
    source: e.source,
    result: e.result,
    detail: e.detail,
  };
  return createHash('sha256').update(prevHash + canonicalJson(fields)).digest('hex');
}

const MAX_ATTEMPTS = 20;

/** Errors that mean another writer appended first: retry on the new head. */
function isRace(e: unknown): boolean {
  const code = (e as { code?: string })?.code ?? '';
  return (
    isUniqueViolation(e) ||
    (e instanceof DomainError && e.code === 'conflict' && e.details.reason === 'audit-head-moved') ||
    code.startsWith('SQLITE_BUSY') ||
    code === '40001' // PostgreSQL serialization failure
  );
}

/** A row as a record; `strict` (verify) throws on a detail that is not JSON, reads keep going. */
function fromRow(r: Selectable<AuditLogTable>, strict = false): AuditRecord {
  let detail: Record<string, unknown> | null = null;
  if (r.detail !== null) {
    try {
      detail = JSON.parse(r.detail) as Record<string, unknown>;
    } catch (e) {
      if (strict) throw e;
      detail = { unparseable: r.detail };
    }
  }
  return {
    orgId: r.org_id,
    seq: Number(r.seq),
    time: Number(r.time),
    actor: r.actor,
    action: r.action,
    target: r.target,
    requestId: r.request_id,
    source: r.source,
    result: r.result as AuditResult,
    detail,
    prevHash: r.prev_hash,
    hash: r.hash,
  };
}

export class AuditLog {
  constructor(
    private readonly store: Store,
    private readonly now: () => number = Date.now,
  ) {}

  /**
   * Appends one entry. With `ex` (the caller's transaction) the entry lands with the caller's
   * writes or not at all; a racing writer then surfaces as a `conflict` the caller retries (the
   * reconciler does). Without `ex` it runs its own transaction and retries races itself.
   */
  async append(entry: AuditEntryInput, ex?: Executor): Promise<AuditRecord> {
    if (ex) {
      try {
        return await this.appendIn(ex, entry);
      } catch (e) {
        if (isRace(e)) throw new DomainError('conflict', 'the audit log moved concurrently; retry', { reason: 'audit-head-moved' });
        throw e;
      }
    }
    for (let attempt = 1; ; attempt++) {
      try {
        return await this.store.transaction((tx) => this.appendIn(tx, entry));
      } catch (e) {
        if (!isRace(e) || attempt >= MAX_ATTEMPTS) throw e;
        await new Promise((r) => setTimeout(r, Math.random() * 5 * attempt));
      }
    }
  }

  private async appendIn(ex: Executor, entry: AuditEntryInput): Promise<AuditRecord> {
    const org = entry.orgId;
    const head = await ex.selectFrom('audit_heads').select(['seq', 'hash']).where('org_id', '=', org).executeTakeFirst();
    // No head but entries (the heads row was lost): go on from the newest entry rather than fail
    // every append on the primary key; verify still reports the missing head until then.
    const prev = head ?? (await ex.selectFrom('audit_log').select(['seq', 'hash']).where('org_id', '=', org).orderBy('seq', 'desc').limit(1).executeTakeFirst());
    const prevSeq = prev ? Number(prev.seq) : 0;
    const prevHash = prev?.hash ?? GENESIS_HASH;
    const fields: Omit<AuditRecord, 'prevHash' | 'hash'> = {
      orgId: org,
      seq: prevSeq + 1,
      time: entry.time ?? this.now(),
      actor: entry.actor,
      action: entry.action,
      target: entry.target ?? null,
      requestId: entry.requestId ?? null,
      source: entry.source ?? null,
      result: entry.result,
      // Through canonical JSON once, so the stored text and the hashed value are the same thing.
      detail: entry.detail == null ? null : (JSON.parse(canonicalJson(entry.detail)) as Record<string, unknown>),
    };
    const rec: AuditRecord = { ...fields, prevHash, hash: entryHash(prevHash, fields) };
    await ex
      .insertInto('audit_log')
      .values({
        org_id: rec.orgId,
        seq: rec.seq,
        time: rec.time,
        actor: rec.actor,
        action: rec.action,
        target: rec.target,
        request_id: rec.requestId,
        source: rec.source,
        result: rec.result,
        detail: rec.detail === null ? null : canonicalJson(rec.detail),
        prev_hash: rec.prevHash,
        hash: rec.hash,
      })
      .execute();
    if (head) {
      // Compare-and-set on the head: of two writers that read the same head, one moves it.
      const res = await ex.updateTable('audit_heads').set({ seq: rec.seq, hash: rec.hash }).where('org_id', '=', org).where('seq', '=', prevSeq).executeTakeFirst();
      if (Number(res.numUpdatedRows) !== 1) throw new DomainError('conflict', 'the audit log moved concurrently; retry', { reason: 'audit-head-moved' });
    } else {
      await ex.insertInto('audit_heads').values({ org_id: org, seq: rec.seq, hash: rec.hash }).execute();
    }
    return rec;
  }

  /** Entries of one org's chain, by seq. */
  async list(f: AuditListFilter): Promise<AuditRecord[]> {
    const order = f.order ?? 'asc';
    let q = this.store.db
      .selectFrom('audit_log')
      .selectAll()
      .where('org_id', '=', f.orgId)
      .orderBy('seq', order)
      .limit(Math.min(Math.max(f.limit ?? 100, 1), 10_000));
    if (f.since !== undefined) q = q.where('time', '>=', f.since);
    if (f.actor !== undefined) q = q.where('actor', '=', f.actor);
    if (f.afterSeq !== undefined) q = q.where('seq', '>', f.afterSeq);
    return (await q.execute()).map((r) => fromRow(r));
  }

  /** Every entry matching the filter, oldest first, read page by page (the export). */
  async *iterate(f: Omit<AuditListFilter, 'limit' | 'order'>, max = Infinity): AsyncGenerator<AuditRecord> {
    let after = f.afterSeq ?? 0;
    let left = max;
    while (left > 0) {
      const page = await this.list({ ...f, afterSeq: after, limit: Math.min(500, left), order: 'asc' });
      for (const e of page) yield e;
      if (page.length === 0 || page.length < Math.min(500, left)) return;
      left -= page.length;
      after = page.at(-1)!.seq;
    }
  }

  /**
   * Checks one org's chain from its first entry: seq runs 1, 2, 3… without gaps, every entry's
   * hash matches its fields, every entry links to the previous one, and the chain reaches the
   * recorded head. Answers the first seq found wrong.
   *
   * The head is read first and only entries up to it are checked: entries and head are written in
   * one transaction, so everything up to that head exists, and what is appended while verify runs
   * (the server keeps writing) is neither checked nor mistaken for a mismatch.
   */
  async verify(orgId: string): Promise<AuditVerification> {
    const head = await this.store.db.selectFrom('audit_heads').select(['seq', 'hash']).where('org_id', '=', orgId).executeTakeFirst();
    const headSeq = head ? Number(head.seq) : Number.MAX_SAFE_INTEGER;
    let expected = 1;
    let prevHash = GENESIS_HASH;
    let entries = 0;
    const fail = (seq: number, reason: string): AuditVerification => ({ ok: false, entries, seq, reason });
    // Rows below 1 only exist if someone renumbered them.
    const odd = await this.store.db.selectFrom('audit_log').select('seq').where('org_id', '=', orgId).where('seq', '<', 1).executeTakeFirst();
    if (odd) return fail(Number(odd.seq), `entry with seq ${Number(odd.seq)} is out of the chain (seq starts at 1): renumbered`);
    for (;;) {
      const rows = await this.store.db
        .selectFrom('audit_log')
        .selectAll()
        .where('org_id', '=', orgId)
        .where('seq', '>=', expected)
        .where('seq', '<=', headSeq)
        .orderBy('seq')
        .limit(1000)
        .execute();
      if (rows.length === 0) break;
      for (const row of rows) {
        const seq = Number(row.seq);
        if (seq !== expected) return fail(expected, `entry ${expected} is missing (the chain goes on at ${seq}): deleted`);
        let rec: AuditRecord;
        try {
          rec = fromRow(row, true);
        } catch {
          return fail(seq, `entry ${seq} was edited: its detail is not JSON`);
        }
        if (entryHash(rec.prevHash, rec) !== rec.hash) return fail(seq, `entry ${seq} was edited: its hash does not match its fields`);
        if (rec.prevHash !== prevHash) {
          return fail(seq, `entry ${seq} does not link to entry ${seq - 1}: ${seq === 1 ? 'the first entry was replaced' : `entry ${seq - 1} was changed or replaced`}`);
        }
        prevHash = rec.hash;
        expected++;
        entries++;
      }
    }
    const last = expected - 1;
    if (!head) {
      if (entries === 0) return { ok: true, entries };
      // The org's first entry may have landed (with its head) while we read: look once more.
      if (await this.store.db.selectFrom('audit_heads').select('seq').where('org_id', '=', orgId).executeTakeFirst()) return this.verify(orgId);
      return fail(last, `the chain has ${entries} entries but no recorded head: the head was deleted`);
    }
    // Entries past the head are fine only if the head has moved on since (appended meanwhile): an
    // entry is committed with its head, so reading the entry first and the head after is safe.
    const beyond = await this.store.db.selectFrom('audit_log').select('seq').where('org_id', '=', orgId).where('seq', '>', headSeq).orderBy('seq').limit(1).executeTakeFirst();
    if (beyond) {
      const now = await this.store.db.selectFrom('audit_heads').select('seq').where('org_id', '=', orgId).executeTakeFirst();
      if (!now || Number(now.seq) < Number(beyond.seq)) return fail(headSeq + 1, `entry ${headSeq + 1} lies beyond the recorded head (${headSeq}): the head was moved back`);
    }
    if (headSeq > last) return fail(last + 1, `entries ${last + 1}…${headSeq} are missing: the chain ends at ${last} but its head is ${headSeq} (newest entries deleted)`);
    if (head.hash !== prevHash) return fail(last, `entry ${last} is not the recorded head: the head or the newest entry was changed`);
    return { ok: true, entries };
  }
}
