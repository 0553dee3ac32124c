/**
 * The data layer. Every read and write of the control plane goes through here, over Kysely, so the
 * SQL is portable between the embedded SQLite store and PostgreSQL. Methods take an optional
 * executor so callers can group several of them into one transaction.
 */
import type { TemplateSpec } from '@devyard/api/template-schemas';
import { DomainError } from '@devyard/core/domain-error';
import type { Resources } from '@devyard/core/resources';
import type { Insertable, Kysely, Selectable, Transaction } from 'kysely';
import { BOX_LISTING_COLUMNS, boxFromRow, boxListingFromRow, boxToRow, type BoxListing, type BoxRecord } from './box-records.js';
import type { ApiTokenTable, Database, PrebuildTable, NodeTable, OperationTable, TemplateTable } from './database-schema.js';

export type Executor = Kysely<Database> | Transaction<Database>;

/** Where a page of boxes ends: boxes list oldest first, ties broken by id. */
export interface BoxCursor {
  createdAt: number;
  id: string;
}

export interface OrgBoxQuery {
  orgId: string;
  /** Leave out this owner's boxes (the warm pool's, which are nobody's yet). */
  excludeOwner?: string;
  /** Only the boxes this member owns or that are shared with one of their teams. */
  visibleTo?: { owner: string; teamIds: readonly string[] };
  limit: number;
  after?: BoxCursor;
}

export interface NodeRecord {
  id: string;
  name: string;
  arch: string;
  region: string | null;
  labels: Record<string, string>;
  runtimes: string[];
  capacity: Resources;
  allocated: Resources;
  images: string[];
  agentUrl: string;
  sessionKey: string;
  leaseExpiresAt: number;
  cordoned: boolean;
  registeredAt: number;
  version: number;
}

export interface TemplateRecord {
  name: string;
  version: number;
  description: string;
  image: string;
  runtime: string;
  defaultResources: Resources;
  maxResources: Resources;
  env: Record<string, string>;
  createdAt: number;
  /** The validated spec as published; rebuilt from the columns above for rows older than the spec column. */
  spec: TemplateSpec;
  /** `sha256:…` the OCI image (or build base) was pinned to at publish time; null when not pinned. */
  imageDigest: string | null;
  /** Organization that owns the template (built-ins: the default one, shared with every organization). */
  orgId: string;
}

export interface BoxEventRecord {
  id: number;
  boxId: string;
  boxName: string;
  owner: string;
  time: number;
  type: string;
  phase: string | null;
  message: string;
}

function nodeFromRow(r: Selectable<NodeTable>): NodeRecord {
  return {
    id: r.id,
    name: r.name,
    arch: r.arch,
    region: r.region,
    labels: JSON.parse(r.labels),
    runtimes: JSON.parse(r.runtimes),
    capacity: JSON.parse(r.capacity),
    allocated: JSON.parse(r.allocated),
    images: JSON.parse(r.images),
    agentUrl: r.agent_url,
    sessionKey: r.session_key,
    leaseExpiresAt: Number(r.lease_expires_at),
    cordoned: r.cordoned === 1,
    registeredAt: Number(r.registered_at),
    version: Number(r.version),
  };
}

function templateFromRow(r: Selectable<TemplateTable>): TemplateRecord {
  return {
    name: r.name,
    version: Number(r.version),
    description: r.description,
    image: r.image,
    runtime: r.runtime,
    defaultResources: JSON.parse(r.default_resources),
    maxResources: JSON.parse(r.max_resources),
    env: JSON.parse(r.env),
    createdAt: Number(r.created_at),
    spec: r.spec ? (JSON.parse(r.spec) as TemplateSpec) : legacySpec(r),
    imageDigest: r.image_digest ?? null,
    orgId: r.org_id,
  };
}

/** Rows from before migration 0002 only knew these fields; their resources live in the columns. */
function legacySpec(r: Selectable<TemplateTable>): TemplateSpec {
  return { name: r.name, description: r.description, image: r.image, runtime: r.runtime as TemplateSpec['runtime'], env: JSON.parse(r.env) };
}

