/**
 * Identity and tenancy: who a token speaks for (the principal every request is authorized as),
 * personal API tokens and service accounts, organizations and their members, teams, box shares and
 * quotas. The rules themselves are core's rbac-policy; this service applies them and refuses role
 * escalation.
 */
import { randomBytes } from 'node:crypto';
import type { QuotaLimits } from '@devyard/api/tenancy-schemas';
import { DomainError } from '@devyard/core/domain-error';
import { mayChangeMember, mayGrantRole, roleAllows, type OrgPermission, type OrgRole, type TeamRole } from '@devyard/core/rbac-policy';
import { newId } from '../ids.js';
import { hashToken } from '../token-hash.js';
import type { TenancyStore, TokenRow, UserRow } from '../store/tenancy-store.js';
import type { Store } from '../store/store.js';
import { DEFAULT_ORG_ID, type Subject } from './box-service.js';

/** A personal or service-account token as the API shows it (never the secret itself). */
export interface TokenView {
  id: string;
  name: string;
  user: string;
  scopes: string[] | null;
  createdAt: string;
  expiresAt: string | null;
  lastUsedAt: string | null;
  revoked: boolean;
}

const iso = (ms: number | null | undefined) => (ms === null || ms === undefined ? null : new Date(Number(ms)).toISOString());

export function tokenView(t: TokenRow): TokenView {
  return {
    id: t.id,
    name: t.name,
    user: t.subject,
    scopes: t.scopes ? (JSON.parse(t.scopes) as string[]) : null,
    createdAt: new Date(Number(t.created_at)).toISOString(),
    expiresAt: iso(t.expires_at),
    lastUsedAt: iso(t.last_used_at),
    revoked: t.revoked_at !== null && t.revoked_at !== undefined,
  };
}

/** Refuses with 403 unless the subject's role carries the permission. */
export function requirePermission(subject: Subject, permission: OrgPermission): void {
  if (subject.kind === 'system') return;
  if (!roleAllows(subject.role, permission)) {
    throw new DomainError('forbidden', `your role (${subject.role}) does not allow this (needs ${permission})`, { role: subject.role, permission });
  }
}

function invitationView(i: { id: string; role: string; created_by: string; created_at: number; expires_at: number; accepted_by: string | null; revoked_at: number | null }) {
  return {
    id: i.id,
    role: i.role as OrgRole,
    createdBy: i.created_by,
    createdAt: new Date(Number(i.created_at)).toISOString(),
    expiresAt: new Date(Number(i.expires_at)).toISOString(),
    state: (i.revoked_at !== null ? 'revoked' : i.accepted_by !== null ? 'accepted' : 'open') as 'open' | 'accepted' | 'revoked',
  };
}

const NAME = /^[a-z][a-z0-9-]{0,38}[a-z0-9]$|^[a-z]$/;

/**
 * The installation's operators: admins of the default organization (the one `devyard up` and the
 * bootstrap token start in), and the control plane's own loops. They run nodes, create
 * organizations and set each organization's allotment.
 */
export function isOperator(subject: Subject): boolean {
  return subject.kind === 'system' || (subject.orgId === DEFAULT_ORG_ID && roleAllows(subject.role, 'org:admin'));
}

/** Who may create organizations, and what each new one may use until an operator says otherwise. */
export interface OrgPolicy {
  /** `operators` (default): organizations are an operator's decision; `anyone`: any signed-in user may create one and owns it. */
  creation: 'operators' | 'anyone';
  /** The organization-wide quota every new organization starts with. */
  defaultQuota: QuotaLimits;
}

const GiB = 1024 ** 3;
/** What a new organization may use by default: a team's worth of dev boxes, no GPUs. */
export const DEFAULT_ORG_QUOTA: QuotaLimits = { boxes: 20, runningBoxes: 10, cpuMillis: 32_000, memoryBytes: 64 * GiB, gpu: 0, diskBytes: 500 * GiB };

/**
 * Live (unrevoked, unexpired) personal tokens one user may hold. Each is a row every request's
 * authentication may read, and a script could otherwise mint them without end.
 */
