/**
 * Store access for the access API: SSH keys, box host keys, port visibility, gateways, activity and
 * the server's own keys. Same executor convention as Store: pass a transaction to join one.
 */
import type { Kysely, Selectable } from 'kysely';
import { DomainError } from '@devyard/core/domain-error';
import type { BoxActivityTable, Database, GatewayTable, RedeemedSignInTable, SshKeyTable } from './database-schema.js';
import { isUniqueViolation, type Executor } from './store.js';

export class AccessStore {
  constructor(private readonly db: Kysely<Database>) {}

  async listSshKeys(subject?: string, ex: Executor = this.db): Promise<Array<Selectable<SshKeyTable>>> {
    let q = ex.selectFrom('ssh_keys').selectAll().orderBy('created_at').orderBy('id');
    if (subject !== undefined) q = q.where('subject', '=', subject);
    return q.execute();
  }

  async insertSshKey(k: Selectable<SshKeyTable>, ex: Executor = this.db): Promise<void> {
    try {
      await ex.insertInto('ssh_keys').values(k).execute();
    } catch (e) {
      // One key, one user: the gateway identifies the user by the key alone.
      if (isUniqueViolation(e)) throw new DomainError('conflict', `this key (${k.fingerprint}) is already registered`, { fingerprint: k.fingerprint });
      throw e;
    }
  }

  /** Deletes one of the subject's keys by id or fingerprint; false when the subject has no such key. */
  async deleteSshKey(subject: string, idOrFingerprint: string, ex: Executor = this.db): Promise<boolean> {
    const r = await ex
      .deleteFrom('ssh_keys')
      .where('subject', '=', subject)
      .where((eb) => eb.or([eb('id', '=', idOrFingerprint), eb('fingerprint', '=', idOrFingerprint)]))
      .executeTakeFirst();
    return Number(r.numDeletedRows) > 0;
  }

  async getHostKeys(boxIds: string[], ex: Executor = this.db): Promise<Map<string, { privateKey: string; publicKey: string }>> {
    const out = new Map<string, { privateKey: string; publicKey: string }>();
    // SQLite limits bound parameters per statement; chunk large lists.
    for (let i = 0; i < boxIds.length; i += 500) {
      const rows = await ex.selectFrom('box_host_keys').selectAll().where('box_id', 'in', boxIds.slice(i, i + 500)).execute();
      for (const r of rows) out.set(r.box_id, { privateKey: r.private_key, publicKey: r.public_key });
    }
    return out;
  }

  /** Inserts a host key unless the box has one already (a concurrent writer may have won). */
  async insertHostKeyIfAbsent(boxId: string, key: { privateKey: string; publicKey: string }, ex: Executor = this.db): Promise<void> {
    await ex
      .insertInto('box_host_keys')
      .values({ box_id: boxId, private_key: key.privateKey, public_key: key.publicKey })
      .onConflict((oc) => oc.column('box_id').doNothing())
      .execute();
  }

  /** Replaces a box's host key, unless it changed since `oldPrivateKey` was read. */
  async replaceHostKey(boxId: string, oldPrivateKey: string, key: { privateKey: string; publicKey: string }, ex: Executor = this.db): Promise<void> {
    await ex
      .updateTable('box_host_keys')
      .set({ private_key: key.privateKey, public_key: key.publicKey })
      .where('box_id', '=', boxId)
      .where('private_key', '=', oldPrivateKey)
      .execute();
  }

  async listPorts(boxIds: string[], ex: Executor = this.db): Promise<Array<{ boxId: string; port: number; visibility: string }>> {
    const out: Array<{ boxId: string; port: number; visibility: string }> = [];
    for (let i = 0; i < boxIds.length; i += 500) {
      const rows = await ex.selectFrom('box_ports').selectAll().where('box_id', 'in', boxIds.slice(i, i + 500)).orderBy('port').execute();
      for (const r of rows) out.push({ boxId: r.box_id, port: r.port, visibility: r.visibility });
    }
    return out;
  }

