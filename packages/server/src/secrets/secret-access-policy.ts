/**
 * Who may see and change which secrets: the one place this rule lives. Every secrets route and the
 * secret service ask here and nowhere else. The organization check comes first: a secret of another
 * organization is never visible (the API answers 404, never 403).
 *   - `user` scope: only the user it belongs to;
 *   - `org` scope: every member lists, owners and admins write;
 *   - `team` scope: the team's members list, team admins and org admins write;
 *   - `template` scope: every member lists, template admins (and owners, admins) write.
 */
import { roleAllows } from '@devyard/core/rbac-policy';
import type { Subject } from '../services/box-service.js';

/** The scope types a secret can belong to. */
export type SecretScopeType = 'org' | 'team' | 'user' | 'template';

/** A concrete scope: which org, which kind of owner, and which one. */
export interface SecretScope {
  /** The organization the secret belongs to. */
  orgId: string;
  /** Org-wide, a team's, a user's or a template's. */
  type: SecretScopeType;
  /** The org id, team name, user name or template name. */
  id: string;
}

type Caller = Pick<Subject, 'name' | 'kind' | 'orgId' | 'role' | 'teams'>;

const teamRole = (subject: Caller, team: string) => subject.teams?.find((t) => t.name === team)?.role;

export const secretAccess = {
  /** Whether the subject may see that secrets of this scope exist (their metadata; never values). */
  mayList(subject: Caller, scope: SecretScope): boolean {
    if (subject.orgId !== scope.orgId || subject.kind !== 'user') return false;
    if (scope.type === 'user') return scope.id === subject.name;
    if (scope.type === 'team') return teamRole(subject, scope.id) !== undefined || roleAllows(subject.role, 'org:admin');
    return true;
  },

  /** Whether the subject may create, replace or delete secrets of this scope. */
  mayWrite(subject: Caller, scope: SecretScope): boolean {
    if (subject.orgId !== scope.orgId || subject.kind !== 'user') return false;
    if (scope.type === 'user') return scope.id === subject.name && roleAllows(subject.role, 'org:use');
    if (scope.type === 'team') return teamRole(subject, scope.id) === 'admin' || roleAllows(subject.role, 'org:admin');
    if (scope.type === 'template') return roleAllows(subject.role, 'template:write');
    return roleAllows(subject.role, 'org:admin');
  },
};
