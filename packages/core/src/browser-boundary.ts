/**
 * The rules that keep a box's web content away from the gateway's own origin: which preview domain
 * may serve previews next to a gateway, where a sign-in may redirect to, and which cookies a
 * previewed app may set. Pure decisions; the gateway applies them to requests and responses.
 */
import { parse } from 'tldts';

/** A host without brackets, trailing dot or port, lower-cased. */
function bareHost(host: string): string {
  return host
    .trim()
    .toLowerCase()
    .replace(/^\[(.*)\](:\d+)?$/, '$1')
    .replace(/^([^:]+):\d+$/, '$1')
    .replace(/\.$/, '');
}

/**
 * The site a browser files a host under for SameSite cookies and `Sec-Fetch-Site`: its registrable
 * domain by the Public Suffix List (private suffixes such as `github.io` included, and an unknown
 * top-level name, `localhost` or `test`, counted as a suffix as browsers do), or the host itself
 * for an IP address or a name that is a suffix on its own.
 */
export function siteOf(host: string): string {
  const bare = bareHost(host);
  const p = parse(bare, { allowPrivateDomains: true });
  if (p.isIp) return bare;
  return p.domain ?? bare;
}

/** Whether `host` is `domain` or a name below it: what a cookie's Domain attribute reaches. */
export function domainMatches(host: string, domain: string): boolean {
  const h = bareHost(host);
  const d = bareHost(domain).replace(/^\./, '');
  return h === d || h.endsWith(`.${d}`);
}

/** Why a preview domain may not serve previews next to a gateway. */
export interface PreviewDomainConflict {
  /** `not-a-domain`: no DNS name; `nested`: the same host or one inside the other; `same-site`: one registrable domain. */
  reason: 'not-a-domain' | 'nested' | 'same-site';
  /** One sentence for the operator. */
  message: string;
}

/**
 * Why previews on `<port>--<box>.<previewDomain>` must not be served next to a gateway reached at
 * `gatewayHost`, or null when they may. A box's page on a host of the gateway's own site would ride
 * along on the gateway's SameSite cookies and could set cookies the gateway reads; one domain
 * inside the other would let a cookie's Domain attribute cover both, whatever browsers make of
 * suffixes nobody registered (`localhost`).
 */
export function previewDomainConflict(gatewayHost: string, previewDomain: string): PreviewDomainConflict | null {
  const gw = bareHost(gatewayHost);
  const domain = bareHost(previewDomain);
  if (!/^[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*$/.test(domain) || parse(domain).isIp) {
    return { reason: 'not-a-domain', message: `the preview domain "${previewDomain}" is not a DNS name previews can live under` };
  }
  if (domainMatches(gw, domain) || domainMatches(domain, gw)) {
    return { reason: 'nested', message: `the preview domain "${previewDomain}" and the gateway's host "${gw}" are the same host or one lies inside the other` };
  }
  if (siteOf(`1--box.${domain}`) === siteOf(gw)) {
    return { reason: 'same-site', message: `previews under "${previewDomain}" would be same-site with the gateway's host "${gw}" (both in "${siteOf(gw)}")` };
  }
  return null;
}

/**
 * Where a sign-in may send the browser afterwards: `next` when it is a path that resolves (the way
 * a browser resolves a Location header, WHATWG URL) to `origin` itself, else `/`. Backslashes,
 * encoded or not, whitespace and control characters are refused outright: browsers and servers
 * disagree on them, and no link Devyard makes contains them.
 */
export function signInRedirect(next: string | null | undefined, origin: string): string {
  if (!next || !next.startsWith('/') || next.startsWith('//')) return '/';
  // eslint-disable-next-line no-control-regex
  if (/[\\\u0000-\u0020\u007f]|%5c/i.test(next)) return '/';
  let target: URL;
  try {
    target = new URL(next, origin);
  } catch {
    return '/';
  }
  if (target.origin !== new URL(origin).origin) return '/';
  return `${target.pathname}${target.search}${target.hash}`;
}

/**
 * Whether a previewed app's `Set-Cookie` may reach the browser: never for one of the gateway's own
 * cookie names (in any case, with or without a `__Host-`/`__Secure-` prefix, or as a nameless
 * cookie whose value browsers send back as `name=value`), and never with a Domain attribute other
 * than the preview host itself, which would reach the gateway or other users' previews.
 */
export function previewCookieAllowed(cookie: { name: string; value?: string; domain?: string }, previewHost: string, ownNames: readonly string[]): boolean {
  const value = cookie.value ?? '';
  const sentAs = cookie.name !== '' ? cookie.name : value.includes('=') ? value.slice(0, value.indexOf('=')) : '';
  const bare = sentAs.trim().replace(/^__(host|secure)-/i, '').toLowerCase();
  if (ownNames.some((n) => n.toLowerCase() === bare)) return false;
  if (cookie.domain !== undefined && cookie.domain !== '') {
    return bareHost(cookie.domain).replace(/^\./, '') === bareHost(previewHost);
  }
  return true;
}
