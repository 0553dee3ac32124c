import { z } from 'zod';
import { NameSchema, ResourcesInputSchema, ResourcesSchema, TimestampSchema } from './common-schemas.js';
import { parseDuration } from './duration-format.js';
import { EnvSchema, inlineText, isInlineText, multilineText } from './input-schemas.js';

export const RuntimeSchema = z.enum(['sandbox', 'microvm', 'sim']).meta({ id: 'Runtime' });

/** Images the agent builds itself; every other image comes from a registry. */
export const BUILTIN_IMAGES = ['tiny', 'base'] as const;

/** The parts of an OCI image reference; tag and digest may both be present (the digest wins). */
export interface OciReference {
  /** Registry host with an optional port, e.g. `ghcr.io` or `localhost:5000`. */
  registry: string;
  /** Repository path inside the registry, e.g. `library/debian`. */
  repository: string;
  /** Tag, when the reference names one; a reference with neither tag nor digest means `latest`. */
  tag?: string;
  /** `sha256:<64 hex>`, when the reference is already pinned. */
  digest?: string;
}

// The distribution spec's grammar, minus IPv6 hosts and non-sha256 digests, which no registry we
// target needs and which would make the error messages vaguer.
const DOMAIN_COMPONENT = '(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])';
const HOST = `${DOMAIN_COMPONENT}(?:\\.${DOMAIN_COMPONENT})*(?::[0-9]{1,5})?`;
const PATH_COMPONENT = '[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*';
const OCI_REFERENCE = new RegExp(
  `^(${HOST})/(${PATH_COMPONENT}(?:/${PATH_COMPONENT})*)(?::([A-Za-z0-9_][A-Za-z0-9_.-]{0,127}))?(?:@(sha256:[a-f0-9]{64}))?$`,
);

export const DIGEST_PATTERN = /^sha256:[a-f0-9]{64}$/;

/**
 * Parses `host[:port]/repo[:tag][@sha256:…]`. The host must be explicit (contain a dot or a port, or
 * be `localhost`): Docker's implicit `docker.io/library/` expansion would make "ubuntu" silently mean
 * a particular registry, and a typo of a built-in image name would become a pull.
 */
export function parseOciReference(ref: string): OciReference | undefined {
  if (ref.length > 512) return undefined;
  const m = OCI_REFERENCE.exec(ref);
  if (!m) return undefined;
  const registry = m[1]!;
  if (!registry.includes('.') && !registry.includes(':') && registry !== 'localhost') return undefined;
  return { registry, repository: m[2]!, ...(m[3] ? { tag: m[3] } : {}), ...(m[4] ? { digest: m[4] } : {}) };
}

export function isBuiltinImage(image: string): boolean {
  return (BUILTIN_IMAGES as readonly string[]).includes(image);
}

/** A built-in image name or an OCI reference with an explicit registry host. */
export const ImageRefSchema = z
  .string()
  .max(512)
  .refine((v) => isBuiltinImage(v) || parseOciReference(v) !== undefined, {
    error: 'must be a built-in image (tiny, base) or an OCI reference with a registry host, e.g. ghcr.io/org/image:tag or docker.io/library/debian@sha256:<hex>',
  })
  .meta({ description: 'built-in image (tiny: busybox, base: Debian bookworm) or an OCI reference host[:port]/repo[:tag|@sha256:…]', example: 'ghcr.io/acme/dev:1.4' });

/** Debian package names (policy §5.6.1), optionally pinned to a version with `=`. */
const DebianPackageSchema = z
  .string()
  .max(256)
  .regex(/^[a-z0-9][a-z0-9+.-]+(=[A-Za-z0-9.+~:-]+)?$/, 'must be a Debian package name (lowercase letters, digits, + - .), optionally name=version');

export const BuildRecipeSchema = z
  .object({
    from: ImageRefSchema,
    packages: z.array(DebianPackageSchema).max(500).optional().meta({ description: 'installed with apt-get install --no-install-recommends' }),
    run: z.array(multilineText(10_000, 1)).max(100).optional().meta({ description: 'shell commands run in order, as root, after the packages' }),
  })
  .strict()
  .meta({ id: 'BuildRecipe', description: 'an image built from a base image, Debian packages and shell commands' });

const ShellOrExecSchema = z.union([multilineText(10_000, 1), z.array(multilineText(10_000)).min(1).max(1000)]);

/** As in the devcontainer spec: one shell string, one exec array, or named commands run in parallel. */
export const LifecycleCommandSchema = z
  .union([
    ShellOrExecSchema,
    z
      .record(z.string().regex(/^[A-Za-z0-9_.-]{1,64}$/, 'command names are letters, digits, _ . -'), ShellOrExecSchema)
      .refine((o) => Object.keys(o).length > 0, 'must name at least one command'),
  ], { error: 'must be a shell command string, an exec array of strings, or an object of named commands' })
  .meta({ id: 'LifecycleCommand' });

export const LifecycleHooksSchema = z
  .object({
    onCreate: LifecycleCommandSchema.optional().meta({ description: 'once, when the box is first created' }),
    updateContent: LifecycleCommandSchema.optional().meta({ description: 'after onCreate, and whenever the repository content is refreshed' }),
    postCreate: LifecycleCommandSchema.optional().meta({ description: 'once, after the box is created and the content is in place' }),
    postStart: LifecycleCommandSchema.optional().meta({ description: 'on every start' }),
  })
  .strict()
  .meta({ id: 'LifecycleHooks' });

