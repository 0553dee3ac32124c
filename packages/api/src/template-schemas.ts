import { z } from 'zod';
import { NameSchema, ResourcesInputSchema, ResourcesSchema, TimestampSchema } from './common-schemas.js';

export const RuntimeSchema = z.enum(['sandbox', 'microvm', 'sim']).meta({ id: 'Runtime' });

/** Built-in images of this release; OCI references come with registry support. */
export const ImageRefSchema = z.enum(['tiny', 'base']).meta({ description: 'built-in image: tiny (busybox) or base (Debian bookworm)' });

export const CreateTemplateRequestSchema = z
  .object({
    name: NameSchema,
    description: z.string().max(500).optional(),
    image: ImageRefSchema,
    runtime: RuntimeSchema.default('sandbox'),
    defaultResources: ResourcesInputSchema.optional(),
    maxResources: ResourcesInputSchema.optional(),
    env: z.record(z.string().regex(/^[A-Za-z_][A-Za-z0-9_]*$/), z.string()).optional(),
  })
  .strict()
  .meta({ id: 'CreateTemplateRequest' });

export const TemplateSchema = z
  .object({
    name: z.string(),
    version: z.number().int().positive(),
    description: z.string(),
    image: z.string(),
    runtime: RuntimeSchema,
    defaultResources: ResourcesSchema,
    maxResources: ResourcesSchema,
    env: z.record(z.string(), z.string()),
    createdAt: TimestampSchema,
  })
  .meta({ id: 'Template', description: 'an immutable template version' });

export const TemplateListSchema = z.object({ items: z.array(TemplateSchema) }).meta({ id: 'TemplateList' });

export type CreateTemplateRequest = z.infer<typeof CreateTemplateRequestSchema>;
export type Template = z.infer<typeof TemplateSchema>;