/** True when a database error is a unique-constraint violation (SQLite or PostgreSQL). */
export function isUniqueViolation(e: unknown): boolean {
  const err = e as { code?: string; message?: string };
  return err?.code === 'SQLITE_CONSTRAINT_UNIQUE' || err?.code === 'SQLITE_CONSTRAINT_PRIMARYKEY' || err?.code === '23505';
}

export class Store {
  constructor(readonly db: Kysely<Database>) {}

  /** Runs fn in one transaction; everything it writes lands together or not at all. */
  transaction<T>(fn: (tx: Transaction<Database>) => Promise<T>): Promise<T> {
    return this.db.transaction().execute(fn);
  }

  async close(): Promise<void> {
    await this.db.destroy();
  }

  // ---- boxes ----

  async insertBox(box: BoxRecord, ex: Executor = this.db): Promise<void> {
    try {
      await ex.insertInto('boxes').values(boxToRow(box)).execute();
    } catch (e) {
      if (isUniqueViolation(e)) throw new DomainError('conflict', `a box named "${box.name}" already exists`, { field: 'name', name: box.name });
      throw e;
    }
  }

  /** A box without its env, by id (deleted ones too): what a watcher needs to decide who sees its events. */
  async getBoxListing(id: string, ex: Executor = this.db): Promise<BoxListing | undefined> {
    const r = await ex.selectFrom('boxes').select(BOX_LISTING_COLUMNS).where('id', '=', id).executeTakeFirst();
    return r && boxListingFromRow(r);
  }

  async getBox(id: string, ex: Executor = this.db): Promise<BoxRecord | undefined> {
    const r = await ex.selectFrom('boxes').selectAll().where('id', '=', id).executeTakeFirst();
    return r && boxFromRow(r);
  }

  /** The live (not finalized) box with this name in the owner's scope. */
  async getBoxByName(owner: string, name: string, ex: Executor = this.db): Promise<BoxRecord | undefined> {
    const r = await ex.selectFrom('boxes').selectAll().where('owner', '=', owner).where('name', '=', name).where('deleted_at', 'is', null).executeTakeFirst();
    return r && boxFromRow(r);
  }

  async listBoxes(filter: { owner?: string; nodeId?: string; includeDeleted?: boolean } = {}, ex: Executor = this.db): Promise<BoxRecord[]> {
    let q = ex.selectFrom('boxes').selectAll().orderBy('created_at').orderBy('id');
    if (filter.owner !== undefined) q = q.where('owner', '=', filter.owner);
    if (filter.nodeId !== undefined) q = q.where('node_id', '=', filter.nodeId);
    if (!filter.includeDeleted) q = q.where('deleted_at', 'is', null);
    return (await q.execute()).map(boxFromRow);
  }

  /**
   * One page of an organization's live boxes, oldest first, without their env. Filtered and
   * limited in SQL (index boxes_org_live), so a list costs what it returns, not what the
   * installation holds.
   */
  async listOrgBoxes(q: OrgBoxQuery, ex: Executor = this.db): Promise<BoxListing[]> {
    let s = ex.selectFrom('boxes').select(BOX_LISTING_COLUMNS).where('org_id', '=', q.orgId).where('deleted_at', 'is', null);
    if (q.excludeOwner !== undefined) s = s.where('owner', '!=', q.excludeOwner);
    const v = q.visibleTo;
    if (v) {
      s = s.where((eb) =>
        v.teamIds.length === 0
          ? eb('owner', '=', v.owner)
          : eb.or([eb('owner', '=', v.owner), eb('id', 'in', eb.selectFrom('box_shares').select('box_id').where('team_id', 'in', [...v.teamIds]))]),
      );
    }
    const after = q.after;
    if (after) {
      s = s.where((eb) => eb.or([eb('created_at', '>', after.createdAt), eb.and([eb('created_at', '=', after.createdAt), eb('id', '>', after.id)])]));
    }
    return (await s.orderBy('created_at').orderBy('id').limit(q.limit).execute()).map(boxListingFromRow);
  }

