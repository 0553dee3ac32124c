import { describe, expect, it } from 'vitest';
import { accessAtLeast, boxAccess, mayChangeMember, mayGrantRole, ORG_ROLES, roleAllows } from '@devyard/core/rbac-policy';

describe('rbac policy', () => {
  it('grants each role its permissions', () => {
    expect(ORG_ROLES.filter((r) => roleAllows(r, 'org:use'))).toEqual(['owner', 'admin', 'template-admin', 'member']);
    expect(ORG_ROLES.filter((r) => roleAllows(r, 'template:write'))).toEqual(['owner', 'admin', 'template-admin']);
    expect(ORG_ROLES.filter((r) => roleAllows(r, 'audit:read'))).toEqual(['owner', 'admin', 'auditor']);
    expect(ORG_ROLES.filter((r) => roleAllows(r, 'org:admin'))).toEqual(['owner', 'admin']);
    expect(ORG_ROLES.every((r) => roleAllows(r, 'org:read'))).toBe(true);
  });

  it('refuses escalation: admins grant anything but owner, only owners touch owners', () => {
    expect(mayGrantRole('owner', 'owner')).toBe(true);
    expect(mayGrantRole('admin', 'owner')).toBe(false);
    expect(mayGrantRole('admin', 'admin')).toBe(true);
    expect(mayGrantRole('template-admin', 'member')).toBe(false);
    expect(mayChangeMember('admin', 'owner')).toBe(false);
    expect(mayChangeMember('owner', 'owner')).toBe(true);
  });

  it('gives box access by ownership, organization role and team shares, never across organizations', () => {
    const box = { owner: 'alice', orgId: 'o1', shares: [{ teamId: 'web', access: 'connect' as const }, { teamId: 'ops', access: 'manage' as const }] };
    const v = (name: string, role: (typeof ORG_ROLES)[number], teamIds: string[] = [], orgId = 'o1') => boxAccess({ name, orgId, role, teamIds }, box);
    expect(v('alice', 'member')).toBe('manage');
    expect(v('alice', 'auditor')).toBe('read');
    expect(v('bob', 'member')).toBe('none');
    expect(v('bob', 'member', ['web'])).toBe('connect');
    expect(v('bob', 'member', ['web', 'ops'])).toBe('manage');
    expect(v('carol', 'auditor')).toBe('read');
    expect(v('dave', 'admin')).toBe('manage');
    expect(v('dave', 'template-admin')).toBe('none');
    expect(v('alice', 'owner', [], 'o2')).toBe('none');
    expect(accessAtLeast('manage', 'connect')).toBe(true);
    expect(accessAtLeast('read', 'connect')).toBe(false);
  });
});
