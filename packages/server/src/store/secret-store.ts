/**
 * Store access for secrets: sealed rows only (ciphertext, IV, wrapped data key, KEK id); nothing
 * here ever sees a plaintext value. Same executor convention as Store: pass a transaction to join one.
 */
import type { Kysely, Selectable } from 'kysely';
import type { Database, SecretTable } from './database-schema.js';
import type { Executor } from './store.js';

export type SecretRow = Selectable<SecretTable>;

/** Identifies one secret: unique per (org, scope type, scope id, name). */
export interface SecretKey {
  orgId: string;
  scopeType: string;
  scopeId: string;
  name: string;
}

export class SecretStore {
  constructor(private readonly db: Kysely<Database>) {}

  async get(k: SecretKey, ex: Executor = this.db): Promise<SecretRow | undefined> {
    return ex
      .selectFrom('secrets')
      .selectAll()
      .where('org_id', '=', k.orgId)
      .where('scope_type', '=', k.scopeType)
      .where('scope_id', '=', k.scopeId)
      .where('name', '=', k.name)
      .executeTakeFirst();
  }

  /** Every secret of the given orgs (all of them when `orgIds` is undefined), in a stable order. */
  async list(orgIds?: readonly string[], ex: Executor = this.db): Promise<SecretRow[]> {
    let q = ex.selectFrom('secrets').selectAll().orderBy('org_id').orderBy('scope_type').orderBy('scope_id').orderBy('name');
    if (orgIds !== undefined) {
      if (orgIds.length === 0) return [];
      q = q.where('org_id', 'in', [...orgIds]);
    }
    return q.execute();
  }

  async insert(row: SecretRow, ex: Executor = this.db): Promise<void> {
    await ex.insertInto('secrets').values(row).execute();
  }

  /** Replaces the sealed value of a row if its version is still `expectedVersion`; false otherwise. */
  async updateValue(id: string, expectedVersion: number, v: Pick<SecretRow, 'ciphertext' | 'iv' | 'wrapped_dek' | 'kek_id' | 'updated_at'>, ex: Executor = this.db): Promise<boolean> {
    const r = await ex
      .updateTable('secrets')
      .set({ ...v, version: expectedVersion + 1 })
      .where('id', '=', id)
      .where('version', '=', expectedVersion)
      .executeTakeFirst();
    return Number(r.numUpdatedRows) === 1;
  }

  /** Replaces a row's wrapped data key (KEK rotation); the value, version and times stay as they are. */
  async updateWrap(id: string, fromKekId: string, v: Pick<SecretRow, 'wrapped_dek' | 'kek_id'>, ex: Executor = this.db): Promise<boolean> {
    const r = await ex.updateTable('secrets').set(v).where('id', '=', id).where('kek_id', '=', fromKekId).executeTakeFirst();
    return Number(r.numUpdatedRows) === 1;
  }

  async delete(id: string, ex: Executor = this.db): Promise<boolean> {
    const r = await ex.deleteFrom('secrets').where('id', '=', id).executeTakeFirst();
    return Number(r.numDeletedRows) > 0;
  }

  /** Rows whose data key is not wrapped by `kekId`. */
  async listNotUnder(kekId: string, ex: Executor = this.db): Promise<SecretRow[]> {
    return ex.selectFrom('secrets').selectAll().where('kek_id', '!=', kekId).orderBy('id').execute();
  }

  /** KEK ids some row still needs. */
  async kekIdsInUse(ex: Executor = this.db): Promise<string[]> {
    return (await ex.selectFrom('secrets').select('kek_id').distinct().execute()).map((r) => r.kek_id);
  }
}
