/** Handlers of the identity and tenancy routes: the caller, tokens, members, teams, box shares, quotas. */
import type { QuotaLimits } from '@devyard/api/tenancy-schemas';
import type { OrgRole, ShareAccess, TeamRole } from '@devyard/core/rbac-policy';
import { tokenView } from '../services/tenancy-service.js';
import { setAuditOrg } from './audit-hook.js';
import type { HandlerDeps } from './api-handlers.js';
import type { HandlerContext } from './create-app.js';

export function createTenancyHandlers(d: HandlerDeps) {
  const owner = (ctx: HandlerContext) => ctx.query.owner as string | undefined;
  /** Shares are changed by whoever manages the box; the team must exist in the box's organization. */
  const shareTarget = async (ctx: HandlerContext) => {
    const box = await d.boxes.get(ctx.subject, ctx.params.name!, { owner: owner(ctx), need: 'manage' });
    const team = await d.tenancy.requireTeam(ctx.subject, ctx.params.team!);
    return { box, team };
  };
  const teamNames = async (orgId: string) => new Map((await d.tenancyStore.listTeams(orgId)).map((t) => [t.id, t.name]));

  return {
    getMe: async (ctx: HandlerContext) => {
      const user = ctx.subject.userId ? await d.tenancyStore.getUser(ctx.subject.userId) : await d.tenancyStore.getUserByName(ctx.subject.name);
      const org = await d.tenancyStore.getOrg(ctx.subject.orgId);
      const row = ctx.subject.tokenId ? await d.tenancyStore.getToken(ctx.subject.tokenId) : undefined;
      const token = row && tokenView(row);
      return {
        user: ctx.subject.name,
        kind: (user?.kind ?? 'user') as 'user' | 'service',
        org: org?.name ?? ctx.subject.orgId,
        role: ctx.subject.role,
        // The principal already carries the caller's teams in this organization.
        teams: (ctx.subject.teams ?? []).map((t) => ({ name: t.name, role: t.role })),
        token: token ? { id: token.id, scopes: token.scopes, expiresAt: token.expiresAt } : null,
      };
    },
    listTokens: async (ctx: HandlerContext) => ({ items: await d.tenancy.listTokens(ctx.subject) }),
    createToken: async (ctx: HandlerContext) => {
      const r = await d.tenancy.createToken(ctx.subject, ctx.body as { name: string; ttlSeconds?: number; scopes?: string[]; org?: string });
      return { token: r.token, info: r.view };
    },
    revokeToken: async (ctx: HandlerContext) => {
      await d.tenancy.revokeToken(ctx.subject, ctx.params.id!);
      return undefined;
    },
    listOrgs: async (ctx: HandlerContext) => ({ items: await d.tenancy.orgs(ctx.subject) }),
    setOrgTrust: async (ctx: HandlerContext) => {
      const r = await d.tenancy.setOrgTrust(ctx.subject, ctx.params.name!, (ctx.body as { trusted: boolean }).trusted);
      setAuditOrg(ctx.req, r.orgId);
      return r.trust;
    },
    // Recorded in the new organization's log: its first entry says who created it.
    createOrg: async (ctx: HandlerContext) => {
      const r = await d.tenancy.createOrg(ctx.subject, (ctx.body as { name: string }).name);
      setAuditOrg(ctx.req, r.orgId);
      return r.org;
    },
    listInvitations: async (ctx: HandlerContext) => ({ items: await d.tenancy.invitations(ctx.subject) }),
    createInvitation: async (ctx: HandlerContext) => {
      const b = ctx.body as { role: OrgRole; ttlSeconds?: number };
      return d.tenancy.invite(ctx.subject, b.role, b.ttlSeconds);
    },
    revokeInvitation: async (ctx: HandlerContext) => {
      await d.tenancy.revokeInvitation(ctx.subject, ctx.params.id!);
      return undefined;
    },
    // Recorded in the organization joined.
    acceptInvitation: async (ctx: HandlerContext) => {
      const r = await d.tenancy.acceptInvitation(ctx.subject, (ctx.body as { token: string }).token);
      setAuditOrg(ctx.req, r.orgId);
      return { org: r.org, role: r.role };
    },
    listMembers: async (ctx: HandlerContext) => ({ items: await d.tenancy.members(ctx.subject) }),
    setMember: async (ctx: HandlerContext) => {
      await d.tenancy.setMember(ctx.subject, ctx.params.user!, (ctx.body as { role: OrgRole }).role);
      return undefined;
    },
    removeMember: async (ctx: HandlerContext) => {
      await d.tenancy.removeMember(ctx.subject, ctx.params.user!);
      return undefined;
    },
    createServiceAccount: async (ctx: HandlerContext) => {
      const r = await d.tenancy.createServiceAccount(ctx.subject, ctx.body as { name: string; role: OrgRole; ttlSeconds?: number });
      return { token: r.token, info: r.view };
    },
    listTeams: async (ctx: HandlerContext) => ({ items: await d.tenancy.teams(ctx.subject) }),
    createTeam: async (ctx: HandlerContext) => {
      await d.tenancy.createTeam(ctx.subject, (ctx.body as { name: string }).name);
      return undefined;
    },
    deleteTeam: async (ctx: HandlerContext) => {
      await d.tenancy.deleteTeam(ctx.subject, ctx.params.team!);
      return undefined;
    },
    setTeamMember: async (ctx: HandlerContext) => {
      await d.tenancy.setTeamMember(ctx.subject, ctx.params.team!, ctx.params.user!, (ctx.body as { role: TeamRole }).role);
      return undefined;
    },
    removeTeamMember: async (ctx: HandlerContext) => {
      await d.tenancy.setTeamMember(ctx.subject, ctx.params.team!, ctx.params.user!, null);
      return undefined;
    },
    listBoxShares: async (ctx: HandlerContext) => {
      const box = await d.boxes.get(ctx.subject, ctx.params.name!, { owner: owner(ctx) });
      const names = await teamNames(box.orgId);
      const shares = (await d.tenancyStore.sharesOf([box.id])).get(box.id) ?? [];
      return { items: shares.map((s) => ({ team: names.get(s.teamId) ?? s.teamId, access: s.access as ShareAccess })) };
    },
    setBoxShare: async (ctx: HandlerContext) => {
      const { box, team } = await shareTarget(ctx);
      const access = (ctx.body as { access: ShareAccess }).access;
      await d.tenancyStore.setShare(box.id, team.id, access);
      d.feed.emit('box', box);
      return { team: team.name, access };
    },
    removeBoxShare: async (ctx: HandlerContext) => {
      const { box, team } = await shareTarget(ctx);
      await d.tenancyStore.removeShare(box.id, team.id);
      d.feed.emit('box', box);
      return undefined;
    },
    listQuotas: async (ctx: HandlerContext) => {
      const org = ctx.query.org as string | undefined;
      // An operator looking at an organization sees every quota in it; everyone else those that apply to them.
      if (org !== undefined) return { items: await d.quotas.forOrg(await d.tenancy.quotaOrg(ctx.subject, 'org', org)) };
      return { items: await d.quotas.forUser(ctx.subject.orgId, ctx.subject.name) };
    },
    // Both quota writes need `org:admin`, which their routes declare (checked in create-app); the
    // organization-wide quota and other organizations' quotas are the operators' (quotaOrg).
    setQuota: async (ctx: HandlerContext) => {
      const orgId = await d.tenancy.quotaOrg(ctx.subject, ctx.params.scope!, ctx.query.org as string | undefined);
      setAuditOrg(ctx.req, orgId);
      return d.quotas.set(orgId, ctx.params.scope!, ctx.body as QuotaLimits, d.now());
    },
    deleteQuota: async (ctx: HandlerContext) => {
      const orgId = await d.tenancy.quotaOrg(ctx.subject, ctx.params.scope!, ctx.query.org as string | undefined);
      setAuditOrg(ctx.req, orgId);
      await d.quotas.remove(orgId, ctx.params.scope!);
      return undefined;
    },
  };
}
