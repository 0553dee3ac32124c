/**
 * Who may reach a box through a gateway. One place for the rule, used by the server (routes,
 * connection details, wake) and by gateways (offline, from their cached route table).
 *
 * Until organizations exist, every user of an installation is in its one organization: an
 * "org-visible" port is open to every signed-in user, a private one only to those who may connect.
 */

/** The part of a box the access rules look at. */
export interface AccessBox {
  /** Subject that owns the box. */
  owner: string;
}

/** Who may open a port's preview: users who may connect (private) or the whole organization. */
export type PortVisibility = 'private' | 'org';

/** Whether `subject` may open shells, copy files and forward ports into the box. */
export function mayConnect(subject: string, box: AccessBox): boolean {
  return subject === box.owner;
}

/** Whether `subject` may start or resume the box on connect (a stopped box is woken by the gateway). */
export function mayWake(subject: string, box: AccessBox): boolean {
  return subject === box.owner;
}

/** Whether `subject` may open the preview of a port with the given visibility. */
export function mayOpenPort(subject: string, box: AccessBox, visibility: PortVisibility): boolean {
  return mayConnect(subject, box) || visibility === 'org';
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
