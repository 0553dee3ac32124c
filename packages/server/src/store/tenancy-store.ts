/**
 * Store access for tenancy: users, organizations and members, teams, box shares, API tokens and
 * quotas. Same executor convention as Store: pass a transaction to join one.
 */
import type { Insertable, Kysely, Selectable } from 'kysely';
import { DomainError } from '@devyard/core/domain-error';
import type { ApiTokenTable, Database, InvitationTable, OrgTable, TeamTable, UserTable } from './database-schema.js';
import { isUniqueViolation, type Executor } from './store.js';

export type UserRow = Selectable<UserTable>;
export type TokenRow = Selectable<ApiTokenTable>;

export class TenancyStore {
  constructor(private readonly db: Kysely<Database>) {}

  // ---- users ----

  async getUser(id: string, ex: Executor = this.db): Promise<UserRow | undefined> {
    return ex.selectFrom('users').selectAll().where('id', '=', id).executeTakeFirst();
  }

  async getUserByName(name: string, ex: Executor = this.db): Promise<UserRow | undefined> {
    return ex.selectFrom('users').selectAll().where('name', '=', name).executeTakeFirst();
  }

  async getUserByOidc(issuer: string, subject: string, ex: Executor = this.db): Promise<UserRow | undefined> {
    return ex.selectFrom('users').selectAll().where('oidc_issuer', '=', issuer).where('oidc_subject', '=', subject).executeTakeFirst();
  }

  async insertUser(u: Insertable<UserTable>, ex: Executor = this.db): Promise<void> {
    try {
      await ex.insertInto('users').values(u).execute();
    } catch (e) {
      if (isUniqueViolation(e)) throw new DomainError('conflict', `a user named "${u.name}" already exists`, { name: u.name });
      throw e;
    }
  }

  /** Every user with their memberships and team ids per organization (for gateways' route tables). */
  async directory(ex: Executor = this.db): Promise<Map<string, Array<{ orgId: string; role: string; teamIds: string[] }>>> {
    const users = await ex.selectFrom('users').select(['id', 'name']).where('disabled_at', 'is', null).execute();
    const members = await ex.selectFrom('org_members').selectAll().execute();
    const teams = await ex.selectFrom('team_members').innerJoin('teams', 'teams.id', 'team_members.team_id').select(['team_members.user_id as userId', 'teams.org_id as orgId', 'teams.id as teamId']).execute();
    // Grouped once: gateways sync this every few seconds, so no per-user scans of every row.
    const teamIds = new Map<string, string[]>();
    for (const t of teams) {
      const k = `${t.userId}\0${t.orgId}`;
      teamIds.set(k, [...(teamIds.get(k) ?? []), t.teamId]);
    }
    const byUser = new Map<string, Array<{ orgId: string; role: string; teamIds: string[] }>>();
    for (const m of members) byUser.set(m.user_id, [...(byUser.get(m.user_id) ?? []), { orgId: m.org_id, role: m.role, teamIds: teamIds.get(`${m.user_id}\0${m.org_id}`) ?? [] }]);
    return new Map(users.map((u) => [u.name, byUser.get(u.id) ?? []]));
  }

  // ---- organizations ----

  async getOrg(id: string, ex: Executor = this.db): Promise<Selectable<OrgTable> | undefined> {
    return ex.selectFrom('orgs').selectAll().where('id', '=', id).executeTakeFirst();
  }

  async getOrgByName(name: string, ex: Executor = this.db): Promise<Selectable<OrgTable> | undefined> {
    return ex.selectFrom('orgs').selectAll().where('name', '=', name).executeTakeFirst();
  }

  /** Whether the organization's code may run in the sandbox runtime (unknown organizations are not). */
  async orgTrusted(id: string, ex: Executor = this.db): Promise<boolean> {
    const row = await ex.selectFrom('orgs').select('trusted').where('id', '=', id).executeTakeFirst();
    return Number(row?.trusted ?? 0) === 1;
  }

  async setOrgTrusted(id: string, trusted: boolean, ex: Executor = this.db): Promise<void> {
    await ex.updateTable('orgs').set({ trusted: trusted ? 1 : 0 }).where('id', '=', id).execute();
  }

  async insertOrg(o: Insertable<OrgTable>, ex: Executor = this.db): Promise<void> {
    try {
      await ex.insertInto('orgs').values(o).execute();
    } catch (e) {
      if (isUniqueViolation(e)) throw new DomainError('conflict', `an organization named "${o.name}" already exists`, { name: o.name });
      throw e;
    }
  }

  async orgsOf(userId: string, ex: Executor = this.db): Promise<Array<{ id: string; name: string; role: string; createdAt: number; trusted: boolean }>> {
    const rows = await ex
      .selectFrom('org_members')
      .innerJoin('orgs', 'orgs.id', 'org_members.org_id')
      .select(['orgs.id as id', 'orgs.name as name', 'org_members.role as role', 'orgs.created_at as createdAt', 'orgs.trusted as trusted'])
      .where('org_members.user_id', '=', userId)
      .orderBy('orgs.name')
      .execute();
    return rows.map((r) => ({ ...r, createdAt: Number(r.createdAt), trusted: Number(r.trusted) === 1 }));
  }