export const MAX_TOKENS_PER_USER = 100;

export class TenancyService {
  /** Called when a user joins or leaves a team or the organization (their boxes' secrets follow). */
  onMembershipChange: (orgId: string, userName: string) => void = () => undefined;

  constructor(
    private readonly store: Store,
    private readonly tenancy: TenancyStore,
    private readonly now: () => number,
    private readonly orgPolicy: OrgPolicy = { creation: 'operators', defaultQuota: DEFAULT_ORG_QUOTA },
  ) {}

  // ---- principals ----

  /** The principal of a user token, or why the token is refused (401). */
  async principalForToken(row: TokenRow): Promise<Subject> {
    const now = this.now();
    if (row.revoked_at !== null && row.revoked_at !== undefined) throw new DomainError('unauthenticated', 'this token was revoked');
    if (row.expires_at !== null && row.expires_at !== undefined && Number(row.expires_at) <= now) throw new DomainError('unauthenticated', 'this token has expired');
    const user = row.user_id ? await this.tenancy.getUser(row.user_id) : await this.tenancy.getUserByName(row.subject);
    if (!user || user.disabled_at !== null) throw new DomainError('unauthenticated', 'the user of this token is disabled or gone');
    const orgId = row.org_id ?? 'org_default';
    const subject = await this.principal(user, orgId);
    if (!subject) throw new DomainError('unauthenticated', 'the user of this token is no longer a member of its organization');
    // Last use is informational: write it at most once a minute per token.
    if (!row.last_used_at || now - Number(row.last_used_at) > 60_000) await this.tenancy.touchToken(row.id, now);
    return { ...subject, tokenId: row.id, scopes: row.scopes ? (JSON.parse(row.scopes) as string[]) : undefined };
  }

  /**
   * The subject as its token stands now, for a request that outlives its start (a watch): undefined
   * once the token is revoked or expired, the user disabled or no longer a member; with the current
   * role and teams otherwise. Subjects without a token (nodes, gateways, system loops) stand as they are.
   */
  async reauthenticate(subject: Subject): Promise<Subject | undefined> {
    if (subject.kind !== 'user' || subject.tokenId === undefined) return subject;
    const row = await this.tenancy.getToken(subject.tokenId);
    if (!row) return undefined;
    try {
      return await this.principalForToken(row);
    } catch (e) {
      if (e instanceof DomainError && e.code === 'unauthenticated') return undefined;
      throw e;
    }
  }

  /** A user acting in an organization, or undefined when not a member. */
  async principal(user: UserRow, orgId: string): Promise<Subject | undefined> {
    const m = await this.tenancy.membership(orgId, user.id);
    if (!m) return undefined;
    const teams = await this.tenancy.teamsOf(orgId, user.id);
    return { name: user.name, kind: 'user', orgId, role: m.role as OrgRole, teamIds: teams.map((t) => t.id), teams: teams.map((t) => ({ ...t, role: t.role as TeamRole })), userId: user.id };
  }

  /** The principal of a user by name (a gateway acting for a user it authenticated by key). */
  async principalByName(name: string, orgId: string): Promise<Subject | undefined> {
    const user = await this.tenancy.getUserByName(name);
    return user && user.disabled_at === null ? this.principal(user, orgId) : undefined;
  }

  // ---- tokens ----

  private async insertToken(user: UserRow, orgId: string, name: string, ttlSeconds: number | null, scopes: string[] | null): Promise<{ token: string; view: TokenView }> {
    const token = `dy_u_${randomBytes(24).toString('base64url')}`;
    const now = this.now();
    const row: TokenRow = {
      id: newId('t'),
      token_hash: hashToken(token),
      name,
      kind: 'user',
      subject: user.name,
      created_at: now,
      user_id: user.id,
      org_id: orgId,
      scopes: scopes ? JSON.stringify(scopes) : null,
      expires_at: ttlSeconds === null ? null : now + ttlSeconds * 1000,
      revoked_at: null,
      last_used_at: null,
    };
    await this.store.insertToken(row);
    return { token, view: tokenView(row) };
  }

