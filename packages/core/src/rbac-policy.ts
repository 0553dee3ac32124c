/**
 * Who may do what: organization roles, team roles and box access. Pure rules; the server's
 * authorization layer applies them to every request and background loop, and the authorization
 * matrix test checks every route against them.
 *
 * Visibility and change are separate: a resource the caller may not see is answered like one that
 * does not exist (404), one it may see but not change is refused (403).
 */

export const ORG_ROLES = ['owner', 'admin', 'template-admin', 'auditor', 'member'] as const;
export type OrgRole = (typeof ORG_ROLES)[number];

export const TEAM_ROLES = ['admin', 'member'] as const;
export type TeamRole = (typeof TEAM_ROLES)[number];

/** How a box is shared with a team: its members may connect, or also operate and delete it. */
export const SHARE_ACCESS = ['connect', 'manage'] as const;
export type ShareAccess = (typeof SHARE_ACCESS)[number];

/**
 * Organization-level permissions a route needs before any resource is looked at. Box routes need
 * `org:use` here and a box access level (below) on the box itself.
 */
export type OrgPermission =
  /** Read the organization: its templates, teams, members, own tokens and keys. */
  | 'org:read'
  /** Create and use boxes, keys, tokens, own secrets (everyone but auditors). */
  | 'org:use'
  /** Publish templates and manage template-scoped secrets. */
  | 'template:write'
  /** Read the audit log. */
  | 'audit:read'
  /** Manage members, teams, service accounts, quotas, org secrets, all boxes. */
  | 'org:admin'
  /** See nodes and their capacity. */
  | 'node:read'
  /** Cordon and uncordon nodes (operators: admins of the default organization). */
  | 'node:write';

const GRANTS: Record<OrgRole, readonly OrgPermission[]> = {
  owner: ['org:read', 'org:use', 'template:write', 'audit:read', 'org:admin', 'node:read', 'node:write'],
  admin: ['org:read', 'org:use', 'template:write', 'audit:read', 'org:admin', 'node:read', 'node:write'],
  'template-admin': ['org:read', 'org:use', 'template:write'],
  auditor: ['org:read', 'audit:read'],
  member: ['org:read', 'org:use'],
};

/** Whether an organization role carries a permission. */
export function roleAllows(role: OrgRole, permission: OrgPermission): boolean {
  return GRANTS[role].includes(permission);
}

/** Roles a granter may hand out: owners any, admins any but owner, nobody else none. */
export function mayGrantRole(granter: OrgRole, role: OrgRole): boolean {
  if (granter === 'owner') return true;
  if (granter === 'admin') return role !== 'owner';
  return false;
}

/** Whether `granter` may change or remove the membership of someone who holds `current`. */
export function mayChangeMember(granter: OrgRole, current: OrgRole): boolean {
  if (granter === 'owner') return true;
  if (granter === 'admin') return current !== 'owner';
  return false;
}

/** What a caller may do with one box, from least to most. */
export type BoxAccess = 'none' | 'read' | 'connect' | 'manage';
const ACCESS_ORDER: readonly BoxAccess[] = ['none', 'read', 'connect', 'manage'];

/** Whether `have` is at least `need`. */
export function accessAtLeast(have: BoxAccess, need: BoxAccess): boolean {
  return ACCESS_ORDER.indexOf(have) >= ACCESS_ORDER.indexOf(need);
}

/** The caller as the box rules see it. */
export interface BoxViewer {
  /** User name. */
  name: string;
  /** Organization the caller acts in. */
  orgId: string;
  /** Role in that organization. */
  role: OrgRole;
  /** Ids of the caller's teams in that organization. */
  teamIds: readonly string[];
}

/** The box as the rules see it. */
export interface SharedBox {
  /** Owner's user name. */
  owner: string;
  /** Organization of the box. */
  orgId: string;
  /** Teams the box is shared with. */
  shares: ReadonlyArray<{ teamId: string; access: ShareAccess }>;
}

/**
 * Whether a role sees every box of its organization (owners and admins manage them, auditors read
 * them); other members see the boxes they own and those shared with one of their teams.
 */
export function seesEveryBox(role: OrgRole): boolean {
  return role === 'owner' || role === 'admin' || role === 'auditor';
}

/**
 * A box's owner and the organization's owners and admins manage it; teams it is shared with connect
 * or manage as shared; auditors read it; boxes of other organizations do not exist for the caller.
 */
export function boxAccess(viewer: BoxViewer, box: SharedBox): BoxAccess {
  if (viewer.orgId !== box.orgId) return 'none';
  if (box.owner === viewer.name) return viewer.role === 'auditor' ? 'read' : 'manage';
  if (viewer.role === 'owner' || viewer.role === 'admin') return 'manage';
  let best: BoxAccess = seesEveryBox(viewer.role) ? 'read' : 'none';
  for (const s of box.shares) {
    if (viewer.teamIds.includes(s.teamId) && accessAtLeast(s.access, best)) best = s.access;
  }
  return best;
}