  /**
   * Boxes bound elsewhere that still have something on this node: those moving away from it (it
   * serves their snapshot) and those it must still delete its copy of, finalized ones included.
   */
  async listBoxesLeftOn(nodeId: string, ex: Executor = this.db): Promise<BoxRecord[]> {
    const rows = await ex
      .selectFrom('boxes')
      .selectAll()
      .where((eb) => eb.or([eb('move_from_node_id', '=', nodeId), eb('cleanup_node_id', '=', nodeId)]))
      .orderBy('created_at')
      .orderBy('id')
      .execute();
    return rows.map(boxFromRow);
  }

  /**
   * Writes a changed box if nobody changed it since it was read (optimistic concurrency on
   * `version`). Returns the stored record with its new version.
   */
  async updateBox(next: BoxRecord, expectedVersion: number, ex: Executor = this.db): Promise<BoxRecord> {
    const row = boxToRow({ ...next, version: expectedVersion + 1 });
    const res = await ex.updateTable('boxes').set(row).where('id', '=', next.id).where('version', '=', expectedVersion).executeTakeFirst();
    if (Number(res.numUpdatedRows) !== 1) {
      throw new DomainError('conflict', `box "${next.name}" was changed concurrently; retry`, { boxId: next.id, reason: 'version-mismatch' });
    }
    return { ...next, version: expectedVersion + 1 };
  }

  async appendEvent(ev: Omit<BoxEventRecord, 'id'>, ex: Executor = this.db): Promise<number> {
    const r = await ex
      .insertInto('box_events')
      .values({ box_id: ev.boxId, box_name: ev.boxName, owner: ev.owner, time: ev.time, type: ev.type, phase: ev.phase, message: ev.message })
      .returning('id')
      .executeTakeFirstOrThrow();
    return Number(r.id);
  }

  /** Id of the newest box event (0 when there is none): where a new watcher's stream starts. */
  async lastEventId(ex: Executor = this.db): Promise<number> {
    const r = await ex.selectFrom('box_events').select((eb) => eb.fn.max('id').as('id')).executeTakeFirst();
    return r?.id == null ? 0 : Number(r.id);
  }

  async listEvents(filter: { boxId?: string; owner?: string; afterId?: number; limit?: number }, ex: Executor = this.db): Promise<BoxEventRecord[]> {
    let q = ex.selectFrom('box_events').selectAll().orderBy('id').limit(filter.limit ?? 1000);
    if (filter.boxId !== undefined) q = q.where('box_id', '=', filter.boxId);
    if (filter.owner !== undefined) q = q.where('owner', '=', filter.owner);
    if (filter.afterId !== undefined) q = q.where('id', '>', filter.afterId);
    return (await q.execute()).map((r) => ({
      id: Number(r.id),
      boxId: r.box_id,
      boxName: r.box_name,
      owner: r.owner,
      time: Number(r.time),
      type: r.type,
      phase: r.phase,
      message: r.message,
    }));
  }

  // ---- operations ----

  async upsertOperation(op: Selectable<OperationTable>, ex: Executor = this.db): Promise<void> {
    await ex
      .insertInto('operations')
      .values(op)
      .onConflict((oc) => oc.column('id').doUpdateSet({ state: op.state, error: op.error, finished_at: op.finished_at }))
      .execute();
  }

  async listOperations(boxId: string, ex: Executor = this.db): Promise<Array<Selectable<OperationTable>>> {
    return ex.selectFrom('operations').selectAll().where('box_id', '=', boxId).orderBy('created_at').execute();
  }

  // ---- idempotency ----

  async getIdempotencyKey(owner: string, key: string, ex: Executor = this.db) {
    return ex.selectFrom('idempotency_keys').selectAll().where('owner', '=', owner).where('key', '=', key).executeTakeFirst();
  }