  async setPort(boxId: string, port: number, visibility: string, now: number, ex: Executor = this.db): Promise<void> {
    await ex
      .insertInto('box_ports')
      .values({ box_id: boxId, port, visibility, updated_at: now })
      .onConflict((oc) => oc.columns(['box_id', 'port']).doUpdateSet({ visibility, updated_at: now }))
      .execute();
  }

  async deletePort(boxId: string, port: number, ex: Executor = this.db): Promise<void> {
    await ex.deleteFrom('box_ports').where('box_id', '=', boxId).where('port', '=', port).execute();
  }

  async upsertGateway(g: Selectable<GatewayTable>, ex: Executor = this.db): Promise<void> {
    await ex
      .insertInto('gateways')
      .values(g)
      .onConflict((oc) => oc.column('id').doUpdateSet({ endpoint: g.endpoint, last_seen_at: g.last_seen_at }))
      .execute();
  }

  /** The gateway seen last, if it was seen after `since`. */
  async freshestGateway(since: number, ex: Executor = this.db): Promise<Selectable<GatewayTable> | undefined> {
    return ex.selectFrom('gateways').selectAll().where('last_seen_at', '>=', since).orderBy('last_seen_at', 'desc').executeTakeFirst();
  }

  /** Records activity, keeping the latest time when several gateways report the same box. */
  async recordActivity(a: Selectable<BoxActivityTable>, ex: Executor = this.db): Promise<void> {
    await ex
      .insertInto('box_activity')
      .values(a)
      .onConflict((oc) =>
        oc.column('box_id').doUpdateSet((eb) => ({
          last_active_at: eb.fn('max', [eb.ref('box_activity.last_active_at'), eb.val(a.last_active_at)]),
          sessions: a.sessions,
          gateway_id: a.gateway_id,
          reported_at: a.reported_at,
        })),
      )
      .execute();
  }

  async getActivity(boxId: string, ex: Executor = this.db): Promise<Selectable<BoxActivityTable> | undefined> {
    return ex.selectFrom('box_activity').selectAll().where('box_id', '=', boxId).executeTakeFirst();
  }

  /**
   * Records that a sign-in link was redeemed; false when it was already (by any gateway, through
   * any server replica: the primary key decides). Rows of links expired by `now` are dropped first.
   */
  async redeemSignIn(r: Selectable<RedeemedSignInTable>, now: number, ex: Executor = this.db): Promise<boolean> {
    await ex.deleteFrom('redeemed_sign_ins').where('expires_at', '<', now).execute();
    const res = await ex.insertInto('redeemed_sign_ins').values(r).onConflict((oc) => oc.column('jti').doNothing()).executeTakeFirst();
    return Number(res.numInsertedOrUpdatedRows ?? 0n) > 0;
  }

  /** A server key by name, created with `generate` on first use (first writer wins across replicas). */
  async serverKey(name: string, generate: () => { privateKey: string; publicKey: string }, now: number): Promise<{ privateKey: string; publicKey: string }> {
    const existing = await this.db.selectFrom('server_keys').selectAll().where('name', '=', name).executeTakeFirst();
    if (existing) return { privateKey: existing.private_key, publicKey: existing.public_key };
    const k = generate();
    await this.db
      .insertInto('server_keys')
      .values({ name, private_key: k.privateKey, public_key: k.publicKey, created_at: now })
      .onConflict((oc) => oc.column('name').doNothing())
      .execute();
    const row = await this.db.selectFrom('server_keys').selectAll().where('name', '=', name).executeTakeFirstOrThrow();
    return { privateKey: row.private_key, publicKey: row.public_key };
  }

  /** Replaces a server key, unless it changed since `oldPrivateKey` was read. */
  async replaceServerKey(name: string, oldPrivateKey: string, key: { privateKey: string; publicKey: string }, now: number): Promise<void> {
    await this.db
      .updateTable('server_keys')
      .set({ private_key: key.privateKey, public_key: key.publicKey, created_at: now })
      .where('name', '=', name)
      .where('private_key', '=', oldPrivateKey)
      .execute();
  }
}
