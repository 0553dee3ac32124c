/**
 * Schemas of identity and tenancy: the caller, personal tokens and service accounts, organization
 * members, teams, box shares and quotas.
 */
import { z } from 'zod';
import { ORG_ROLES, SHARE_ACCESS, TEAM_ROLES } from '@devyard/core/rbac-policy';
import { NameSchema, TimestampSchema } from './common-schemas.js';
import { inlineText } from './input-schemas.js';

export const OrgRoleSchema = z.enum(ORG_ROLES).meta({ id: 'OrgRole' });
export const TeamRoleSchema = z.enum(TEAM_ROLES).meta({ id: 'TeamRole' });
export const ShareAccessSchema = z.enum(SHARE_ACCESS).meta({ id: 'ShareAccess', description: 'connect: shells, files, ports; manage: also lifecycle verbs and delete' });

export const MeSchema = z
  .object({
    user: z.string(),
    kind: z.enum(['user', 'service']),
    org: z.string(),
    role: OrgRoleSchema,
    teams: z.array(z.object({ name: z.string(), role: TeamRoleSchema })),
    token: z.object({ id: z.string(), scopes: z.array(z.string()).nullable(), expiresAt: TimestampSchema.nullable() }).nullable(),
  })
  .meta({ id: 'Me' });

export const TokenSchema = z
  .object({
    id: z.string(),
    name: z.string(),
    user: z.string(),
    scopes: z.array(z.string()).nullable().meta({ description: 'null: everything the user role allows' }),
    createdAt: TimestampSchema,
    expiresAt: TimestampSchema.nullable(),
    lastUsedAt: TimestampSchema.nullable(),
    revoked: z.boolean(),
  })
  .meta({ id: 'Token' });

export const TokenListSchema = z.object({ items: z.array(TokenSchema) }).meta({ id: 'TokenList' });

export const TokenScopeSchema = z.enum(['read', 'write']);

export const CreateTokenRequestSchema = z
  .object({
    name: inlineText(100),
    ttlSeconds: z.number().int().min(60).max(365 * 86400).optional().meta({ description: 'lifetime (default 30 days, at most a year)' }),
    scopes: z.array(TokenScopeSchema).min(1).optional().meta({ description: 'read: GET routes only; write: everything the role allows' }),
    org: NameSchema.optional().meta({ description: 'organization the token acts in (default: the current one); you must be a member' }),
  })
  .strict();

export const OrgSchema = z
  .object({
    name: z.string(),
    role: OrgRoleSchema,
    createdAt: TimestampSchema,
    trusted: z.boolean().meta({ description: "whether an operator trusts the organization's code to share the node's kernel (sandbox runtime); otherwise its boxes run in microVMs" }),
  })
  .meta({ id: 'Org' });
export const OrgTrustSchema = z.object({ name: z.string(), trusted: z.boolean() }).meta({ id: 'OrgTrust' });
export const SetOrgTrustRequestSchema = z.object({ trusted: z.boolean() }).strict();
export const OrgListSchema = z.object({ items: z.array(OrgSchema) }).meta({ id: 'OrgList' });
export const CreateOrgRequestSchema = z.object({ name: NameSchema }).strict();

export const CreatedTokenSchema = z
  .object({ token: z.string().meta({ description: 'shown once; only its hash is stored' }), info: TokenSchema })
  .meta({ id: 'CreatedToken' });

export const MemberSchema = z.object({ user: z.string(), kind: z.string(), role: OrgRoleSchema, since: TimestampSchema }).meta({ id: 'Member' });
export const MemberListSchema = z.object({ items: z.array(MemberSchema) }).meta({ id: 'MemberList' });
export const SetMemberRequestSchema = z.object({ role: OrgRoleSchema }).strict();

export const CreateServiceAccountRequestSchema = z
  .object({ name: NameSchema, role: OrgRoleSchema, ttlSeconds: z.number().int().min(60).max(365 * 86400).optional() })
  .strict();

export const TeamSchema = z.object({ name: z.string(), members: z.array(z.object({ user: z.string(), role: TeamRoleSchema })) }).meta({ id: 'Team' });
export const TeamListSchema = z.object({ items: z.array(TeamSchema) }).meta({ id: 'TeamList' });
export const CreateTeamRequestSchema = z.object({ name: NameSchema }).strict();
export const SetTeamMemberRequestSchema = z.object({ role: TeamRoleSchema }).strict();

export const BoxShareSchema = z.object({ team: z.string(), access: ShareAccessSchema }).meta({ id: 'BoxShare' });
export const BoxShareListSchema = z.object({ items: z.array(BoxShareSchema) }).meta({ id: 'BoxShareList' });
export const SetBoxShareRequestSchema = z.object({ access: ShareAccessSchema }).strict();

export const QUOTA_RESOURCES = ['boxes', 'runningBoxes', 'cpuMillis', 'memoryBytes', 'gpu', 'diskBytes'] as const;
export const QuotaLimitsSchema = z
  .object(Object.fromEntries(QUOTA_RESOURCES.map((r) => [r, z.number().int().nonnegative().optional()])) as Record<(typeof QUOTA_RESOURCES)[number], z.ZodOptional<z.ZodNumber>>)
  .strict()
  .meta({ id: 'QuotaLimits', description: 'absent: no limit; vCPU in millicores, memory and storage in bytes' });

export const QuotaScopeParamSchema = z
  .string()
  .max(70)
  .regex(/^(org|team:[a-z0-9-]+|user:[a-z0-9-]+)$/, 'scope is org, team:<team> or user:<user>')
  .meta({ description: 'org, team:<team> or user:<user>' });

export const QuotaSchema = z
  .object({ scope: z.string(), limits: QuotaLimitsSchema, usage: z.record(z.string(), z.number()) })
  .meta({ id: 'Quota' });
export const QuotaListSchema = z.object({ items: z.array(QuotaSchema) }).meta({ id: 'QuotaList' });

export type Me = z.infer<typeof MeSchema>;
export type Token = z.infer<typeof TokenSchema>;
export type CreatedToken = z.infer<typeof CreatedTokenSchema>;
export type Member = z.infer<typeof MemberSchema>;
export type Team = z.infer<typeof TeamSchema>;
export type BoxShare = z.infer<typeof BoxShareSchema>;
export type QuotaLimits = z.infer<typeof QuotaLimitsSchema>;
export type Quota = z.infer<typeof QuotaSchema>;

export const InvitationSchema = z
  .object({ id: z.string(), role: OrgRoleSchema, createdBy: z.string(), createdAt: TimestampSchema, expiresAt: TimestampSchema, state: z.enum(['open', 'accepted', 'revoked']) })
  .meta({ id: 'Invitation' });
export const InvitationListSchema = z.object({ items: z.array(InvitationSchema) }).meta({ id: 'InvitationList' });
export const CreateInvitationRequestSchema = z
  .object({ role: OrgRoleSchema, ttlSeconds: z.number().int().min(60).max(30 * 86400).optional().meta({ description: 'default 7 days' }) })
  .strict();
export const CreatedInvitationSchema = z.object({ token: z.string().meta({ description: 'shown once; give it to the person you invite' }), invitation: InvitationSchema }).meta({ id: 'CreatedInvitation' });
export const AcceptInvitationRequestSchema = z.object({ token: inlineText(200) }).strict();
export const AcceptedInvitationSchema = z.object({ org: z.string(), role: OrgRoleSchema }).meta({ id: 'AcceptedInvitation' });

export type Invitation = z.infer<typeof InvitationSchema>;
export type CreatedInvitation = z.infer<typeof CreatedInvitationSchema>;