  /** A personal token for the caller, shown once. Scopes can only narrow what the caller has. */
  async createToken(subject: Subject, req: { name: string; ttlSeconds?: number; scopes?: string[]; org?: string }): Promise<{ token: string; view: TokenView }> {
    const user = await this.requireUser(subject);
    let orgId = subject.orgId;
    if (req.org) {
      const org = await this.tenancy.getOrgByName(req.org);
      // Not a member looks the same as no such organization.
      if (!org || !(await this.tenancy.membership(org.id, user.id))) throw new DomainError('not-found', `no organization "${req.org}"`, { org: req.org });
      orgId = org.id;
    }
    if (subject.scopes && !subject.scopes.includes('write')) throw new DomainError('forbidden', 'a read-only token cannot create tokens', {});
    const scopes = req.scopes ?? subject.scopes ?? null;
    if (subject.scopes && scopes && scopes.some((s) => !subject.scopes!.includes(s))) throw new DomainError('forbidden', 'a token cannot grant scopes it does not have', { scopes });
    const now = this.now();
    const live = (await this.tenancy.listTokens(user.id)).filter((t) => t.revoked_at === null && (t.expires_at == null || t.expires_at > now)).length;
    if (live >= MAX_TOKENS_PER_USER) {
      throw new DomainError('quota-exceeded', `${user.name} has ${live} live tokens, the most one user may hold; revoke one first (devyard tokens revoke)`, { limit: MAX_TOKENS_PER_USER });
    }
    return this.insertToken(user, orgId, req.name, req.ttlSeconds ?? 30 * 86400, scopes ? [...scopes] : null);
  }

  /** Issues a token for a user who signed in (OIDC), in the given organization. */
  async issueLoginToken(user: UserRow, orgId: string, ttlSeconds: number): Promise<string> {
    return (await this.insertToken(user, orgId, 'login', ttlSeconds, null)).token;
  }

  async listTokens(subject: Subject): Promise<TokenView[]> {
    const user = await this.requireUser(subject);
    return (await this.tenancy.listTokens(user.id)).map(tokenView);
  }

  /** Revokes one of the caller's tokens, or (admins) a token of a service account of the org. */
  async revokeToken(subject: Subject, id: string): Promise<void> {
    const t = await this.tenancy.getToken(id);
    const user = await this.requireUser(subject);
    let allowed = !!t && t.user_id === user.id;
    if (t && !allowed && t.org_id === subject.orgId && roleAllows(subject.role, 'org:admin')) {
      const owner = t.user_id ? await this.tenancy.getUser(t.user_id) : undefined;
      allowed = owner?.kind === 'service';
    }
    if (!t || !allowed) throw new DomainError('not-found', `no token "${id}"`, { id });
    await this.tenancy.revokeToken(id, this.now());
  }

  private async requireUser(subject: Subject): Promise<UserRow> {
    const user = subject.userId ? await this.tenancy.getUser(subject.userId) : await this.tenancy.getUserByName(subject.name);
    if (!user) throw new DomainError('forbidden', 'only users have tokens', {});
    return user;
  }

  // ---- users from an identity provider ----

  /**
   * The user an OIDC identity maps to, created on first sign-in with a unique name derived from the
   * preferred name; new users join the default organization as members.
   */
  async upsertOidcUser(claims: { issuer: string; subject: string; preferredName: string; email: string | null }): Promise<UserRow> {
    const existing = await this.tenancy.getUserByOidc(claims.issuer, claims.subject);
    if (existing) return existing;
    const base = (claims.preferredName.toLowerCase().replace(/@.*$/, '').replace(/[^a-z0-9-]+/g, '-').replace(/^[^a-z]+/, '').replace(/-+$/, '') || 'user').slice(0, 30);
    let name = base;
    for (let i = 2; await this.tenancy.getUserByName(name); i++) name = `${base}-${i}`;
    const now = this.now();
    const user: UserRow = { id: newId('u'), name, email: claims.email, kind: 'user', oidc_issuer: claims.issuer, oidc_subject: claims.subject, created_at: now, disabled_at: null };
    await this.store.transaction(async (tx) => {
      await this.tenancy.insertUser(user, tx);
      await this.tenancy.setMember('org_default', user.id, 'member', now, tx);
    });
    return user;
  }

