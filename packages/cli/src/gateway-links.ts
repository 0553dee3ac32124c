/** URLs of a gateway the CLI builds: tunnel endpoints and browser sign-in links. */
import type { GatewayEndpoint } from '@devyard/api/access-schemas';
import { previewHost } from '@devyard/core/access-policy';
import { CliUsageError } from './cli-config.js';

/** A tunnel endpoint of the gateway as a ws:// (or wss://) URL. */
export function tunnelUrl(gateway: GatewayEndpoint, path: string): string {
  return `${gateway.url.replace(/\/+$/, '').replace(/^http/, 'ws')}${path}`;
}

/**
 * A browser link that signs in with `token` (a sign-in token for exactly this terminal or preview)
 * and lands on the box's terminal on the gateway, or on the preview of `port` on its own host
 * (`<port>--<box>.<previewDomain>`): previews are never served under the gateway's origin.
 */
export function browserLink(gateway: GatewayEndpoint, token: string, box: string, port?: number): string {
  const base = new URL(gateway.url);
  const basePath = base.pathname.replace(/\/+$/, '');
  if (port === undefined) {
    return `${base.origin}${basePath}/__devyard/auth?token=${encodeURIComponent(token)}&next=${encodeURIComponent(`${basePath}/boxes/${box}/terminal`)}`;
  }
  if (!gateway.previewDomain) {
    throw new CliUsageError(`the gateway at ${gateway.url} serves no previews: start it with --preview-domain <a domain of another site than the gateway> (\`devyard up\` serves them under localhost)`);
  }
  const origin = `${base.protocol}//${previewHost(port, box, gateway.previewDomain)}${base.port ? `:${base.port}` : ''}`;
  return `${origin}/__devyard/auth?token=${encodeURIComponent(token)}&next=${encodeURIComponent('/')}`;
}
