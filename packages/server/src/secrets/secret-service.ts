/**
 * Secrets use cases: set, list (metadata only), delete, and the decrypted set each box gets in its
 * node's desired set. Values are sealed before they reach the store and opened only to build a
 * node's desired set; no method returns a value to an API caller, and nothing here logs one.
 *
 * A change reaches running boxes through the change feed: every node with a box the secret
 * applies to is told its desired set changed, and its agent rewrites the box's secrets.
 */
import { PutSecretRequestSchema, SecretNameSchema, parseSecretScope, type BoxSecret, type SecretMetadata } from '@devyard/api/secret-schemas';
import { DomainError } from '@devyard/core/domain-error';
import type { ChangeFeed } from '../change-feed.js';
import { newId } from '../ids.js';
import { DEFAULT_ORG_ID, WARM_POOL_OWNER, type Subject } from '../services/box-service.js';
import type { BoxRecord } from '../store/box-records.js';
import type { SecretRow, SecretStore } from '../store/secret-store.js';
import { isUniqueViolation, type Store } from '../store/store.js';
import { secretAccess, type SecretScope, type SecretScopeType } from './secret-access-policy.js';
import { openSecret, rewrapSecret, sealSecret, type KeyringSource, type SealedSecret, type SecretBinding } from './secret-envelope.js';

/**
 * What the secret service needs to know about organizations and teams. TENANCY HOOK: the interim
 * defaults below know no teams; the tenancy layer supplies the real answers.
 */
export interface SecretTenancy {
  /** Names of the teams `userName` belongs to in the org (the `<team>` of `team:<team>` scopes). */
  teamsOf(orgId: string, userName: string): Promise<string[]>;
  /** Whether the team exists in the org (a `team:<team>` secret for an unknown team is a 404). */
  teamExists(orgId: string, team: string): Promise<boolean>;
  /** The organization a box belongs to. */
  orgOfBox(box: BoxRecord): string;
}

export const INTERIM_SECRET_TENANCY: SecretTenancy = {
  teamsOf: async () => [],
  teamExists: async () => true,
  orgOfBox: (b) => (b as { orgId?: string }).orgId ?? DEFAULT_ORG_ID,
};

/** On a name clash the narrower scope wins: user > team > template > org. */
const PRECEDENCE: Record<SecretScopeType, number> = { org: 0, template: 1, team: 2, user: 3 };

export interface SecretServiceDeps {
  store: Store;
  secrets: SecretStore;
  keys: KeyringSource;
  feed: ChangeFeed;
  now: () => number;
  tenancy?: Partial<SecretTenancy>;
  /** Operational log; receives names, scopes and KEK ids, never values. */
  log?: (level: 'info' | 'warn' | 'error', msg: string, fields?: Record<string, unknown>) => void;
}

function bindingOf(r: Pick<SecretRow, 'org_id' | 'scope_type' | 'scope_id' | 'name'>): SecretBinding {
  return { orgId: r.org_id, scopeType: r.scope_type, scopeId: r.scope_id, name: r.name };
}

function sealedOf(r: SecretRow): SealedSecret {
  return { ciphertext: Buffer.from(r.ciphertext, 'base64'), iv: Buffer.from(r.iv, 'base64'), wrappedDek: Buffer.from(r.wrapped_dek, 'base64'), kekId: r.kek_id };
}

function columnsOf(s: SealedSecret): Pick<SecretRow, 'ciphertext' | 'iv' | 'wrapped_dek' | 'kek_id'> {
  return { ciphertext: s.ciphertext.toString('base64'), iv: s.iv.toString('base64'), wrapped_dek: s.wrappedDek.toString('base64'), kek_id: s.kekId };
}

function scopeLabel(r: Pick<SecretRow, 'scope_type' | 'scope_id'>): string {
  return r.scope_type === 'org' || r.scope_type === 'user' ? r.scope_type : `${r.scope_type}:${r.scope_id}`;
}