  // ---- organizations ----

  async orgs(subject: Subject) {
    const user = await this.requireUser(subject);
    return (await this.tenancy.orgsOf(user.id)).map((o) => ({ name: o.name, role: o.role as OrgRole, createdAt: new Date(o.createdAt).toISOString(), trusted: o.trusted }));
  }

  /**
   * Marks an organization's code as trusted to share the node's kernel (its boxes may then run in
   * the sandbox runtime), or takes that back: the operators' decision. Boxes created afterwards
   * follow it; a sandbox box of an organization no longer trusted does not start again.
   */
  async setOrgTrust(subject: Subject, orgName: string, trusted: boolean) {
    if (!isOperator(subject)) throw new DomainError('forbidden', "only the installation's operators decide which organizations are trusted", {});
    const org = await this.tenancy.getOrgByName(orgName);
    if (!org) throw new DomainError('not-found', `no organization "${orgName}"`, { org: orgName });
    await this.tenancy.setOrgTrusted(org.id, trusted);
    return { trust: { name: org.name, trusted }, orgId: org.id };
  }

  /** A new organization with the caller as its owner. */
  async createOrg(subject: Subject, name: string) {
    const user = await this.requireUser(subject);
    if (subject.scopes && !subject.scopes.includes('write')) throw new DomainError('forbidden', 'a read-only token cannot create organizations', {});
    if (this.orgPolicy.creation === 'operators' && !isOperator(subject)) {
      throw new DomainError('forbidden', "organizations are created by the installation's operators (admins of the default organization): ask one to create it and invite you", {});
    }
    const now = this.now();
    const id = newId('org');
    await this.store.transaction(async (tx) => {
      await this.tenancy.insertOrg({ id, name, created_at: now }, tx);
      await this.tenancy.setMember(id, user.id, 'owner', now, tx);
      await this.tenancy.setQuota(id, 'org', 'org', JSON.stringify(this.orgPolicy.defaultQuota), now, tx);
    });
    return { org: { name, role: 'owner' as OrgRole, createdAt: new Date(now).toISOString(), trusted: false }, orgId: id };
  }

  /**
   * The organization whose quota `scope` a caller changes: their own, or for an operator the one
   * named. An organization's own quota is its allotment from the operators, so only they set it;
   * its admins divide it among teams and users.
   */
  async quotaOrg(subject: Subject, scope: string, orgName?: string): Promise<string> {
    if (orgName !== undefined) {
      if (!isOperator(subject)) throw new DomainError('forbidden', "only the installation's operators manage other organizations' quotas", {});
      const org = await this.tenancy.getOrgByName(orgName);
      if (!org) throw new DomainError('not-found', `no organization "${orgName}"`, { org: orgName });
      return org.id;
    }
    if (scope === 'org' && !isOperator(subject)) {
      throw new DomainError('forbidden', "the organization's quota is set by the installation's operators; admins set team and user quotas within it", {});
    }
    return subject.orgId;
  }

  async members(subject: Subject) {
    return (await this.tenancy.listMembers(subject.orgId)).map((m) => ({ user: m.name, kind: m.kind, role: m.role as OrgRole, since: new Date(m.createdAt).toISOString() }));
  }

