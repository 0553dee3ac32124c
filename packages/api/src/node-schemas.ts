import { z } from 'zod';
import { ResourcesSchema, TimestampSchema } from './common-schemas.js';
import { DesiredStateSchema, PhaseSchema } from './box-schemas.js';
import { BoxSecretSchema } from './secret-schemas.js';
import { httpBaseUrl, inlineText, LabelsSchema, reportedText } from './input-schemas.js';

export const NodeSchema = z
  .object({
    id: z.string(),
    name: z.string(),
    status: z.enum(['ready', 'not-ready']),
    cordoned: z.boolean(),
    runtimes: z.array(z.string()),
    arch: z.string(),
    region: z.string().nullable(),
    labels: z.record(z.string(), z.string()),
    capacity: ResourcesSchema,
    allocated: ResourcesSchema,
    images: z.array(z.string()),
    leaseExpiresAt: TimestampSchema,
    agentUrl: z.string(),
    boxes: z.number().int(),
  })
  .meta({ id: 'Node' });

export const NodeListSchema = z.object({ items: z.array(NodeSchema) }).meta({ id: 'NodeList' });

/** Most image names and digests one node reports (every image it holds appears twice: name and digest). */
export const MAX_NODE_IMAGES = 10_000;

/** What a node holds: image names and digests as the agent lists them. */
const NodeImagesSchema = z.array(inlineText(512, 0)).max(MAX_NODE_IMAGES);

/** Sent by an agent when it starts: what the node offers. */
export const RegisterNodeRequestSchema = z
  .object({
    name: inlineText(63),
    arch: inlineText(32),
    region: inlineText(63).nullable().default(null),
    labels: LabelsSchema.default({}),
    runtimes: z.array(inlineText(32)).min(1).max(16),
    capacity: ResourcesSchema,
    images: NodeImagesSchema.default([]),
    agentUrl: httpBaseUrl().meta({ description: 'http(s) base URL where gateways and the CLI reach the agent for sessions (no credentials, query or fragment)' }),
  })
  .strict()
  .meta({ id: 'RegisterNodeRequest' });

export const RegisterNodeResponseSchema = z
  .object({
    nodeId: z.string(),
    leaseSeconds: z.number().int(),
    sessionKey: z.string().meta({ description: 'key the agent verifies session tokens with (HMAC-SHA256)' }),
    credential: z
      .string()
      .nullable()
      .meta({ description: "this node's own token, given once when the node is first registered: every later call of the node (heartbeat, desired set, reports, re-registration) uses it; null on a re-registration" }),
  })
  .meta({ id: 'RegisterNodeResponse' });

export const HeartbeatRequestSchema = z
  .object({ images: NodeImagesSchema.optional() })
  .strict()
  .meta({ id: 'HeartbeatRequest' });

/** A devcontainer-style lifecycle command: shell string, exec array, or named parallel commands. */
export const LifecycleCommandSchema = z.union([z.string(), z.array(z.string()).min(1), z.record(z.string(), z.union([z.string(), z.array(z.string()).min(1)]))]);

/** The one-time and per-start setup of a box, from its template. */
export const BoxSetupSchema = z
  .object({
    repository: z
      .object({ url: z.string(), ref: z.string().nullable(), credentialsSecret: z.string().nullable().default(null) })
      .nullable()
      .default(null),
    onCreate: LifecycleCommandSchema.nullable().default(null),
    updateContent: LifecycleCommandSchema.nullable().default(null),
    postCreate: LifecycleCommandSchema.nullable().default(null),
    postStart: LifecycleCommandSchema.nullable().default(null),
    /** Image recipe: `image` (the pinned base) plus Debian packages and commands, built once per node. */
    build: z.object({ packages: z.array(z.string()).default([]), run: z.array(z.string()).default([]) }).nullable().default(null),
    /** Build the repository + onCreate + updateContent once per commit and clone boxes from it. */
    prebuild: z.boolean().default(false),
    /** The template's own environment: the only one a prebuild sees (never user secrets). */
    templateEnv: z.record(z.string(), z.string()).default({}),
  })
  .meta({ id: 'BoxSetup' });