export function toSecretMetadata(r: SecretRow): SecretMetadata {
  return {
    name: r.name,
    scope: scopeLabel(r),
    version: Number(r.version),
    createdBy: r.created_by,
    createdAt: new Date(Number(r.created_at)).toISOString(),
    updatedAt: new Date(Number(r.updated_at)).toISOString(),
  };
}

export class SecretService {
  private readonly tenancy: SecretTenancy;
  private readonly log: NonNullable<SecretServiceDeps['log']>;

  constructor(private readonly d: SecretServiceDeps) {
    this.tenancy = { ...INTERIM_SECRET_TENANCY, ...d.tenancy };
    this.log = d.log ?? (() => undefined);
  }

  /** Resolves a scope segment (`org`, `user`, `team:x`, `template:x`) for the subject. */
  private async resolveScope(subject: Subject, scope: string): Promise<SecretScope> {
    let ref;
    try {
      ref = parseSecretScope(scope);
    } catch {
      throw new DomainError('invalid-input', `scope must be org, user, team:<team> or template:<template>, got "${scope}"`, { field: 'scope' });
    }
    switch (ref.type) {
      case 'org':
        return { orgId: subject.orgId, type: 'org', id: subject.orgId };
      case 'user':
        return { orgId: subject.orgId, type: 'user', id: subject.name };
      case 'team':
        return { orgId: subject.orgId, type: 'team', id: ref.team };
      case 'template':
        return { orgId: subject.orgId, type: 'template', id: ref.template };
    }
  }

  /** 404 for what the subject may not see, 403 for what it may see but not change. */
  private authorizeWrite(subject: Subject, scope: SecretScope, what: string): void {
    if (secretAccess.mayWrite(subject, scope)) return;
    if (secretAccess.mayList(subject, scope)) throw new DomainError('forbidden', `you may not change ${what}`);
    throw new DomainError('not-found', `${what} not found`);
  }

  /** Checks that the scope's owner exists (templates; teams through the tenancy hook). */
  private async requireScopeOwner(scope: SecretScope): Promise<void> {
    if (scope.type === 'template' && !(await this.d.store.getTemplate(scope.id))) {
      throw new DomainError('not-found', `template "${scope.id}" not found`, { field: 'scope' });
    }
    if (scope.type === 'team' && !(await this.tenancy.teamExists(scope.orgId, scope.id))) {
      throw new DomainError('not-found', `team "${scope.id}" not found`, { field: 'scope' });
    }
  }

  /** Creates or replaces a secret; `created` tells which. Setting the value it already has changes nothing. */
  async put(subject: Subject, scopeSegment: string, name: string, value: string): Promise<{ secret: SecretMetadata; created: boolean }> {
    // The route validated both already; a direct caller gets the same checks (nothing half-stored).
    const n = SecretNameSchema.safeParse(name);
    if (!n.success) throw new DomainError('invalid-input', `name: ${n.error.issues[0]?.message}`, { field: 'name' });
    const v = PutSecretRequestSchema.safeParse({ value });
    if (!v.success) throw new DomainError('invalid-input', `value: ${v.error.issues[0]?.message}`, { field: 'value' });
    const scope = await this.resolveScope(subject, scopeSegment);
    const what = `secret ${scopeSegment}/${name}`;
    this.authorizeWrite(subject, scope, what);
    await this.requireScopeOwner(scope);
    const key = { orgId: scope.orgId, scopeType: scope.type, scopeId: scope.id, name };
    const binding: SecretBinding = key;
    for (let attempt = 0; ; attempt++) {
      const now = this.d.now();
      try {
        const result = await this.d.store.transaction(async (tx) => {
          const cur = await this.d.secrets.get(key, tx);
          if (!cur) {
            const row: SecretRow = {
              id: newId('sec'),
              org_id: key.orgId,
              scope_type: key.scopeType,
              scope_id: key.scopeId,
              name,
              ...columnsOf(sealSecret(value, binding, this.d.keys.keyring())),
              version: 1,
              created_by: subject.name,
              created_at: now,
              updated_at: now,
            };
            await this.d.secrets.insert(row, tx);
            return { row, created: true, changed: true };
          }
          if (this.sameValue(cur, value)) return { row: cur, created: false, changed: false };
          const next = { ...columnsOf(sealSecret(value, binding, this.d.keys.keyring())), updated_at: now };
          if (!(await this.d.secrets.updateValue(cur.id, Number(cur.version), next, tx))) throw new DomainError('conflict', `${what} was changed concurrently; retry`);
          return { row: { ...cur, ...next, version: Number(cur.version) + 1 }, created: false, changed: true };
        });
        if (result.changed) await this.notifyNodes(scope);
        return { secret: toSecretMetadata(result.row), created: result.created };
      } catch (e) {
        // Two first writes of the same secret: the loser's insert hits the unique key; retry as an update.
        if (attempt < 3 && (isUniqueViolation(e) || (e instanceof DomainError && e.code === 'conflict'))) continue;
        throw e;
      }
    }
  }