  /** Changes a member's role, within what the caller may grant. */
  async setMember(subject: Subject, userName: string, role: OrgRole): Promise<void> {
    requirePermission(subject, 'org:admin');
    if (!mayGrantRole(subject.role, role)) throw new DomainError('forbidden', `a ${subject.role} cannot grant the ${role} role`, { role });
    const user = await this.tenancy.getUserByName(userName);
    if (!user) throw new DomainError('not-found', `no user "${userName}"`, { user: userName });
    await this.store.transaction(async (tx) => {
      const current = await this.tenancy.membership(subject.orgId, user.id, tx);
      // Joining an organization takes the user's consent (sign-in to it, or an invitation): here
      // only members' roles change. Not a member looks like no such user.
      if (!current) throw new DomainError('not-found', `no member "${userName}"`, { user: userName });
      if (!mayChangeMember(subject.role, current.role as OrgRole)) throw new DomainError('forbidden', `a ${subject.role} cannot change a ${current.role}`, { role: current.role });
      if (current?.role === 'owner' && role !== 'owner' && (await this.tenancy.countOwners(subject.orgId, tx)) <= 1) {
        throw new DomainError('invalid-state', 'an organization keeps at least one owner', {});
      }
      await this.tenancy.setMember(subject.orgId, user.id, role, this.now(), tx);
    });
  }

  async removeMember(subject: Subject, userName: string): Promise<void> {
    requirePermission(subject, 'org:admin');
    const user = await this.tenancy.getUserByName(userName);
    await this.store.transaction(async (tx) => {
      const current = user && (await this.tenancy.membership(subject.orgId, user.id, tx));
      if (!user || !current) throw new DomainError('not-found', `no member "${userName}"`, { user: userName });
      if (!mayChangeMember(subject.role, current.role as OrgRole)) throw new DomainError('forbidden', `a ${subject.role} cannot remove a ${current.role}`, { role: current.role });
      if (current.role === 'owner' && (await this.tenancy.countOwners(subject.orgId, tx)) <= 1) throw new DomainError('invalid-state', 'an organization keeps at least one owner', {});
      await this.tenancy.removeMember(subject.orgId, user.id, tx);
    });
    this.onMembershipChange(subject.orgId, userName);
  }

  /** A service account (a user that only has tokens) in the caller's organization, with its first token. */
  async createServiceAccount(subject: Subject, req: { name: string; role: OrgRole; ttlSeconds?: number }): Promise<{ token: string; view: TokenView }> {
    requirePermission(subject, 'org:admin');
    if (!NAME.test(req.name)) throw new DomainError('invalid-input', 'service account names are lowercase letters, digits and dashes', { field: 'name' });
    if (!mayGrantRole(subject.role, req.role)) throw new DomainError('forbidden', `a ${subject.role} cannot grant the ${req.role} role`, { role: req.role });
    const now = this.now();
    const user: UserRow = { id: newId('u'), name: req.name, email: null, kind: 'service', oidc_issuer: null, oidc_subject: null, created_at: now, disabled_at: null };
    await this.store.transaction(async (tx) => {
      await this.tenancy.insertUser(user, tx);
      await this.tenancy.setMember(subject.orgId, user.id, req.role, now, tx);
    });
    return this.insertToken(user, subject.orgId, `${req.name} (service account)`, req.ttlSeconds ?? 365 * 86400, null);
  }

  // ---- invitations ----

  /** An invitation to join the caller's organization with a role the caller may grant; its token is shown once. */
  async invite(subject: Subject, role: OrgRole, ttlSeconds = 7 * 86400) {
    requirePermission(subject, 'org:admin');
    if (!mayGrantRole(subject.role, role)) throw new DomainError('forbidden', `a ${subject.role} cannot grant the ${role} role`, { role });
    const token = `dy_i_${randomBytes(24).toString('base64url')}`;
    const now = this.now();
    const row = { id: newId('inv'), org_id: subject.orgId, token_hash: hashToken(token), role, created_by: subject.name, created_at: now, expires_at: now + ttlSeconds * 1000, accepted_by: null, accepted_at: null, revoked_at: null };
    await this.tenancy.insertInvitation(row);
    return { token, invitation: invitationView(row) };
  }

  async invitations(subject: Subject) {
    requirePermission(subject, 'org:admin');
    return (await this.tenancy.listInvitations(subject.orgId)).map(invitationView);
  }

  async revokeInvitation(subject: Subject, id: string): Promise<void> {
    requirePermission(subject, 'org:admin');
    if (!(await this.tenancy.revokeInvitation(subject.orgId, id, this.now()))) throw new DomainError('not-found', `no open invitation "${id}"`, { id });
  }

