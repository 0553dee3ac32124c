/** Templates: immutable versions; publishing a template under an existing name adds a version. */
import type { CreateTemplateRequest } from '@devyard/api/template-schemas';
import { DomainError } from '@devyard/core/domain-error';
import { parseBytes, parseCpu, type Resources } from '@devyard/core/resources';
import { isUniqueViolation, type Store, type TemplateRecord } from '../store/store.js';

const GiB = 1024 ** 3;
const MiB = 1024 ** 2;

/** The built-in templates every installation starts with (their images are built on first use). */
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

export class TemplateService {
  constructor(
    private readonly store: Store,
    private readonly now: () => number,
  ) {}

  async create(req: CreateTemplateRequest): Promise<TemplateRecord> {
    const defaults = resources(req.defaultResources, { cpuMillis: 1000, memoryBytes: 512 * MiB, diskBytes: 5 * GiB }, 'defaultResources');
    const max = resources(req.maxResources, defaults, 'maxResources');
    for (const k of ['cpuMillis', 'memoryBytes', 'diskBytes'] as const) {
      if (defaults[k] > max[k]) throw new DomainError('invalid-input', `defaultResources exceed maxResources (${k})`, { field: 'defaultResources' });
    }
    // Two concurrent publishes of the same name race for the same version: retry on the unique key.
    for (let i = 0; i < 5; i++) {
      const latest = await this.store.getTemplate(req.name);
      const t: TemplateRecord = {
        name: req.name,
        version: (latest?.version ?? 0) + 1,
        description: req.description ?? '',
        image: req.image,
        runtime: req.runtime ?? 'sandbox',
        defaultResources: defaults,
        maxResources: max,
        env: req.env ?? {},
        createdAt: this.now(),
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

  async get(name: string, version?: number): Promise<TemplateRecord> {
    const t = await this.store.getTemplate(name, version);
    if (!t) throw new DomainError('not-found', version ? `template "${name}" version ${version} not found` : `template "${name}" not found`, { name });
    return t;
  }

  list(): Promise<TemplateRecord[]> {
    return this.store.listTemplates();
  }

  async versions(name: string): Promise<TemplateRecord[]> {
    const all = await this.store.listTemplateVersions(name);
    if (all.length === 0) throw new DomainError('not-found', `template "${name}" not found`, { name });
    return all;
  }

  /** Publishes the built-in templates once; later versions published by admins are left alone. */
  async seedBuiltins(): Promise<void> {
    for (const t of BUILTIN_TEMPLATES) if (!(await this.store.getTemplate(t.name))) await this.create(t);
  }
}