  private sameValue(row: SecretRow, value: string): boolean {
    try {
      return openSecret(sealedOf(row), bindingOf(row), this.d.keys.keyring()) === value;
    } catch {
      return false; // unreadable (its KEK is gone): overwriting it is the way out
    }
  }

  /** Metadata of every secret the subject may see, in scope then name order. */
  async list(subject: Subject): Promise<SecretMetadata[]> {
    const rows = await this.d.secrets.list([subject.orgId]);
    return rows.filter((r) => secretAccess.mayList(subject, { orgId: r.org_id, type: r.scope_type as SecretScopeType, id: r.scope_id })).map(toSecretMetadata);
  }

  async delete(subject: Subject, scopeSegment: string, name: string): Promise<void> {
    const scope = await this.resolveScope(subject, scopeSegment);
    const what = `secret ${scopeSegment}/${name}`;
    const row = secretAccess.mayList(subject, scope) ? await this.d.secrets.get({ orgId: scope.orgId, scopeType: scope.type, scopeId: scope.id, name }) : undefined;
    if (!row) throw new DomainError('not-found', `${what} not found`);
    this.authorizeWrite(subject, scope, what);
    await this.d.secrets.delete(row.id);
    await this.notifyNodes(scope);
  }

  /**
   * The secrets each box gets: its org's, its template's, its owner's teams' and its owner's own;
   * on a name clash user > team > template > org (between two teams, the first team name in
   * sorted order). A secret that cannot be decrypted (its KEK was removed) is left out and logged.
   */
  async forBoxes(boxes: readonly BoxRecord[]): Promise<Map<string, BoxSecret[]>> {
    const out = new Map<string, BoxSecret[]>();
    if (boxes.length === 0) return out;
    const orgs = [...new Set(boxes.map((b) => this.tenancy.orgOfBox(b)))];
    const rows = await this.d.secrets.list(orgs);
    if (rows.length === 0) {
      for (const b of boxes) out.set(b.id, []);
      return out;
    }
    const keyring = this.d.keys.keyring();
    const opened = new Map<string, string | null>();
    const valueOf = (r: SecretRow): string | null => {
      if (!opened.has(r.id)) {
        try {
          opened.set(r.id, openSecret(sealedOf(r), bindingOf(r), keyring));
        } catch (e) {
          this.log('error', 'secret cannot be decrypted; boxes get it once it can', { secretId: r.id, name: r.name, scope: scopeLabel(r), orgId: r.org_id, kekId: r.kek_id, err: (e as Error).message });
          opened.set(r.id, null);
        }
      }
      return opened.get(r.id)!;
    };
    const teamsCache = new Map<string, string[]>();
    for (const b of boxes) {
      // Unclaimed pool boxes hold nothing: their hooks are the template publisher's, and whose the
      // box will be is not decided yet. The secrets arrive with the claim.
      if (b.owner === WARM_POOL_OWNER) {
        out.set(b.id, []);
        continue;
      }
      const orgId = this.tenancy.orgOfBox(b);
      const teamKey = `${orgId}\0${b.owner}`;
      if (!teamsCache.has(teamKey)) teamsCache.set(teamKey, [...(await this.tenancy.teamsOf(orgId, b.owner))].sort());
      const teams = teamsCache.get(teamKey)!;
      const chosen = new Map<string, { rank: number; row: SecretRow }>();
      for (const r of rows) {
        if (r.org_id !== orgId) continue;
        let rank: number;
        if (r.scope_type === 'org' && r.scope_id === orgId) rank = PRECEDENCE.org * 1000;
        else if (r.scope_type === 'template' && r.scope_id === b.templateName) rank = PRECEDENCE.template * 1000;
        else if (r.scope_type === 'team' && teams.includes(r.scope_id)) rank = PRECEDENCE.team * 1000 + (999 - teams.indexOf(r.scope_id));
        else if (r.scope_type === 'user' && r.scope_id === b.owner) rank = PRECEDENCE.user * 1000;
        else continue;
        const prev = chosen.get(r.name);
        if (!prev || rank > prev.rank) chosen.set(r.name, { rank, row: r });
      }
      const list: BoxSecret[] = [];
      for (const [name, { row }] of [...chosen].sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0))) {
        const value = valueOf(row);
        if (value !== null) list.push({ name, value });
      }
      out.set(b.id, list);
    }
    return out;
  }

  /**
   * Tells the nodes of the user's boxes to fetch their desired sets again (the boxes' secrets
   * follow). TENANCY HOOK: call it when a user joins or leaves a team, so team secrets appear in or
   * disappear from their running boxes.
   */
  async refreshUser(orgId: string, userName: string): Promise<void> {
    const nodes = new Set<string>();
    for (const b of await this.d.store.listBoxes({ owner: userName })) if (b.nodeId && this.tenancy.orgOfBox(b) === orgId) nodes.add(b.nodeId);
    for (const n of nodes) this.d.feed.emit('node', n);
  }

  /** Nodes running a box the scope applies to learn that their desired set changed. */
  private async notifyNodes(scope: SecretScope): Promise<void> {
    const nodes = new Set<string>();
    const teams = new Map<string, string[]>();
    for (const b of await this.d.store.listBoxes()) {
      if (!b.nodeId || nodes.has(b.nodeId) || this.tenancy.orgOfBox(b) !== scope.orgId) continue;
      let applies = false;
      if (scope.type === 'org') applies = true;
      else if (scope.type === 'template') applies = b.templateName === scope.id;
      else if (scope.type === 'user') applies = b.owner === scope.id;
      else {
        if (!teams.has(b.owner)) teams.set(b.owner, await this.tenancy.teamsOf(scope.orgId, b.owner));
        applies = teams.get(b.owner)!.includes(scope.id);
      }
      if (applies) nodes.add(b.nodeId);
    }
    for (const n of nodes) this.d.feed.emit('node', n);
  }

  /**
   * Re-wraps every data key not under the current KEK, in one transaction: either every row moves
   * to the current key or none does. Values and versions are untouched; nodes need not hear of it.
   */
  async rewrapAll(): Promise<{ rewrapped: number; currentKekId: string }> {
    const keyring = this.d.keys.keyring();
    const current = keyring.current.id;
    const rewrapped = await this.d.store.transaction(async (tx) => {
      let n = 0;
      for (const r of await this.d.secrets.listNotUnder(current, tx)) {
        const next = rewrapSecret(sealedOf(r), bindingOf(r), keyring);
        if (await this.d.secrets.updateWrap(r.id, r.kek_id, { wrapped_dek: next.wrappedDek.toString('base64'), kek_id: next.kekId }, tx)) n++;
      }
      return n;
    });
    return { rewrapped, currentKekId: current };
  }
}