  /** Joins the organization of an invitation: single use, before it expires, not for members. */
  async acceptInvitation(subject: Subject, token: string): Promise<{ org: string; role: OrgRole; orgId: string }> {
    const user = await this.requireUser(subject);
    const inv = await this.tenancy.getInvitationByHash(hashToken(token));
    const now = this.now();
    // Unknown, used, revoked and expired all look alike: the token is simply no good.
    if (!inv || inv.accepted_at !== null || inv.revoked_at !== null || Number(inv.expires_at) <= now) {
      throw new DomainError('not-found', 'this invitation is unknown, used, revoked or expired', {});
    }
    const org = await this.tenancy.getOrg(inv.org_id);
    await this.store.transaction(async (tx) => {
      if (await this.tenancy.membership(inv.org_id, user.id, tx)) throw new DomainError('conflict', `you are already a member of ${org?.name ?? inv.org_id}`, {});
      if (!(await this.tenancy.acceptInvitation(inv.id, user.id, now, tx))) throw new DomainError('not-found', 'this invitation is unknown, used, revoked or expired', {});
      await this.tenancy.setMember(inv.org_id, user.id, inv.role, now, tx);
    });
    return { org: org?.name ?? inv.org_id, role: inv.role as OrgRole, orgId: inv.org_id };
  }

  // ---- teams ----

  async teams(subject: Subject) {
    const teams = await this.tenancy.listTeams(subject.orgId);
    return Promise.all(teams.map(async (t) => ({ name: t.name, members: (await this.tenancy.teamMembers(t.id)).map((m) => ({ user: m.name, role: m.role })) })));
  }

  async createTeam(subject: Subject, name: string): Promise<void> {
    requirePermission(subject, 'org:admin');
    if (!NAME.test(name)) throw new DomainError('invalid-input', 'team names are lowercase letters, digits and dashes', { field: 'name' });
    await this.tenancy.insertTeam({ id: newId('team'), org_id: subject.orgId, name, created_at: this.now() });
  }

  async deleteTeam(subject: Subject, name: string): Promise<void> {
    requirePermission(subject, 'org:admin');
    const team = await this.requireTeam(subject, name);
    await this.store.transaction((tx) => this.tenancy.deleteTeam(team.id, tx));
  }

  /** Org admins manage every team; team admins manage their own team's members (not its admins). */
  async setTeamMember(subject: Subject, teamName: string, userName: string, role: 'admin' | 'member' | null): Promise<void> {
    const team = await this.requireTeam(subject, teamName);
    const orgAdmin = roleAllows(subject.role, 'org:admin');
    if (!orgAdmin) {
      const mine = (await this.tenancy.teamsOf(subject.orgId, subject.userId ?? '')).find((t) => t.id === team.id);
      if (mine?.role !== 'admin') throw new DomainError('forbidden', `only org admins and admins of team "${teamName}" manage its members`, {});
      if (role === 'admin') throw new DomainError('forbidden', 'only org admins make team admins', {});
    }
    const user = await this.tenancy.getUserByName(userName);
    if (!user || !(await this.tenancy.membership(subject.orgId, user.id))) throw new DomainError('not-found', `no member "${userName}" in this organization`, { user: userName });
    if (!orgAdmin) {
      const theirs = (await this.tenancy.teamsOf(subject.orgId, user.id)).find((t) => t.id === team.id);
      if (theirs?.role === 'admin') throw new DomainError('forbidden', 'only org admins change team admins', {});
    }
    if (role === null) await this.tenancy.removeTeamMember(team.id, user.id);
    else await this.tenancy.setTeamMember(team.id, user.id, role);
    this.onMembershipChange(subject.orgId, userName);
  }

  async requireTeam(subject: Subject, name: string) {
    const team = await this.tenancy.getTeamByName(subject.orgId, name);
    if (!team) throw new DomainError('not-found', `no team "${name}"`, { team: name });
    return team;
  }
}
