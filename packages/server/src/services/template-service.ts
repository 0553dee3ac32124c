/** Templates: immutable versions; publishing a template under an existing name adds a version. */
import { DIGEST_PATTERN, isBuiltinImage, parseOciReference, type CreateTemplateRequest } from '@devyard/api/template-schemas';
import { DomainError } from '@devyard/core/domain-error';
import { DEFAULT_ORG_ID } from './box-service.js';
import { parseBytes, parseCpu, type Resources } from '@devyard/core/resources';
import { isUniqueViolation, type Store, type TemplateRecord } from '../store/store.js';

const GiB = 1024 ** 3;
const MiB = 1024 ** 2;

/** The built-in templates every installation starts with (their images are built on first use). */
/** Built-in templates are shared with every organization; others only with the one that owns them. */
export function visibleTo(t: Pick<TemplateRecord, 'name' | 'orgId'>, orgId: string): boolean {
  return t.orgId === orgId || BUILTIN_TEMPLATES.some((b) => b.name === t.name && t.orgId === DEFAULT_ORG_ID);
}

export const BUILTIN_TEMPLATES: CreateTemplateRequest[] = [
  {
    name: 'base',
    description: 'Debian bookworm (minbase) with bash, git, curl, ca-certificates and procps',
    image: 'base',
    runtime: 'sandbox',
    defaultResources: { cpu: 1, memory: '1GiB', disk: '10GiB' },
    maxResources: { cpu: 8, memory: '16GiB', disk: '100GiB' },
  },
  {
    name: 'tiny',
    description: 'busybox, for fast tests',
    image: 'tiny',
    runtime: 'sandbox',
    defaultResources: { cpu: 0.5, memory: '128MiB', disk: '1GiB' },
    maxResources: { cpu: 4, memory: '4GiB', disk: '10GiB' },
  },
];

function resources(input: CreateTemplateRequest['defaultResources'], fallback: Resources, prefix: string): Resources {
  return {
    cpuMillis: input?.cpu !== undefined ? parseCpu(input.cpu, `${prefix}.cpu`) : fallback.cpuMillis,
    memoryBytes: input?.memory !== undefined ? parseBytes(input.memory, `${prefix}.memory`) : fallback.memoryBytes,
    diskBytes: input?.disk !== undefined ? parseBytes(input.disk, `${prefix}.disk`) : fallback.diskBytes,
  };
}

/**
 * Pins an OCI reference to the manifest digest it names now. Declared here, by its consumer; the
 * registry client implements it.
 */
export interface ImageDigestResolver {
  /** The `sha256:<hex>` digest of the manifest `ref` names; rejects when the image is missing or the registry is unreachable. */
  resolve(ref: string): Promise<string>;
}

export interface TemplateServiceOptions {
  /** Pins OCI images at publish time; without one, OCI references are stored unpinned (imageDigest null). */
  imageResolver?: ImageDigestResolver;
  /** Bounds one resolution, so a registry that hangs fails the publish instead of holding the request open. */
  resolveTimeoutMs?: number;
}

const DEFAULT_RESOLVE_TIMEOUT_MS = 30_000;

export class TemplateService {
  constructor(
    private readonly store: Store,
    private readonly now: () => number,
    private readonly options: TemplateServiceOptions = {},
  ) {}