  async membership(orgId: string, userId: string, ex: Executor = this.db): Promise<{ role: string } | undefined> {
    return ex.selectFrom('org_members').select('role').where('org_id', '=', orgId).where('user_id', '=', userId).executeTakeFirst();
  }

  async listMembers(orgId: string, ex: Executor = this.db): Promise<Array<{ userId: string; name: string; kind: string; role: string; createdAt: number }>> {
    const rows = await ex
      .selectFrom('org_members')
      .innerJoin('users', 'users.id', 'org_members.user_id')
      .select(['users.id as userId', 'users.name as name', 'users.kind as kind', 'org_members.role as role', 'org_members.created_at as createdAt'])
      .where('org_members.org_id', '=', orgId)
      .orderBy('users.name')
      .execute();
    return rows.map((r) => ({ ...r, createdAt: Number(r.createdAt) }));
  }

  async setMember(orgId: string, userId: string, role: string, now: number, ex: Executor = this.db): Promise<void> {
    await ex
      .insertInto('org_members')
      .values({ org_id: orgId, user_id: userId, role, created_at: now })
      .onConflict((oc) => oc.columns(['org_id', 'user_id']).doUpdateSet({ role }))
      .execute();
  }

  async removeMember(orgId: string, userId: string, ex: Executor = this.db): Promise<void> {
    await ex.deleteFrom('org_members').where('org_id', '=', orgId).where('user_id', '=', userId).execute();
    const teams = ex.selectFrom('teams').select('id').where('org_id', '=', orgId);
    await ex.deleteFrom('team_members').where('user_id', '=', userId).where('team_id', 'in', teams).execute();
  }

  async countOwners(orgId: string, ex: Executor = this.db): Promise<number> {
    const r = await ex.selectFrom('org_members').select((eb) => eb.fn.countAll<number>().as('n')).where('org_id', '=', orgId).where('role', '=', 'owner').executeTakeFirst();
    return Number(r?.n ?? 0);
  }

  // ---- teams ----

  async listTeams(orgId: string, ex: Executor = this.db): Promise<Array<Selectable<TeamTable>>> {
    return ex.selectFrom('teams').selectAll().where('org_id', '=', orgId).orderBy('name').execute();
  }

  async getTeamByName(orgId: string, name: string, ex: Executor = this.db): Promise<Selectable<TeamTable> | undefined> {
    return ex.selectFrom('teams').selectAll().where('org_id', '=', orgId).where('name', '=', name).executeTakeFirst();
  }

  async insertTeam(t: Selectable<TeamTable>, ex: Executor = this.db): Promise<void> {
    try {
      await ex.insertInto('teams').values(t).execute();
    } catch (e) {
      if (isUniqueViolation(e)) throw new DomainError('conflict', `a team named "${t.name}" already exists`, { name: t.name });
      throw e;
    }
  }

  async deleteTeam(teamId: string, ex: Executor = this.db): Promise<void> {
    await ex.deleteFrom('team_members').where('team_id', '=', teamId).execute();
    await ex.deleteFrom('box_shares').where('team_id', '=', teamId).execute();
    await ex.deleteFrom('teams').where('id', '=', teamId).execute();
  }

  async teamMembers(teamId: string, ex: Executor = this.db): Promise<Array<{ userId: string; name: string; role: string }>> {
    return ex
      .selectFrom('team_members')
      .innerJoin('users', 'users.id', 'team_members.user_id')
      .select(['users.id as userId', 'users.name as name', 'team_members.role as role'])
      .where('team_members.team_id', '=', teamId)
      .orderBy('users.name')
      .execute();
  }

  async setTeamMember(teamId: string, userId: string, role: string, ex: Executor = this.db): Promise<void> {
    await ex
      .insertInto('team_members')
      .values({ team_id: teamId, user_id: userId, role })
      .onConflict((oc) => oc.columns(['team_id', 'user_id']).doUpdateSet({ role }))
      .execute();
  }

  async removeTeamMember(teamId: string, userId: string, ex: Executor = this.db): Promise<void> {
    await ex.deleteFrom('team_members').where('team_id', '=', teamId).where('user_id', '=', userId).execute();
  }

  /** The user's teams in one organization, with the role in each. */
  async teamsOf(orgId: string, userId: string, ex: Executor = this.db): Promise<Array<{ id: string; name: string; role: string }>> {
    return ex
      .selectFrom('team_members')
      .innerJoin('teams', 'teams.id', 'team_members.team_id')
      .select(['teams.id as id', 'teams.name as name', 'team_members.role as role'])
      .where('teams.org_id', '=', orgId)
      .where('team_members.user_id', '=', userId)
      .execute();
  }

