/**
 * Who may reach a box through a gateway, on top of rbac-policy's box access: used by gateways
 * offline, from their cached route table. An "org-visible" port is open to every member of the
 * box's organization, a private one only to those who may connect.
 */
import { accessAtLeast, boxAccess, type BoxAccess, type OrgRole, type SharedBox } from './rbac-policy.js';

/** Who may open a port's preview: users who may connect (private) or the whole organization. */
export type PortVisibility = 'private' | 'org';

/**
 * What a user may do with a box through a gateway, from the user's membership in the box's
 * organization (none: not a member) and the box's shares — the same rule the server applies.
 */
export function gatewayAccess(membership: { role: OrgRole; teamIds: readonly string[] } | undefined, userName: string, box: SharedBox): BoxAccess {
  if (!membership) return 'none';
  return boxAccess({ name: userName, orgId: box.orgId, role: membership.role, teamIds: membership.teamIds }, box);
}

/** Whether a user may shell in, copy files and forward ports. */
export function mayConnect(access: BoxAccess): boolean {
  return accessAtLeast(access, 'connect');
}

/** Whether a user may open a port's preview: those who may connect, or any member for an org-visible port. */
export function mayOpenPort(access: BoxAccess, isMember: boolean, visibility: PortVisibility): boolean {
  return mayConnect(access) || (isMember && visibility === 'org');
}

/** The host alias a box is known by in `~/.ssh/config` and `known_hosts`. */
export function boxHostAlias(boxName: string): string {
  return `devyard.${boxName}`;
}

/** Host form of a preview: `<port>--<box>.<domain>`; parses back with parsePreviewHost. */
export function previewHost(port: number, boxName: string, domain: string): string {
  return `${port}--${boxName}.${domain}`;
}

/** Reads `<port>--<box>.<domain>[:listen port]` back; null for any other host. */
export function parsePreviewHost(host: string, domain: string): { port: number; box: string } | null {
  const bare = host.replace(/:\d+$/, '').toLowerCase();
  const suffix = `.${domain.toLowerCase()}`;
  if (!bare.endsWith(suffix)) return null;
  const m = /^(\d{1,5})--([a-z0-9][a-z0-9-]*)$/.exec(bare.slice(0, -suffix.length));
  if (!m) return null;
  const port = Number(m[1]);
  return port >= 1 && port <= 65535 ? { port, box: m[2]! } : null;
}

/**
 * What one browser credential (a sign-in link, the cookie it becomes) opens: the terminal of one
 * box, or the preview of one port of one box. Box names are as the user addresses them in the URL
 * (`/boxes/<box>/terminal`, `<port>--<box>.<domain>`); the gateway resolves them for the token's
 * subject on every request, as it does for bearer tokens.
 */
export type BrowserScope = { kind: 'terminal'; box: string } | { kind: 'preview'; box: string; port: number };

/** Whether a credential of scope `held` opens `wanted`: only the very thing it was issued for. */
export function scopeCovers(held: BrowserScope, wanted: BrowserScope): boolean {
  if (held.kind === 'terminal') return wanted.kind === 'terminal' && held.box === wanted.box;
  return wanted.kind === 'preview' && held.box === wanted.box && held.port === wanted.port;
}

/** The path of a box's browser terminal; its session cookie is scoped to it (and to `/ws` below it). */
export function terminalPath(box: string): string {
  return `/boxes/${box}/terminal`;
}