/** One box as the agent must run it. */
export const DesiredBoxSchema = z
  .object({
    boxId: z.string(),
    name: z.string(),
    desiredState: DesiredStateSchema,
    generation: z.number().int(),
    operationId: z.string(),
    image: z.string(),
    runtime: z.string(),
    resources: ResourcesSchema,
    env: z.record(z.string(), z.string()),
    setup: BoxSetupSchema.default(BoxSetupSchema.parse({})),
    /** The template version the box was created from (prebuilds are recorded against it). */
    templateName: z.string().default(''),
    templateVersion: z.number().int().default(0),
    /** Kept ready in a warm pool: postCreate waits until a user claims the box. */
    pooled: z.boolean().default(false),
    /**
     * Decrypted secrets of the box (org, template, the owner's teams and user; the narrower scope
     * wins a name clash), only while it should run or be paused. The agent keeps them in memory
     * and on tmpfs, never in its state file.
     */
    secrets: z.array(BoxSecretSchema).default([]),
    /**
     * Id of the box this one is a fork of (same node, runtime microvm), or null. The agent creates
     * the box by cloning that box's RAM and disk instead of booting from the image; once the box
     * exists on the node the field changes nothing (it stays set for the box's whole life).
     */
    forkOf: z.string().nullable().default(null),
    /**
     * Set while the box moves to this node (a paused microvm box; desiredState paused): the agent
     * of the node the box was paused on serves its RAM snapshot and disks at `agentUrl`, and
     * `token` is a session token for the box signed with that node's key (subject
     * `node:<this node's id>`, valid 15 minutes; every desired set carries a fresh one). The agent
     * pulls them from there instead of booting from the image (this takes precedence over
     * `forkOf`) and reports `paused` once the box is complete here, or an error when the import
     * failed (the box then goes back to its old node). Null otherwise.
     */
    restoreFrom: z.object({ agentUrl: z.string(), token: z.string() }).nullable().default(null),
  })
  .meta({ id: 'DesiredBox' });

/** A template version whose prebuild a node keeps current (rebuilt when the tracked ref moves). */
export const DesiredPrebuildSchema = z
  .object({
    templateName: z.string(),
    templateVersion: z.number().int(),
    image: z.string(),
    setup: BoxSetupSchema,
  })
  .meta({ id: 'DesiredPrebuild' });

export const DesiredSetSchema = z
  .object({
    nodeId: z.string(),
    revision: z.number().int(),
    boxes: z.array(DesiredBoxSchema),
    prebuilds: z.array(DesiredPrebuildSchema).default([]),
  })
  .meta({ id: 'DesiredSet', description: 'the full set of boxes a node must run (level-triggered)' });

export const BoxStatusReportSchema = z
  .object({
    boxId: inlineText(128),
    phase: PhaseSchema,
    observedGeneration: z.number().int(),
    operationId: inlineText(200),
    ip: inlineText(64, 0).nullable().default(null),
    error: reportedText(8000).nullable().default(null).meta({ description: 'set when the operation failed' }),
    message: reportedText(8000).default(''),
  })
  .strict()
  .meta({ id: 'BoxStatusReport' });

/** A prebuild a node finished (or failed) building. */
export const PrebuildReportSchema = z
  .object({
    prebuildId: inlineText(128),
    templateName: inlineText(63),
    templateVersion: z.number().int(),
    commit: inlineText(64, 0),
    status: z.enum(['ready', 'failed']),
    error: reportedText(8000).nullable().default(null),
    logTail: z.array(reportedText(2000)).max(200).default([]),
  })
  .strict()
  .meta({ id: 'PrebuildReport' });

export const StatusReportRequestSchema = z
  .object({ reports: z.array(BoxStatusReportSchema).max(1000), prebuilds: z.array(PrebuildReportSchema).max(100).default([]) })
  .strict()
  .meta({ id: 'StatusReportRequest' });

export type Node = z.infer<typeof NodeSchema>;
export type RegisterNodeRequest = z.infer<typeof RegisterNodeRequestSchema>;
export type RegisterNodeResponse = z.infer<typeof RegisterNodeResponseSchema>;
export type DesiredBox = z.infer<typeof DesiredBoxSchema>;
export type BoxSetup = z.infer<typeof BoxSetupSchema>;
export type LifecycleCommand = z.infer<typeof LifecycleCommandSchema>;
export type DesiredSet = z.infer<typeof DesiredSetSchema>;
export type BoxStatusReport = z.infer<typeof BoxStatusReportSchema>;
export type PrebuildReport = z.infer<typeof PrebuildReportSchema>;
export type DesiredPrebuild = z.infer<typeof DesiredPrebuildSchema>;
