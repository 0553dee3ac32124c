import { z } from 'zod';
import { DESIRED_STATES, PHASES } from '@devyard/core/box-lifecycle';
import { NameSchema, ResourcesInputSchema, ResourcesSchema, TimestampSchema } from './common-schemas.js';
import { RuntimeSchema } from './template-schemas.js';
import { EnvSchema, decimalInteger, inlineText } from './input-schemas.js';

export const DesiredStateSchema = z.enum(DESIRED_STATES).meta({ id: 'DesiredState' });
export const PhaseSchema = z.enum(PHASES).meta({ id: 'Phase' });

export const CreateBoxRequestSchema = z
  .object({
    name: NameSchema,
    template: NameSchema,
    templateVersion: z.number().int().positive().optional().meta({ description: 'default: the latest version' }),
    runtime: RuntimeSchema.optional().meta({ description: "default: the template's runtime" }),
    resources: ResourcesInputSchema.optional(),
    env: EnvSchema.optional(),
  })
  .strict()
  .meta({ id: 'CreateBoxRequest' });

export const ConditionSchema = z
  .object({
    type: z.string(),
    status: z.enum(['True', 'False', 'Unknown']),
    reason: z.string(),
    message: z.string(),
    lastTransitionTime: TimestampSchema,
  })
  .meta({ id: 'Condition' });

export const BoxSchema = z
  .object({
    id: z.string(),
    name: z.string(),
    owner: z.string(),
    template: z.string(),
    templateVersion: z.number().int(),
    image: z.string(),
    runtime: RuntimeSchema,
    desiredState: DesiredStateSchema,
    phase: PhaseSchema,
    generation: z.number().int(),
    observedGeneration: z.number().int(),
    node: z.string().nullable().meta({ description: 'name of the node the box is bound to' }),
    resources: ResourcesSchema,
    ip: z.string().nullable(),
    conditions: z.array(ConditionSchema),
    lastError: z.string().nullable().meta({ description: 'why the last operation failed, as the user should read it' }),
    pause: z
      .object({ keepsMemory: z.boolean(), description: z.string() })
      .meta({ description: 'what pause keeps for this runtime, and where' }),
    createdAt: TimestampSchema,
    updatedAt: TimestampSchema,
    version: z.number().int().meta({ description: 'changes on every update; the ETag' }),
    forkOf: z
      .string()
      .optional()
      .meta({ description: "name of the box this one was forked from (its owner may differ: a fork belongs to whoever forked it); absent for boxes that are not forks" }),
    movingFrom: z
      .string()
      .optional()
      .meta({ description: 'name of the node the box is moving from while a move is in flight (its new node is `node`); absent otherwise' }),
  })
  .meta({ id: 'Box' });

/** Most boxes one page of a list holds; a list without `limit` holds BOX_PAGE_DEFAULT. */
export const BOX_PAGE_MAX = 500;
export const BOX_PAGE_DEFAULT = 100;

/** An opaque position in a box list, as the server handed it out in `nextPageToken`. */
export const PageTokenSchema = z
  .string()
  .regex(/^[A-Za-z0-9_-]{1,200}$/, 'must be a nextPageToken this server returned')
  .meta({ description: 'the nextPageToken of the previous page' });

export const ListBoxesQuerySchema = z.object({
  watch: z.enum(['0', '1', 'true', 'false']).optional().meta({ description: '1: stream changes as Server-Sent Events (every visible box first, then each change)' }),
  limit: decimalInteger(1, BOX_PAGE_MAX).optional().meta({ description: `boxes per page, 1–${BOX_PAGE_MAX} (default ${BOX_PAGE_DEFAULT})` }),
  pageToken: PageTokenSchema.optional(),
});

export type ListBoxesQuery = z.output<typeof ListBoxesQuerySchema>;

export const BoxListSchema = z
  .object({
    items: z.array(BoxSchema),
    nextPageToken: z.string().optional().meta({ description: 'where the next page starts (pass it as ?pageToken=); absent on the last page' }),
  })
  .meta({ id: 'BoxList' });

/** Most boxes one fork request may create: every clone holds the source's memory on the same node. */
export const MAX_FORK_COUNT = 16;

export const ForkBoxRequestSchema = z
  .object({
    name: NameSchema.meta({ description: 'name of the new box; with count > 1 the boxes are NAME-1 … NAME-N' }),
    count: z.number().int().min(1).max(MAX_FORK_COUNT).default(1).meta({ description: `how many clones (1–${MAX_FORK_COUNT}); all are created or none` }),
  })
  .strict()
  .meta({ id: 'ForkBoxRequest' });

export const ForkBoxResponseSchema = z
  .object({ boxes: z.array(BoxSchema).meta({ description: 'the new boxes, in name order' }) })
  .meta({ id: 'ForkBoxResponse' });

export const MoveBoxRequestSchema = z
  .object({
    node: inlineText(63)
      .optional()
      .meta({ description: "the node to move the box to; absent: the scheduler picks one (never the box's current node)" }),
  })
  .strict()
  .meta({ id: 'MoveBoxRequest' });

export const BoxEventSchema = z
  .object({
    id: z.number().int(),
    boxId: z.string(),
    boxName: z.string(),
    time: TimestampSchema,
    type: z.string().meta({ description: 'e.g. Created, Scheduled, PhaseChanged, Failed, Deleted' }),
    phase: PhaseSchema.nullable(),
    message: z.string(),
  })
  .meta({ id: 'BoxEvent' });

export const BoxEventListSchema = z.object({ items: z.array(BoxEventSchema) }).meta({ id: 'BoxEventList' });

export const ExecSessionRequestSchema = z
  .object({ tty: z.boolean().default(false) })
  .strict()
  .meta({ id: 'ExecSessionRequest' });

export const ExecSessionSchema = z
  .object({
    url: z.string().meta({ description: 'WebSocket URL on the node agent that runs the box' }),
    token: z.string().meta({ description: 'short-lived signed token authorizing this session' }),
    expiresAt: TimestampSchema,
  })
  .meta({ id: 'ExecSession' });

export type CreateBoxRequest = z.infer<typeof CreateBoxRequestSchema>;
/** What a client sends (count optional); the server sees it with the default applied. */
export type ForkBoxRequest = z.input<typeof ForkBoxRequestSchema>;
export type ForkBoxResponse = z.infer<typeof ForkBoxResponseSchema>;
export type MoveBoxRequest = z.infer<typeof MoveBoxRequestSchema>;
export type Box = z.infer<typeof BoxSchema>;
export type BoxList = z.infer<typeof BoxListSchema>;
export type BoxEvent = z.infer<typeof BoxEventSchema>;
export type ExecSession = z.infer<typeof ExecSessionSchema>;
