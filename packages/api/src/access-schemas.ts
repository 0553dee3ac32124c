/**
 * Schemas of the access API: users' SSH keys, box port visibility, gateway access tokens and a box's
 * connection details (its SSH host identity and where the gateway listens).
 */
import { z } from 'zod';
import { TimestampSchema } from './common-schemas.js';
import { decimalInteger, inlineText, multilineText } from './input-schemas.js';

export const SshKeySchema = z
  .object({
    id: z.string(),
    name: z.string(),
    publicKey: z.string().meta({ description: 'OpenSSH public key line (`ssh-ed25519 AAAA… comment`)' }),
    fingerprint: z.string().meta({ description: 'SHA256 fingerprint as `ssh-keygen -l` prints it' }),
    createdAt: TimestampSchema,
  })
  .meta({ id: 'SshKey' });

export const SshKeyListSchema = z.object({ items: z.array(SshKeySchema) }).meta({ id: 'SshKeyList' });

export const AddSshKeyRequestSchema = z
  .object({
    publicKey: multilineText(16_384, 1).meta({ description: 'one OpenSSH public key line (the content of `~/.ssh/id_ed25519.pub`)' }),
    name: inlineText(100).optional().meta({ description: 'label; defaults to the key comment' }),
  })
  .strict();

export type SshKey = z.infer<typeof SshKeySchema>;
export type AddSshKeyRequest = z.infer<typeof AddSshKeyRequestSchema>;

export const PortVisibilitySchema = z
  .enum(['private', 'org'])
  .meta({ description: 'private: only users who may connect to the box; org: every signed-in user of the organization' });

export const BoxPortSchema = z.object({ port: z.number().int(), visibility: PortVisibilitySchema, previewUrl: z.string().nullable() }).meta({ id: 'BoxPort' });
export const BoxPortListSchema = z.object({ items: z.array(BoxPortSchema) }).meta({ id: 'BoxPortList' });
export const SetBoxPortRequestSchema = z.object({ visibility: PortVisibilitySchema }).strict();
export const PortParamSchema = decimalInteger(1, 65_535);

export type PortVisibility = z.infer<typeof PortVisibilitySchema>;
export type BoxPort = z.infer<typeof BoxPortSchema>;

/** Where a gateway listens, as clients should reach it. */
export const GatewayEndpointSchema = z
  .object({
    url: z.string().meta({ description: 'HTTP(S) base URL of the browser front door' }),
    sshHost: z.string(),
    sshPort: z.number().int(),
    previewDomain: z.string().nullable().meta({ description: 'host form of preview URLs: `<port>--<box>.<previewDomain>`' }),
  })
  .meta({ id: 'GatewayEndpoint' });

export type GatewayEndpoint = z.infer<typeof GatewayEndpointSchema>;

export const CreateAccessTokenRequestSchema = z
  .object({ ttlSeconds: z.number().int().min(30).max(12 * 3600).default(600).meta({ description: 'lifetime; at most 12 hours' }) })
  .strict();

export const AccessTokenSchema = z
  .object({
    token: z.string().meta({ description: 'signed by the server; gateways verify it offline' }),
    expiresAt: TimestampSchema,
    gateway: GatewayEndpointSchema.nullable().meta({ description: 'a gateway seen recently, or null when none is running' }),
  })
  .meta({ id: 'AccessToken' });

export type AccessToken = z.infer<typeof AccessTokenSchema>;

export const BoxConnectionSchema = z
  .object({
    box: z.string(),
    hostKeyAlias: z.string().meta({ description: 'name the box is known by in `known_hosts` and `~/.ssh/config` (`devyard.<box>`)' }),
    hostKey: z.string().meta({ description: "the box's own SSH host public key (OpenSSH line), stable across stop/start and node moves" }),
    gatewayHostKey: z.string().meta({ description: 'host public key gateways present on their SSH port (`ssh -p PORT <box>@HOST`)' }),
    sshUser: z.string(),
    gateway: GatewayEndpointSchema.nullable(),
    lastActivityAt: TimestampSchema.nullable().meta({ description: 'last byte through a gateway session (SSH, terminal, port)' }),
  })
  .meta({ id: 'BoxConnection' });

export type BoxConnection = z.infer<typeof BoxConnectionSchema>;
