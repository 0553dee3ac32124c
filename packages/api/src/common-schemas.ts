/** Schemas shared by several resources. zod schemas here are the single source of the API. */
import { z } from 'zod';
import { inlineText } from './input-schemas.js';

/** A DNS label: boxes and templates become hostnames and URL parts. */
export const NameSchema = z
  .string()
  .min(1)
  .max(40)
  .regex(/^[a-z]([a-z0-9-]*[a-z0-9])?$/, 'must be lowercase letters, digits and dashes, start with a letter and not end with a dash')
  .meta({ description: 'lowercase DNS label, 1–40 characters', example: 'demo' });

export const ResourcesSchema = z
  .object({
    cpuMillis: z.number().int().nonnegative().meta({ description: 'CPU in millicores (1000 = one core)' }),
    memoryBytes: z.number().int().nonnegative(),
    diskBytes: z.number().int().nonnegative(),
  })
  .meta({ id: 'Resources' });

/** What users type: cores or millicores, sizes with units. */
export const ResourcesInputSchema = z
  .object({
    cpu: z.union([z.number().positive(), inlineText(32)]).optional().meta({ description: 'cores (2, 0.5) or millicores ("500m")' }),
    memory: inlineText(32).optional().meta({ description: 'e.g. "1GiB", "512MiB"' }),
    disk: inlineText(32).optional().meta({ description: 'e.g. "10GiB"' }),
  })
  .strict()
  .meta({ id: 'ResourcesInput' });

/** Most validation errors one problem lists: enough to fix a request, not a way to amplify one. */
export const MAX_REPORTED_ERRORS = 20;

export const ProblemSchema = z
  .object({
    type: z.string(),
    title: z.string(),
    status: z.number().int(),
    detail: z.string(),
    code: z.string().meta({ description: 'stable machine-readable error code' }),
    instance: z.string().optional(),
    errors: z
      .array(z.object({ field: z.string(), message: z.string() }))
      .optional()
      .meta({ description: `what was wrong, field by field: the first ${MAX_REPORTED_ERRORS} (errorsOmitted counts the rest)` }),
    errorsOmitted: z.number().int().optional().meta({ description: 'how many more errors were found than are listed' }),
  })
  .passthrough()
  .meta({ id: 'Problem', description: 'RFC 9457 problem details' });

export const TimestampSchema = z.string().meta({ description: 'RFC 3339 timestamp' });
