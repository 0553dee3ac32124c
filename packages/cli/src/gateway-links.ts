/** URLs of a gateway the CLI builds: tunnel endpoints and browser sign-in links. */
import type { GatewayEndpoint } from '@devyard/api/access-schemas';
import { previewHost } from '@devyard/core/access-policy';

/** A tunnel endpoint of the gateway as a ws:// (or wss://) URL. */
export function tunnelUrl(gateway: GatewayEndpoint, path: string): string {
  return `${gateway.url.replace(/\/+$/, '').replace(/^http/, 'ws')}${path}`;
}

/**
 * A browser link that signs in with `token` and lands on the box's terminal, or on the preview of
 * `port`: on its own host (`<port>--<box>.<previewDomain>`) when the gateway has a preview domain,
 * under `/p/<box>/<port>/` otherwise.
 */
export function browserLink(gateway: GatewayEndpoint, token: string, box: string, port?: number): string {
  const base = new URL(gateway.url);
  let origin = base.origin;
  let next = `${base.pathname.replace(/\/+$/, '')}/boxes/${box}/terminal`;
  if (port !== undefined) {
    if (gateway.previewDomain) {
      origin = `${base.protocol}//${previewHost(port, box, gateway.previewDomain)}${base.port ? `:${base.port}` : ''}`;
      next = '/';
    } else next = `${base.pathname.replace(/\/+$/, '')}/p/${box}/${port}/`;
  }
  const authPath = port !== undefined && gateway.previewDomain ? '' : base.pathname.replace(/\/+$/, '');
  return `${origin}${authPath}/__devyard/auth?token=${encodeURIComponent(token)}&next=${encodeURIComponent(next)}`;
}
