/** The `--org-creation` and `--default-org-quota` flags of `devyard server` and `devyard up` (docs/tenancy.md). */
import type { Command } from 'commander';
import type { QuotaLimits } from '@devyard/api/tenancy-schemas';
import { parseBytes, parseCpu } from '@devyard/core/resources';
import type { OrgPolicy } from '@devyard/server/services/tenancy-service';
import { CliUsageError } from '../cli-config.js';

/** Flag values as commander parses them. */
export interface OrgPolicyFlags {
  /** --org-creation */
  orgCreation?: string;
  /** --default-org-quota */
  defaultOrgQuota?: string;
}

export function addOrgPolicyFlags(cmd: Command): Command {
  return cmd
    .option('--org-creation <who>', 'who may create organizations: operators (admins of the default organization; default) or anyone signed in')
    .option('--default-org-quota <limits>', 'quota of every new organization, e.g. boxes=20,running=10,cpu=32,memory=64GiB,storage=500GiB,gpu=0 (default those)');
}

/** What each key of --default-org-quota sets, and how its value reads. */
const QUOTA_KEYS: Record<string, { resource: keyof QuotaLimits; parse: (v: string) => number }> = {
  boxes: { resource: 'boxes', parse: (v) => count('boxes', v) },
  running: { resource: 'runningBoxes', parse: (v) => count('running', v) },
  cpu: { resource: 'cpuMillis', parse: (v) => parseCpu(v) },
  memory: { resource: 'memoryBytes', parse: (v) => parseBytes(v) },
  storage: { resource: 'diskBytes', parse: (v) => parseBytes(v, 'storage') },
  gpu: { resource: 'gpu', parse: (v) => count('gpu', v) },
};

function count(key: string, v: string): number {
  if (!/^\d+$/.test(v)) throw new CliUsageError(`--default-org-quota: ${key} must be a whole number, got "${v}"`);
  return Number(v);
}

/** `key=value,…` as quota limits; every key of the default must be given or it stays unlimited. */
export function parseOrgQuota(spec: string): QuotaLimits {
  const limits: QuotaLimits = {};
  for (const part of spec.split(',').map((p) => p.trim()).filter(Boolean)) {
    const [key, value, ...rest] = part.split('=');
    const k = QUOTA_KEYS[key ?? ''];
    if (!k || value === undefined || rest.length > 0) throw new CliUsageError(`--default-org-quota: "${part}" is not one of ${Object.keys(QUOTA_KEYS).map((x) => `${x}=…`).join(', ')}`);
    try {
      limits[k.resource] = k.parse(value);
    } catch (e) {
      throw e instanceof CliUsageError ? e : new CliUsageError(`--default-org-quota: ${(e as Error).message}`);
    }
  }
  if (Object.keys(limits).length === 0) throw new CliUsageError('--default-org-quota needs at least one limit');
  return limits;
}

/** The control plane's `orgs` option from the flags. */
export function orgPolicyFromFlags(o: OrgPolicyFlags): { orgs?: Partial<OrgPolicy> } {
  const orgs: Partial<OrgPolicy> = {};
  if (o.orgCreation !== undefined) {
    if (o.orgCreation !== 'operators' && o.orgCreation !== 'anyone') throw new CliUsageError(`--org-creation is operators or anyone, got "${o.orgCreation}"`);
    orgs.creation = o.orgCreation;
  }
  if (o.defaultOrgQuota !== undefined) orgs.defaultQuota = parseOrgQuota(o.defaultOrgQuota);
  return Object.keys(orgs).length ? { orgs } : {};
}