  /**
   * Publishes a new version. Template names are unique per installation and belong to the
   * organization that published the first version: another organization cannot publish under it
   * (it answers like a taken name), and cannot see it.
   */
  async create(req: CreateTemplateRequest, orgId: string = DEFAULT_ORG_ID): Promise<TemplateRecord> {
    const defaults = resources(req.defaultResources, { cpuMillis: 1000, memoryBytes: 512 * MiB, diskBytes: 5 * GiB }, 'defaultResources');
    const max = resources(req.maxResources, defaults, 'maxResources');
    for (const k of ['cpuMillis', 'memoryBytes', 'diskBytes'] as const) {
      if (defaults[k] > max[k]) throw new DomainError('invalid-input', `defaultResources exceed maxResources (${k})`, { field: 'defaultResources' });
    }
    const gpu = req.defaultResources?.gpu ?? 0;
    if (gpu > (req.maxResources?.gpu ?? gpu)) throw new DomainError('invalid-input', 'defaultResources exceed maxResources (gpu)', { field: 'defaultResources.gpu' });
    // The edge validates bodies, but built-ins and other in-process callers reach here directly.
    const [image, field] = req.image !== undefined ? [req.image, 'image'] : req.build ? [req.build.from, 'build.from'] : [undefined, 'image'];
    if (image === undefined) throw new DomainError('invalid-input', 'a template needs exactly one of image or build', { field });
    // Resolve before touching the store: a failed pin must leave nothing behind.
    const imageDigest = await this.pin(image, field);
    // Two concurrent publishes of the same name race for the same version: retry on the unique key.
    for (let i = 0; i < 5; i++) {
      const latest = await this.store.getTemplate(req.name);
      if (latest && latest.orgId !== orgId) throw new DomainError('conflict', `the template name "${req.name}" is taken`, { field: 'name' });
      const t: TemplateRecord = {
        name: req.name,
        version: (latest?.version ?? 0) + 1,
        description: req.description ?? '',
        image,
        runtime: req.runtime ?? 'sandbox',
        defaultResources: defaults,
        maxResources: max,
        env: req.env ?? {},
        createdAt: this.now(),
        spec: { ...req, runtime: req.runtime ?? 'sandbox' },
        imageDigest,
        orgId,
      };
      try {
        await this.store.insertTemplate(t);
        return t;
      } catch (e) {
        if (!isUniqueViolation(e)) throw e;
      }
    }
    throw new DomainError('conflict', `template "${req.name}" is being published concurrently; retry`, { field: 'name' });
  }

  /**
   * A tag is a moving pointer: pinning it makes every box of this version start from the same bytes.
   * A reference that already carries a digest is still checked, so a typo fails now, not at first boot.
   */
  private async pin(image: string, field: string): Promise<string | null> {
    if (isBuiltinImage(image)) return null;
    const ref = parseOciReference(image);
    if (!ref) throw new DomainError('invalid-input', `${field}: "${image}" is not a built-in image or an OCI reference with a registry host`, { field });
    const resolver = this.options.imageResolver;
    if (!resolver) return ref.digest ?? null;
    const timeoutMs = this.options.resolveTimeoutMs ?? DEFAULT_RESOLVE_TIMEOUT_MS;
    let timer: NodeJS.Timeout | undefined;
    let digest: string;
    try {
      digest = await Promise.race([
        resolver.resolve(image),
        new Promise<never>((_, reject) => {
          timer = setTimeout(() => reject(new Error(`the registry did not answer within ${timeoutMs} ms`)), timeoutMs);
        }),
      ]);
    } catch (e) {
      const why = e instanceof Error ? e.message : String(e);
      throw new DomainError('invalid-input', `${field}: cannot resolve "${image}" to a digest: ${why}`, { field, image });
    } finally {
      clearTimeout(timer);
    }
    if (!DIGEST_PATTERN.test(digest)) throw new DomainError('internal', `image resolver answered "${digest}" for "${image}", not a sha256 digest`, { field });
    if (ref.digest && ref.digest !== digest) {
      throw new DomainError('invalid-input', `${field}: the registry serves ${digest} for "${image}", not the digest the reference names`, { field, image });
    }
    return digest;
  }

  async get(name: string, version?: number, orgId?: string): Promise<TemplateRecord> {
    const t = await this.store.getTemplate(name, version);
    if (!t || (orgId !== undefined && !visibleTo(t, orgId))) throw new DomainError('not-found', version ? `template "${name}" version ${version} not found` : `template "${name}" not found`, { name });
    return t;
  }

  /** The latest version of every template the organization may use (its own and the built-ins). */
  async list(orgId?: string): Promise<TemplateRecord[]> {
    return (await this.store.listTemplates()).filter((t) => orgId === undefined || visibleTo(t, orgId));
  }

  async versions(name: string, orgId?: string): Promise<TemplateRecord[]> {
    const all = await this.store.listTemplateVersions(name);
    if (all.length === 0 || (orgId !== undefined && !visibleTo(all[0]!, orgId))) throw new DomainError('not-found', `template "${name}" not found`, { name });
    return all;
  }

  /** Publishes the built-in templates once; later versions published by admins are left alone. */
  async seedBuiltins(): Promise<void> {
    for (const t of BUILTIN_TEMPLATES) if (!(await this.store.getTemplate(t.name))) await this.create(t);
  }
}
