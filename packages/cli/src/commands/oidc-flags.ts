/** The `--oidc-*` and `--public-url` flags of `devyard server` and `devyard up` (docs/identity.md). */
import type { Command } from 'commander';
import type { OidcOptions } from '@devyard/server/identity/oidc-login';
import { CliUsageError } from '../cli-config.js';

/** Flag values as commander parses them. */
export interface OidcFlags {
  /** --oidc-issuer */
  oidcIssuer?: string;
  /** --oidc-client-id */
  oidcClientId?: string;
  /** --oidc-client-secret */
  oidcClientSecret?: string;
  /** --oidc-redirect-uri */
  oidcRedirectUri?: string;
  /** --oidc-username-claim */
  oidcUsernameClaim?: string;
  /** --oidc-email-claim */
  oidcEmailClaim?: string;
  /** --oidc-scopes */
  oidcScopes?: string;
  /** --public-url */
  publicUrl?: string;
}

export function addOidcFlags(cmd: Command): Command {
  return cmd
    .option('--public-url <url>', 'base URL browsers and CLIs reach the API at (default: the listen URL); the OIDC redirect URI derives from it')
    .option('--oidc-issuer <url>', 'OpenID Connect issuer for single sign-on (`devyard login`)')
    .option('--oidc-client-id <id>', 'client id registered at the issuer')
    .option('--oidc-client-secret <secret>', 'client secret (prefer the DEVYARD_OIDC_CLIENT_SECRET environment variable; none: a public client with PKCE)')
    .option('--oidc-redirect-uri <url>', 'redirect URI registered at the issuer (default <public URL>/v1/auth/oidc/callback)')
    .option('--oidc-username-claim <claim>', 'claim that names the Devyard user (default preferred_username, then email, then sub)')
    .option('--oidc-email-claim <claim>', 'claim with the email address (default email)')
    .option('--oidc-scopes <scopes>', 'scopes to request, space- or comma-separated (default "openid profile email")');
}

function url(flag: string, v: string, keepTrailingSlash = false): string {
  try {
    const u = new URL(v);
    if (u.protocol !== 'http:' && u.protocol !== 'https:') throw new Error();
  } catch {
    throw new CliUsageError(`${flag} expects an http(s) URL, got "${v}"`);
  }
  return keepTrailingSlash ? v : v.replace(/\/+$/, '');
}

/** The control plane's `oidc` and `publicUrl` options from the flags (and DEVYARD_OIDC_CLIENT_SECRET). */
export function oidcFromFlags(o: OidcFlags, env: NodeJS.ProcessEnv = process.env): { oidc?: OidcOptions; publicUrl?: string } {
  const publicUrl = o.publicUrl === undefined ? undefined : url('--public-url', o.publicUrl);
  const secret = o.oidcClientSecret ?? (env.DEVYARD_OIDC_CLIENT_SECRET?.trim() || undefined);
  const any = o.oidcClientId ?? o.oidcClientSecret ?? o.oidcRedirectUri ?? o.oidcUsernameClaim ?? o.oidcEmailClaim ?? o.oidcScopes;
  if (!o.oidcIssuer) {
    if (any !== undefined) throw new CliUsageError('the --oidc-* flags need --oidc-issuer');
    return { publicUrl };
  }
  if (!o.oidcClientId) throw new CliUsageError('--oidc-issuer needs --oidc-client-id');
  const scopes = o.oidcScopes?.split(/[\s,]+/).filter(Boolean);
  if (scopes && !scopes.includes('openid')) throw new CliUsageError('--oidc-scopes must include openid');
  const claims = { ...(o.oidcUsernameClaim ? { username: o.oidcUsernameClaim } : {}), ...(o.oidcEmailClaim ? { email: o.oidcEmailClaim } : {}) };
  return {
    publicUrl,
    oidc: {
      // An issuer is compared character for character with the provider's metadata: kept as given.
      issuer: url('--oidc-issuer', o.oidcIssuer, true),
      clientId: o.oidcClientId,
      ...(secret ? { clientSecret: secret } : {}),
      ...(o.oidcRedirectUri ? { redirectUri: url('--oidc-redirect-uri', o.oidcRedirectUri, true) } : {}),
      ...(scopes ? { scopes } : {}),
      ...(Object.keys(claims).length ? { claims } : {}),
    },
  };
}
