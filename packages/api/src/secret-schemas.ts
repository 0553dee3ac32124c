/**
 * Schemas of the secrets API. Values are write-only: a value goes in with `PUT` and comes out only
 * on the node that runs a box (in the agent's desired set), never in an API response.
 *
 * A scope is one path segment: `org`, `user` (the caller's own), `team:<team>` or
 * `template:<template>`. The colon keeps scope and name two flat segments (no nested routes per
 * scope type) and reads the way `devyard secrets list` prints it; `:` is legal in a path segment
 * (RFC 3986 pchar), and `%3A` decodes to the same.
 */
import { z } from 'zod';
import { TimestampSchema } from './common-schemas.js';
import { utf8Length } from './input-schemas.js';

/** Largest value, in UTF-8 bytes. */
export const SECRET_VALUE_MAX_BYTES = 64 * 1024;

/**
 * Names the runtime sets itself or that change how every program in a box loads: a secret with one
 * of them would break the box rather than hold a credential.
 */
export const RESERVED_SECRET_NAMES: readonly string[] = ['PATH', 'HOME', 'HOSTNAME', 'TERM', 'PWD', 'LD_PRELOAD', 'LD_LIBRARY_PATH'];

export const SecretNameSchema = z
  .string()
  .regex(/^[A-Z_][A-Z0-9_]{0,127}$/, 'must be an environment variable name: upper-case letters, digits and underscores, not starting with a digit, at most 128 characters')
  .refine((n) => !RESERVED_SECRET_NAMES.includes(n), { message: `is reserved (${RESERVED_SECRET_NAMES.join(', ')})` })
  .meta({ description: 'environment-variable style name; the file name under /run/devyard/secrets and the variable name in sessions', example: 'NPM_TOKEN' });

const TEAM = '[a-z0-9][a-z0-9-]{0,62}';
const TEMPLATE = '[a-z](?:[a-z0-9-]{0,38}[a-z0-9])?';

export const SecretScopeSchema = z
  .string()
  .regex(new RegExp(`^(?:org|user|team:${TEAM}|template:${TEMPLATE})$`), 'must be org, user, team:<team> or template:<template>')
  .meta({ description: '`org`, `user` (your own), `team:<team>` or `template:<template>`', example: 'team:platform' });

export const SecretParamsSchema = z.object({ scope: SecretScopeSchema, name: SecretNameSchema });

export const PutSecretRequestSchema = z
  .object({
    value: z
      .string()
      .refine((v) => utf8Length(v) <= SECRET_VALUE_MAX_BYTES, { message: `must be at most ${SECRET_VALUE_MAX_BYTES} bytes (UTF-8)` })
      // Values become environment variables, which cannot hold a NUL byte.
      .refine((v) => !v.includes('\0'), { message: 'must not contain a NUL byte' })
      .meta({ description: 'the value (UTF-8 text, at most 64 KiB); never returned by any route' }),
  })
  .strict()
  .meta({ id: 'PutSecretRequest' });

/** What the API says about a secret: never its value. */
export const SecretMetadataSchema = z
  .object({
    name: z.string(),
    scope: z.string().meta({ description: '`org`, `user`, `team:<team>` or `template:<template>`' }),
    version: z.number().int().meta({ description: 'grows by one with every change of the value' }),
    createdBy: z.string(),
    createdAt: TimestampSchema,
    updatedAt: TimestampSchema,
  })
  .meta({ id: 'SecretMetadata' });

export const SecretListSchema = z.object({ items: z.array(SecretMetadataSchema) }).meta({ id: 'SecretList' });

/** A secret as a node receives it for one box: the only place a value leaves the server. */
export const BoxSecretSchema = z.object({ name: z.string(), value: z.string() }).meta({ id: 'BoxSecret' });

export type SecretMetadata = z.infer<typeof SecretMetadataSchema>;
export type PutSecretRequest = z.infer<typeof PutSecretRequestSchema>;
export type BoxSecret = z.infer<typeof BoxSecretSchema>;

/** A parsed scope segment. */
export type SecretScopeRef = { type: 'org' } | { type: 'user' } | { type: 'team'; team: string } | { type: 'template'; template: string };

/** Parses a scope segment already validated by {@link SecretScopeSchema}. */
export function parseSecretScope(s: string): SecretScopeRef {
  if (s === 'org' || s === 'user') return { type: s };
  const i = s.indexOf(':');
  const kind = s.slice(0, i);
  const id = s.slice(i + 1);
  if (kind === 'team') return { type: 'team', team: id };
  if (kind === 'template') return { type: 'template', template: id };
  throw new Error(`invalid secret scope "${s}"`);
}