  async putIdempotencyKey(v: { owner: string; key: string; requestHash: string; boxId: string; now: number }, ex: Executor = this.db): Promise<void> {
    await ex.insertInto('idempotency_keys').values({ owner: v.owner, key: v.key, request_hash: v.requestHash, box_id: v.boxId, created_at: v.now }).execute();
  }

  // ---- templates ----

  async insertTemplate(t: TemplateRecord, ex: Executor = this.db): Promise<void> {
    await ex
      .insertInto('templates')
      .values({
        name: t.name,
        version: t.version,
        description: t.description,
        image: t.image,
        runtime: t.runtime,
        default_resources: JSON.stringify(t.defaultResources),
        max_resources: JSON.stringify(t.maxResources),
        env: JSON.stringify(t.env),
        created_at: t.createdAt,
        spec: JSON.stringify(t.spec),
        image_digest: t.imageDigest,
        org_id: t.orgId,
      })
      .execute();
  }

  async getTemplate(name: string, version?: number, ex: Executor = this.db): Promise<TemplateRecord | undefined> {
    let q = ex.selectFrom('templates').selectAll().where('name', '=', name);
    q = version === undefined ? q.orderBy('version', 'desc').limit(1) : q.where('version', '=', version);
    const r = await q.executeTakeFirst();
    return r && templateFromRow(r);
  }

  async listTemplateVersions(name: string, ex: Executor = this.db): Promise<TemplateRecord[]> {
    return (await ex.selectFrom('templates').selectAll().where('name', '=', name).orderBy('version').execute()).map(templateFromRow);
  }

  /** The latest version of every template. */
  async listTemplates(ex: Executor = this.db): Promise<TemplateRecord[]> {
    const rows = await ex
      .selectFrom('templates as t')
      .selectAll('t')
      .where(({ eb, selectFrom }) =>
        eb('t.version', '=', selectFrom('templates as t2').select(({ fn }) => fn.max('t2.version').as('v')).whereRef('t2.name', '=', 't.name')),
      )
      .orderBy('t.name')
      .execute();
    return rows.map(templateFromRow);
  }

  // ---- nodes ----

  async getNode(id: string, ex: Executor = this.db): Promise<NodeRecord | undefined> {
    const r = await ex.selectFrom('nodes').selectAll().where('id', '=', id).executeTakeFirst();
    return r && nodeFromRow(r);
  }

  async getNodeByName(name: string, ex: Executor = this.db): Promise<NodeRecord | undefined> {
    const r = await ex.selectFrom('nodes').selectAll().where('name', '=', name).executeTakeFirst();
    return r && nodeFromRow(r);
  }

  async listNodes(ex: Executor = this.db): Promise<NodeRecord[]> {
    return (await ex.selectFrom('nodes').selectAll().orderBy('name').execute()).map(nodeFromRow);
  }

  async insertNode(n: NodeRecord, ex: Executor = this.db): Promise<void> {
    await ex.insertInto('nodes').values(this.nodeRow(n)).execute();
  }

  /** Optimistic update on the node's version: capacity is reserved only against what was read. */
  async updateNode(next: NodeRecord, expectedVersion: number, ex: Executor = this.db): Promise<NodeRecord> {
    const res = await ex
      .updateTable('nodes')
      .set(this.nodeRow({ ...next, version: expectedVersion + 1 }))
      .where('id', '=', next.id)
      .where('version', '=', expectedVersion)
      .executeTakeFirst();
    if (Number(res.numUpdatedRows) !== 1) throw new DomainError('conflict', `node "${next.name}" was changed concurrently; retry`, { nodeId: next.id, reason: 'version-mismatch' });
    return { ...next, version: expectedVersion + 1 };
  }

