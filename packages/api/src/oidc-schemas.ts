/** Query parameters of the OIDC sign-in routes (browser redirects; see docs/identity.md). */
import { z } from 'zod';

export const OidcLoginQuerySchema = z.object({
  cli: z
    .string()
    .max(2048)
    .optional()
    .meta({ description: 'loopback URL of a waiting `devyard login` (http://127.0.0.1:PORT/… or http://localhost:PORT/…) to send a one-time code to; without it the token is shown on a page' }),
  cli_challenge: z
    .string()
    .max(128)
    .optional()
    .meta({ description: "with `cli`: base64url SHA-256 of the CLI's own verifier (PKCE S256, RFC 7636); the code sent to the loopback URL is only redeemed with that verifier" }),
});

/** `devyard login` redeems the one-time code its loopback listener received. */
export const OidcRedeemRequestSchema = z
  .object({
    code: z.string().min(1).max(256),
    verifier: z.string().min(43).max(128).meta({ description: 'the PKCE verifier whose S256 challenge started the sign-in' }),
  })
  .strict();

export const OidcLoginTokenSchema = z
  .object({
    token: z.string().meta({ description: 'login token (`dy_u_…`), shown once' }),
    user: z.string(),
    expiresAt: z.string().meta({ description: 'ISO 8601' }),
  })
  .meta({ id: 'OidcLoginToken' });

export type OidcLoginToken = z.infer<typeof OidcLoginTokenSchema>;

/** The provider's authorization response (RFC 6749 §4.1.2; `iss` per RFC 9207). */
export const OidcCallbackQuerySchema = z.object({
  code: z.string().max(4096).optional(),
  state: z.string().max(512).optional(),
  iss: z.string().max(2048).optional(),
  error: z.string().max(256).optional(),
  error_description: z.string().max(2048).optional(),
});
