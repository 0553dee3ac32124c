/**
 * Quotas per organization, team and user: boxes, running boxes (running or paused: both hold
 * memory), vCPU, memory and GPU of running boxes, and storage of all boxes. Checked inside the
 * transaction that creates, starts or resumes a box, so two concurrent requests cannot both take
 * the last unit (SQLite serializes write transactions; on PostgreSQL the same check needs the
 * transaction at SERIALIZABLE or a lock on the quota row).
 */
import type { QuotaLimits } from '@devyard/api/tenancy-schemas';
import { QUOTA_RESOURCES } from '@devyard/api/tenancy-schemas';
import { DomainError } from '@devyard/core/domain-error';
import type { BoxRecord } from '../store/box-records.js';
import type { Executor, Store } from '../store/store.js';
import type { TenancyStore } from '../store/tenancy-store.js';

type Resource = (typeof QUOTA_RESOURCES)[number];
export type Usage = Record<Resource, number>;

const holdsCompute = (b: Pick<BoxRecord, 'desiredState'>) => b.desiredState === 'running' || b.desiredState === 'paused';

/** What boxes use, summed. */
export function usageOf(boxes: ReadonlyArray<Pick<BoxRecord, 'desiredState' | 'resources'>>): Usage {
  const u: Usage = { boxes: 0, runningBoxes: 0, cpuMillis: 0, memoryBytes: 0, gpu: 0, diskBytes: 0 };
  for (const b of boxes) {
    u.boxes++;
    u.diskBytes += b.resources.diskBytes;
    if (!holdsCompute(b)) continue;
    u.runningBoxes++;
    u.cpuMillis += b.resources.cpuMillis;
    u.memoryBytes += b.resources.memoryBytes;
    u.gpu += (b.resources as { gpu?: number }).gpu ?? 0;
  }
  return u;
}

/** The boxes of `owners` (null: every box given) and what they use. */
const usageIn = (boxes: readonly BoxRecord[], owners: Set<string> | null): Usage => usageOf(owners === null ? boxes : boxes.filter((b) => owners.has(b.owner)));

/** `org`, `team:<t>` or `user:<u>` (validated at the edge) as its type and id. */
function parseScope(scope: string): [type: string, id: string] {
  return scope === 'org' ? ['org', 'org'] : (scope.split(':') as [string, string]);
}

interface Scope {
  type: 'org' | 'team' | 'user';
  id: string;
  label: string;
  limits: QuotaLimits;
  /** Owners whose boxes count against the scope (null: the whole organization). */
  owners: Set<string> | null;
}

const scopeName = (s: Pick<Scope, 'type' | 'id'>) => (s.type === 'org' ? 'org' : `${s.type}:${s.id}`);

export class QuotaService {
  constructor(
    private readonly store: Store,
    private readonly tenancy: TenancyStore,
  ) {}

  /** Owners whose boxes count against a team's quota: its members. */
  private async teamOwners(teamId: string, ex: Executor): Promise<Set<string>> {
    return new Set((await this.tenancy.teamMembers(teamId, ex)).map((m) => m.name));
  }

  /** The quotas that apply to boxes of `owner` (a user name) in `orgId`. */
  private async scopes(orgId: string, owner: string, ex: Executor): Promise<Scope[]> {
    const quotas = await this.tenancy.listQuotas(orgId, ex);
    if (quotas.length === 0) return [];
    const user = await this.tenancy.getUserByName(owner, ex);
    const teams = user ? await this.tenancy.teamsOf(orgId, user.id, ex) : [];
    const out: Scope[] = [];
    for (const q of quotas) {
      const limits = JSON.parse(q.limits) as QuotaLimits;
      if (q.scopeType === 'org') out.push({ type: 'org', id: 'org', label: 'the organization', limits, owners: null });
      else if (q.scopeType === 'user' && q.scopeId === owner) out.push({ type: 'user', id: owner, label: `user "${owner}"`, limits, owners: new Set([owner]) });
      else if (q.scopeType === 'team') {
        const team = teams.find((t) => t.name === q.scopeId);
        if (!team) continue;
        out.push({ type: 'team', id: team.name, label: `team "${team.name}"`, limits, owners: await this.teamOwners(team.id, ex) });
      }
    }
    return out;
  }