  private nodeRow(n: NodeRecord): Selectable<NodeTable> {
    return {
      id: n.id,
      name: n.name,
      arch: n.arch,
      region: n.region,
      labels: JSON.stringify(n.labels),
      runtimes: JSON.stringify(n.runtimes),
      capacity: JSON.stringify(n.capacity),
      allocated: JSON.stringify(n.allocated),
      images: JSON.stringify(n.images),
      agent_url: n.agentUrl,
      session_key: n.sessionKey,
      lease_expires_at: n.leaseExpiresAt,
      cordoned: n.cordoned ? 1 : 0,
      registered_at: n.registeredAt,
      version: n.version,
    };
  }

  // ---- leases with fencing tokens ----

  /**
   * Takes or renews a named lease. The token grows every time the lease changes hands, so a
   * worker that lost its lease (paused, partitioned) can be told its writes are stale.
   * Returns the token, or null while another holder's lease is still valid (unless
   * `holderIsDead` says that holder is gone).
   */
  async acquireLease(name: string, holder: string, ttlMs: number, now: number, holderIsDead?: (holder: string) => boolean): Promise<number | null> {
    return this.transaction(async (tx) => {
      const cur = await tx.selectFrom('leases').selectAll().where('name', '=', name).executeTakeFirst();
      if (!cur) {
        await tx.insertInto('leases').values({ name, holder, token: 1, expires_at: now + ttlMs }).execute();
        return 1;
      }
      const token = Number(cur.token);
      if (cur.holder === holder && Number(cur.expires_at) > now) {
        await tx.updateTable('leases').set({ expires_at: now + ttlMs }).where('name', '=', name).execute();
        return token;
      }
      // A holder known to be dead (a crashed process on this host) cannot be writing: take over
      // at once instead of waiting out its lease. The token still grows, so were it alive after
      // all, its writes would be refused.
      if (Number(cur.expires_at) > now && !holderIsDead?.(cur.holder)) return null;
      await tx.updateTable('leases').set({ holder, token: token + 1, expires_at: now + ttlMs }).where('name', '=', name).where('token', '=', token).execute();
      return token + 1;
    });
  }

  async releaseLease(name: string, holder: string, token: number): Promise<void> {
    await this.db.updateTable('leases').set({ expires_at: 0 }).where('name', '=', name).where('holder', '=', holder).where('token', '=', token).execute();
  }

  /** Refuses (stale-lease) unless `holder` still holds `name` with `token`; call inside the write's transaction. */
  async assertLease(name: string, holder: string, token: number, now: number, ex: Executor): Promise<void> {
    const cur = await ex.selectFrom('leases').selectAll().where('name', '=', name).executeTakeFirst();
    if (!cur || cur.holder !== holder || Number(cur.token) !== token || Number(cur.expires_at) <= now) {
      throw new DomainError('stale-lease', `lease ${name} is no longer held with token ${token}`, { lease: name, token });
    }
  }

  // ---- prebuilds ----

  async upsertPrebuild(p: Selectable<PrebuildTable>, ex: Executor = this.db): Promise<void> {
    await ex
      .insertInto('prebuilds')
      .values(p)
      .onConflict((oc) => oc.columns(['node_id', 'id']).doUpdateSet({ status: p.status, error: p.error, log_tail: p.log_tail, finished_at: p.finished_at }))
      .execute();
  }

  async listPrebuilds(templateName: string, ex: Executor = this.db): Promise<Array<Selectable<PrebuildTable>>> {
    return ex.selectFrom('prebuilds').selectAll().where('template_name', '=', templateName).orderBy('finished_at', 'desc').limit(100).execute();
  }

  // ---- API tokens ----

  async insertToken(t: Insertable<ApiTokenTable>, ex: Executor = this.db): Promise<void> {
    await ex.insertInto('api_tokens').values(t).execute();
  }

  async findTokenByHash(hash: string, ex: Executor = this.db): Promise<Selectable<ApiTokenTable> | undefined> {
    return ex.selectFrom('api_tokens').selectAll().where('token_hash', '=', hash).executeTakeFirst();
  }
}
