/**
 * Schemas of the access API: users' SSH keys, box port visibility, gateway access tokens and a box's
 * connection details (its SSH host identity and where the gateway listens).
 */
import { z } from 'zod';
import { NameSchema, TimestampSchema } from './common-schemas.js';
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

/** The `ssh-keygen -Y sign -n` namespace of the proof that a registered key is held by its registrant. */
export const SSH_KEY_PROOF_NAMESPACE = 'devyard-ssh-key';

export const SshKeyChallengeSchema = z
  .object({
    challenge: z.string().meta({ description: 'sign it with the key: `ssh-keygen -Y sign -n devyard-ssh-key -f KEY` (stdin: the challenge)' }),
    namespace: z.literal(SSH_KEY_PROOF_NAMESPACE),
    expiresAt: TimestampSchema,
  })
  .meta({ id: 'SshKeyChallenge' });

export const AddSshKeyRequestSchema = z
  .object({
    publicKey: multilineText(16_384, 1).meta({ description: 'one OpenSSH public key line (the content of `~/.ssh/id_ed25519.pub`)' }),
    name: inlineText(100).optional().meta({ description: 'label; defaults to the key comment' }),
    challenge: inlineText(1024, 1).meta({ description: 'from `POST /v1/users/me/keys/challenge`, at most 5 minutes old' }),
    signature: multilineText(16_384, 1).meta({ description: 'the challenge signed with the key: the armored output of `ssh-keygen -Y sign -n devyard-ssh-key`' }),
  })
  .strict();

export type SshKey = z.infer<typeof SshKeySchema>;
export type AddSshKeyRequest = z.infer<typeof AddSshKeyRequestSchema>;
export type SshKeyChallenge = z.infer<typeof SshKeyChallengeSchema>;

export const PortVisibilitySchema = z
  .enum(['private', 'org'])
  .meta({ description: 'private: only users who may connect to the box; org: every signed-in user of the organization' });

export const BoxPortSchema = z
  .object({ port: z.number().int(), visibility: PortVisibilitySchema, previewUrl: z.string().nullable().meta({ description: "the preview's own host; null when no gateway with a preview domain runs" }) })
  .meta({ id: 'BoxPort' });
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

export const SignInRequestSchema = z
  .object({
    box: NameSchema.meta({ description: 'the box, as the user addresses it in the browser' }),
    port: z.number().int().min(1).max(65535).optional().meta({ description: "the port whose preview to open; without it, the box's terminal" }),
  })
  .strict()
  .meta({ id: 'SignInRequest' });

export const CreateAccessTokenRequestSchema = z
  .object({
    ttlSeconds: z.number().int().min(30).max(12 * 3600).default(600).meta({ description: 'lifetime; at most 12 hours (not for sign-in links)' }),
    signIn: SignInRequestSchema.optional().meta({
      description:
        "a browser sign-in link's token instead of a bearer token: for the terminal of a box (the caller must be allowed to connect to it) or the preview of one of its ports; valid for 60 seconds and one use, it becomes a browser session that opens only that",
    }),
  })
  .strict();

export type SignInRequest = z.infer<typeof SignInRequestSchema>;

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
