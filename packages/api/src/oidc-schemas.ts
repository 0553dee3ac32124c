/** Query parameters of the OIDC sign-in routes (browser redirects; see docs/identity.md). */
import { z } from 'zod';

export const OidcLoginQuerySchema = z.object({
  cli: z
    .string()
    .max(2048)
    .optional()
    .meta({ description: 'loopback URL of a waiting `devyard login` (http://127.0.0.1:PORT/… or http://localhost:PORT/…) to deliver the token to; without it the token is shown on a page' }),
});

/** The provider's authorization response (RFC 6749 §4.1.2; `iss` per RFC 9207). */
export const OidcCallbackQuerySchema = z.object({
  code: z.string().max(4096).optional(),
  state: z.string().max(512).optional(),
  iss: z.string().max(2048).optional(),
  error: z.string().max(256).optional(),
  error_description: z.string().max(2048).optional(),
});