  /**
   * Refuses (403 `quota-exceeded`, naming the quota, its limit and current use) when `next` — a box
   * being created, started or resumed, as it will be stored — would exceed a quota. Call inside the
   * transaction that writes the box.
   */
  async check(next: BoxRecord, ex: Executor): Promise<void> {
    const scopes = await this.scopes(next.orgId, next.owner, ex);
    if (scopes.length === 0) return;
    const others = (await this.store.listBoxes({}, ex)).filter((b) => b.orgId === next.orgId && b.id !== next.id);
    for (const s of scopes) {
      const before = usageIn(others, s.owners);
      const after = usageIn([...others, next], s.owners);
      for (const r of QUOTA_RESOURCES) {
        const limit = s.limits[r];
        if (limit === undefined || after[r] <= before[r] || after[r] <= limit) continue;
        throw new DomainError('quota-exceeded', `quota of ${s.label} exceeded: ${r} limit ${limit}, in use ${before[r]}, this box needs ${after[r] - before[r]}`, {
          scope: scopeName(s),
          resource: r,
          limit,
          used: before[r],
          requested: after[r] - before[r],
        });
      }
    }
  }

  /** Every quota that applies to the caller, with current use. */
  async forUser(orgId: string, userName: string): Promise<Array<{ scope: string; limits: QuotaLimits; usage: Usage }>> {
    const scopes = await this.scopes(orgId, userName, this.store.db);
    const boxes = (await this.store.listBoxes({})).filter((b) => b.orgId === orgId);
    return scopes.map((s) => ({ scope: scopeName(s), limits: s.limits, usage: usageIn(boxes, s.owners) }));
  }

  /** Every quota of an organization, with current use. */
  async forOrg(orgId: string): Promise<Array<{ scope: string; limits: QuotaLimits; usage: Usage }>> {
    const boxes = (await this.store.listBoxes({})).filter((b) => b.orgId === orgId);
    const out: Array<{ scope: string; limits: QuotaLimits; usage: Usage }> = [];
    for (const q of await this.tenancy.listQuotas(orgId)) {
      let owners: Set<string> | null = null;
      if (q.scopeType === 'user') owners = new Set([q.scopeId]);
      if (q.scopeType === 'team') {
        const team = await this.tenancy.getTeamByName(orgId, q.scopeId);
        owners = team ? await this.teamOwners(team.id, this.store.db) : new Set();
      }
      out.push({ scope: scopeName({ type: q.scopeType as Scope['type'], id: q.scopeId }), limits: JSON.parse(q.limits) as QuotaLimits, usage: usageIn(boxes, owners) });
    }
    return out;
  }

  /** Sets a quota; the scope's team or user must exist in the organization. */
  async set(orgId: string, scope: string, limits: QuotaLimits, now: number): Promise<{ scope: string; limits: QuotaLimits; usage: Usage }> {
    const [type, id] = parseScope(scope);
    let owners: Set<string> | null = null;
    if (type === 'team') {
      const team = await this.tenancy.getTeamByName(orgId, id);
      if (!team) throw new DomainError('not-found', `no team "${id}"`, { team: id });
      owners = await this.teamOwners(team.id, this.store.db);
    }
    if (type === 'user') {
      const u = await this.tenancy.getUserByName(id);
      if (!u || !(await this.tenancy.membership(orgId, u.id))) throw new DomainError('not-found', `no member "${id}"`, { user: id });
      owners = new Set([id]);
    }
    await this.tenancy.setQuota(orgId, type, id, JSON.stringify(limits), now);
    const boxes = (await this.store.listBoxes({})).filter((b) => b.orgId === orgId);
    return { scope, limits, usage: usageIn(boxes, owners) };
  }

  async remove(orgId: string, scope: string): Promise<void> {
    const [type, id] = parseScope(scope);
    await this.tenancy.deleteQuota(orgId, type, id);
  }
}
