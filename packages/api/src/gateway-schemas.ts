/**
 * What a gateway exchanges with the server: one `sync` call registers the gateway, reports session
 * activity and returns the route table the gateway caches, so it keeps serving (for tokens still
 * valid) while the server is down.
 */
import { z } from 'zod';
import { PortVisibilitySchema } from './access-schemas.js';
import { DesiredStateSchema, PhaseSchema } from './box-schemas.js';
import { httpBaseUrl, inlineText } from './input-schemas.js';

export const BoxActivitySchema = z.object({
  boxId: inlineText(128),
  lastActiveAt: z.number().int().meta({ description: 'ms since epoch of the last byte through a session' }),
  sessions: z.number().int().min(0).meta({ description: 'sessions open on this gateway now' }),
});

export const GatewaySyncRequestSchema = z
  .object({
    gatewayId: inlineText(100),
    endpoint: z
      .object({
        url: httpBaseUrl().meta({ description: 'HTTP(S) base URL of the browser front door' }),
        sshHost: inlineText(253, 0),
        sshPort: z.number().int().min(0).max(65_535).meta({ description: '0 while the SSH port is not bound yet' }),
        previewDomain: inlineText(253, 0).nullable(),
      })
      .strict(),
    activity: z.array(BoxActivitySchema).max(100_000).default([]),
  })
  .strict();

export const RouteBoxSchema = z.object({
  id: z.string(),
  name: z.string(),
  owner: z.string(),
  /** Organization of the box. */
  orgId: z.string(),
  /** Teams the box is shared with (by team id). */
  shares: z.array(z.object({ teamId: z.string(), access: z.enum(['connect', 'manage']) })),
  phase: PhaseSchema,
  desiredState: DesiredStateSchema,
  /** Base URL of the box's node agent (http://…), null while unscheduled. */
  agentUrl: z.string().nullable(),
  /** Session token for the agent, signed with the node's key, null while unscheduled. */
  agentToken: z.string().nullable(),
  /** OpenSSH private host key of the box (its own SSH identity). */
  hostKey: z.string(),
  ports: z.array(z.object({ port: z.number().int(), visibility: PortVisibilitySchema })),
});

export const RouteTableSchema = z
  .object({
    generatedAt: z.number().int(),
    /** The agent tokens in this table expire then; the gateway must sync before. */
    expiresAt: z.number().int(),
    /** PEM (SPKI) Ed25519 key that verifies access tokens. */
    accessTokenKey: z.string(),
    /** OpenSSH private host key every gateway presents on its SSH port. */
    gatewayHostKey: z.string(),
    boxes: z.array(RouteBoxSchema),
    /** Users with their SSH keys and their memberships (role and team ids per organization). */
    users: z.array(
      z.object({
        subject: z.string(),
        keys: z.array(z.string()),
        memberships: z.array(z.object({ orgId: z.string(), role: z.enum(['owner', 'admin', 'template-admin', 'auditor', 'member']), teamIds: z.array(z.string()) })),
      }),
    ),
  })
  .meta({ id: 'RouteTable' });

export const WakeBoxRequestSchema = z.object({ subject: inlineText(200) }).strict();

export const RedeemSignInRequestSchema = z.object({ token: z.string().min(1).max(8192).meta({ description: "the token of a browser sign-in link, as the browser brought it" }) }).strict();

export const BrowserSessionSchema = z
  .object({
    token: z.string().meta({ description: 'session token for the browser cookie: same user and scope as the link, valid for hours' }),
    expiresAt: z.number().int().meta({ description: 'ms since epoch' }),
  })
  .meta({ id: 'BrowserSession' });

export type BrowserSession = z.infer<typeof BrowserSessionSchema>;

export type GatewaySyncRequest = z.infer<typeof GatewaySyncRequestSchema>;
export type RouteBox = z.infer<typeof RouteBoxSchema>;
export type RouteTable = z.infer<typeof RouteTableSchema>;
export type BoxActivity = z.infer<typeof BoxActivitySchema>;