  // ---- invitations ----

  async insertInvitation(i: Selectable<InvitationTable>, ex: Executor = this.db): Promise<void> {
    await ex.insertInto('invitations').values(i).execute();
  }

  async listInvitations(orgId: string, ex: Executor = this.db): Promise<Array<Selectable<InvitationTable>>> {
    return ex.selectFrom('invitations').selectAll().where('org_id', '=', orgId).orderBy('created_at', 'desc').execute();
  }

  async getInvitationByHash(hash: string, ex: Executor = this.db): Promise<Selectable<InvitationTable> | undefined> {
    return ex.selectFrom('invitations').selectAll().where('token_hash', '=', hash).executeTakeFirst();
  }

  /** Marks an open invitation used; false when someone used or revoked it first (single use). */
  async acceptInvitation(id: string, userId: string, now: number, ex: Executor = this.db): Promise<boolean> {
    const r = await ex.updateTable('invitations').set({ accepted_by: userId, accepted_at: now }).where('id', '=', id).where('accepted_at', 'is', null).where('revoked_at', 'is', null).executeTakeFirst();
    return Number(r.numUpdatedRows) === 1;
  }

  async revokeInvitation(orgId: string, id: string, now: number, ex: Executor = this.db): Promise<boolean> {
    const r = await ex.updateTable('invitations').set({ revoked_at: now }).where('id', '=', id).where('org_id', '=', orgId).where('accepted_at', 'is', null).where('revoked_at', 'is', null).executeTakeFirst();
    return Number(r.numUpdatedRows) === 1;
  }

  // ---- box shares ----

  async sharesOf(boxIds: string[], ex: Executor = this.db): Promise<Map<string, Array<{ teamId: string; access: string }>>> {
    const out = new Map<string, Array<{ teamId: string; access: string }>>();
    for (let i = 0; i < boxIds.length; i += 500) {
      const rows = await ex.selectFrom('box_shares').selectAll().where('box_id', 'in', boxIds.slice(i, i + 500)).execute();
      for (const r of rows) out.set(r.box_id, [...(out.get(r.box_id) ?? []), { teamId: r.team_id, access: r.access }]);
    }
    return out;
  }

  async setShare(boxId: string, teamId: string, access: string, ex: Executor = this.db): Promise<void> {
    await ex
      .insertInto('box_shares')
      .values({ box_id: boxId, team_id: teamId, access })
      .onConflict((oc) => oc.columns(['box_id', 'team_id']).doUpdateSet({ access }))
      .execute();
  }

  async removeShare(boxId: string, teamId: string, ex: Executor = this.db): Promise<void> {
    await ex.deleteFrom('box_shares').where('box_id', '=', boxId).where('team_id', '=', teamId).execute();
  }

  // ---- tokens ----

  async listTokens(userId: string, ex: Executor = this.db): Promise<TokenRow[]> {
    return ex.selectFrom('api_tokens').selectAll().where('user_id', '=', userId).orderBy('created_at').execute();
  }

  async getToken(id: string, ex: Executor = this.db): Promise<TokenRow | undefined> {
    return ex.selectFrom('api_tokens').selectAll().where('id', '=', id).executeTakeFirst();
  }

  async revokeToken(id: string, now: number, ex: Executor = this.db): Promise<void> {
    await ex.updateTable('api_tokens').set({ revoked_at: now }).where('id', '=', id).where('revoked_at', 'is', null).execute();
  }

  async touchToken(id: string, now: number, ex: Executor = this.db): Promise<void> {
    await ex.updateTable('api_tokens').set({ last_used_at: now }).where('id', '=', id).execute();
  }

  // ---- quotas ----

  async listQuotas(orgId: string, ex: Executor = this.db): Promise<Array<{ scopeType: string; scopeId: string; limits: string }>> {
    const rows = await ex.selectFrom('quotas').selectAll().where('org_id', '=', orgId).orderBy('scope_type').orderBy('scope_id').execute();
    return rows.map((r) => ({ scopeType: r.scope_type, scopeId: r.scope_id, limits: r.limits }));
  }

  async setQuota(orgId: string, scopeType: string, scopeId: string, limits: string, now: number, ex: Executor = this.db): Promise<void> {
    await ex
      .insertInto('quotas')
      .values({ org_id: orgId, scope_type: scopeType, scope_id: scopeId, limits, updated_at: now })
      .onConflict((oc) => oc.columns(['org_id', 'scope_type', 'scope_id']).doUpdateSet({ limits, updated_at: now }))
      .execute();
  }

  async deleteQuota(orgId: string, scopeType: string, scopeId: string, ex: Executor = this.db): Promise<void> {
    await ex.deleteFrom('quotas').where('org_id', '=', orgId).where('scope_type', '=', scopeType).where('scope_id', '=', scopeId).execute();
  }
}