export const RepositorySchema = z
  .object({
    url: z
      .string()
      .max(2000)
      .regex(/^(?:(?:https?|ssh|git):\/\/[^\s/]+\/\S+|[\w.-]+@[\w.-]+:\S+)$/, 'must be an https://, ssh:// or git:// URL, or git@host:path')
      .refine(isInlineText, 'must not contain control characters or bidirectional overrides'),
    ref: z
      .string()
      .max(255)
      .regex(/^(?!-)(?!.*\.\.)[^\s~^:?*[\\]+$/, 'must be a branch, tag or commit')
      .refine(isInlineText, 'must be a branch, tag or commit')
      .optional(),
    credentialsSecret: NameSchema.optional().meta({ description: 'name of the secret holding the clone credentials' }),
  })
  .strict()
  .meta({ id: 'Repository' });

const PortNumberSchema = z.number().int().min(1).max(65_535);

export const PortSchema = z
  .union([PortNumberSchema, z.object({ port: PortNumberSchema, label: inlineText(100).optional() }).strict()], {
    error: 'must be a port number (1–65535) or { port, label }',
  })
  .meta({ id: 'PortInput' });

export const TemplateResourcesInputSchema = ResourcesInputSchema.extend({
  gpu: z.number().int().min(0).max(16).optional().meta({ description: 'whole GPUs' }),
}).meta({ id: 'TemplateResourcesInput' });

const DurationSchema = z
  .string()
  .max(32)
  .refine((v) => parseDuration(v) !== undefined, { error: 'must be a duration such as "30m", "8h", "1h30m" or "2d"' });

/** Everything a template version says, as published. */
export const CreateTemplateRequestSchema = z
  .object({
    name: NameSchema,
    description: multilineText(500).optional(),
    image: ImageRefSchema.optional(),
    build: BuildRecipeSchema.optional(),
    runtime: RuntimeSchema.default('sandbox'),
    defaultResources: TemplateResourcesInputSchema.optional(),
    maxResources: TemplateResourcesInputSchema.optional(),
    repository: RepositorySchema.optional(),
    hooks: LifecycleHooksSchema.optional(),
    env: EnvSchema.optional(),
    user: z
      .string()
      .regex(/^[a-z_][a-z0-9_-]{0,31}$/, 'must be a Linux user name')
      .optional()
      .meta({ description: 'user that hooks and sessions run as' }),
    ports: z
      .array(PortSchema)
      .max(100)
      .refine((ps) => new Set(ps.map((p) => (typeof p === 'number' ? p : p.port))).size === ps.length, 'ports must not repeat')
      .optional()
      .meta({ description: 'ports forwarded from the box' }),
    idleTimeout: DurationSchema.optional().meta({ description: 'stop the box after this long without activity' }),
    maxLifetime: DurationSchema.optional().meta({ description: 'stop the box this long after it started' }),
    warmPoolSize: z.number().int().min(0).max(100).optional().meta({ description: 'boxes kept created and ready to hand out' }),
  })
  .strict()
  .superRefine((t, ctx) => {
    if ((t.image === undefined) === (t.build === undefined)) {
      ctx.addIssue({ code: 'custom', path: [t.image === undefined ? 'image' : 'build'], message: 'a template needs exactly one of image or build' });
    }
  })
  .meta({ id: 'CreateTemplateRequest' });

export const TemplateResourcesSchema = ResourcesSchema.extend({ gpu: z.number().int().nonnegative() }).meta({ id: 'TemplateResources' });

export const TemplateSchema = z
  .object({
    name: z.string(),
    version: z.number().int().positive(),
    description: z.string(),
    image: z.string().meta({ description: 'the image as published; for a build recipe, its base image' }),
    imageDigest: z
      .string()
      .nullable()
      .meta({ description: 'manifest digest the image (or build.from) was pinned to at publish time; null for built-in images and unpinned references' }),
    build: BuildRecipeSchema.nullable(),
    runtime: RuntimeSchema,
    defaultResources: TemplateResourcesSchema,
    maxResources: TemplateResourcesSchema,
    repository: RepositorySchema.nullable(),
    hooks: LifecycleHooksSchema,
    env: z.record(z.string(), z.string()),
    user: z.string().nullable(),
    ports: z.array(z.object({ port: z.number().int(), label: z.string().nullable() })),
    idleTimeout: z.string().nullable(),
    maxLifetime: z.string().nullable(),
    warmPoolSize: z.number().int().nonnegative(),
    createdAt: TimestampSchema,
  })
  .meta({ id: 'Template', description: 'an immutable template version' });

export const TemplateListSchema = z.object({ items: z.array(TemplateSchema) }).meta({ id: 'TemplateList' });

export type CreateTemplateRequest = z.infer<typeof CreateTemplateRequestSchema>;
/** What a client may send: fields with defaults (runtime) may be left out. */
export type CreateTemplateInput = z.input<typeof CreateTemplateRequestSchema>;
/** The spec stored with every template version: the validated request. */
export type TemplateSpec = CreateTemplateRequest;
export type LifecycleCommand = z.infer<typeof LifecycleCommandSchema>;
export type BuildRecipe = z.infer<typeof BuildRecipeSchema>;
export type Template = z.infer<typeof TemplateSchema>;

/** A prebuild of a template version on a node: the repository at a commit with onCreate/updateContent run. */
export const PrebuildSchema = z
  .object({
    id: z.string(),
    template: z.string(),
    templateVersion: z.number().int(),
    node: z.string(),
    commit: z.string(),
    status: z.enum(['ready', 'failed']),
    error: z.string().nullable(),
    logTail: z.array(z.string()),
    finishedAt: z.string(),
  })
  .meta({ id: 'Prebuild' });

export const PrebuildListSchema = z.object({ items: z.array(PrebuildSchema) }).meta({ id: 'PrebuildList' });

export type Prebuild = z.infer<typeof PrebuildSchema>;
