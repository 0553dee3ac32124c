/**
 * Box use cases behind the API: create, read, lifecycle verbs, events and sessions. Verbs only
 * change the desired state (in one transaction with the event, the operation record and the
 * idempotency key); the reconciler does the rest.
 */
import { createHash } from 'node:crypto';
import { NameSchema } from '@devyard/api/common-schemas';
import { BOX_PAGE_MAX, type CreateBoxRequest, type MoveBoxRequest } from '@devyard/api/box-schemas';
import { signSessionToken } from '@devyard/api/session-tokens';
import { planVerb, type Verb } from '@devyard/core/box-lifecycle';
import { decideBoxRuntime, mayRunIn } from '@devyard/core/box-isolation';
import { DomainError } from '@devyard/core/domain-error';
import { accessAtLeast, boxAccess, seesEveryBox, type BoxAccess, type BoxViewer, type OrgRole, type SharedBox, type TeamRole } from '@devyard/core/rbac-policy';
import type { TenancyStore } from '../store/tenancy-store.js';
import type { QuotaService } from './quota-service.js';
import { visibleTo } from './template-service.js';
import { add, diskOnly, parseBytes, parseCpu, shortfall, subtract, ZERO, type Resources } from '@devyard/core/resources';
import { describeRejection, filterNode, schedule } from '@devyard/core/scheduler';
import type { ChangeFeed } from '../change-feed.js';
import { newId } from '../ids.js';
import { setCondition, type BoxListing, type BoxRecord } from '../store/box-records.js';
import type { BoxCursor, Executor, NodeRecord, Store } from '../store/store.js';
import { nodeSnapshot } from './scheduler-nodes.js';

/** Owner of the boxes kept ready in warm pools (see loops/warm-pool-filler.ts). */
export const WARM_POOL_OWNER = 'system:warm-pool';

/** The authenticated caller of a use case. */
export interface Subject {
  /** User (or system loop) name; boxes are scoped by it. */
  name: string;
  kind: 'user' | 'node' | 'gateway' | 'system';
  /** Organization the subject acts in; every box, template, secret and quota belongs to one. */
  orgId: string;
  /** Role in that organization (system loops act as owners of what they touch). */
  role: OrgRole;
  /** Ids of the subject's teams in that organization. */
  teamIds: readonly string[];
  /** The subject's teams with names and team roles (users). */
  teams?: ReadonlyArray<{ id: string; name: string; role: TeamRole }>;
  /** The user's id (users and service accounts). */
  userId?: string;
  /** The API token the request came with. */
  tokenId?: string;
  /** Token scopes (`read`, `write`); undefined = everything the role allows. */
  scopes?: readonly string[];
}

/** The organization every installation starts with (and, until organizations are managed, the only one). */
export const DEFAULT_ORG_ID = 'org_default';

/** Requested resources over the template's defaults, checked against its maximum. */
export function resolveResources(
  input: CreateBoxRequest['resources'],
  defaults: Resources,
  max: Resources,
): Resources {
  const r: Resources = {
    cpuMillis: input?.cpu !== undefined ? parseCpu(input.cpu, 'resources.cpu') : defaults.cpuMillis,
    memoryBytes: input?.memory !== undefined ? parseBytes(input.memory, 'resources.memory') : defaults.memoryBytes,
    diskBytes: input?.disk !== undefined ? parseBytes(input.disk, 'resources.disk') : defaults.diskBytes,
  };
  if (r.memoryBytes < 16 * 1024 * 1024) throw new DomainError('invalid-input', 'resources.memory must be at least 16MiB', { field: 'resources.memory' });
  const over = shortfall(max, { cpuMillis: 0, memoryBytes: 0, diskBytes: 0 }, r);
  if (over.length > 0) {
    const field = { cpuMillis: 'resources.cpu', memoryBytes: 'resources.memory', diskBytes: 'resources.disk' }[over[0]!];
    throw new DomainError('invalid-input', `${field} exceeds the template's maximum`, { field, max });
  }
  return r;
}

/** A heartbeat or a scheduling pass changed a node row between our read and our write: read it again. */
const isNodeRace = (e: unknown) => e instanceof DomainError && e.code === 'conflict' && e.details.reason === 'version-mismatch' && 'nodeId' in e.details;


const viewerOf = (s: Subject): BoxViewer => ({ name: s.name, orgId: s.orgId, role: s.role, teamIds: s.teamIds });
const sharedBox = (b: BoxListing, shares: ReadonlyArray<{ teamId: string; access: string }>): SharedBox => ({ owner: b.owner, orgId: b.orgId, shares: shares as SharedBox['shares'] });

/** What box authorization and quotas need beyond the box store (absent: owner-only, no quotas). */
export interface BoxServiceTenancy {
  /** Team shares of boxes. */
  tenancy: TenancyStore;
  /** Quota checks inside the transactions that create, start or resume boxes. */
  quotas: QuotaService;
}

export class BoxService {
  constructor(
    private readonly store: Store,
    private readonly feed: ChangeFeed,
    private readonly now: () => number,
    private readonly tenancy: BoxServiceTenancy | null = null,
  ) {}

  /** What the subject may do with the box (core rbac-policy: owner, org admins, team shares, auditors). */
  async accessOf(subject: Subject, box: BoxListing, ex: Executor = this.store.db): Promise<BoxAccess> {
    if (subject.kind === 'system') return 'manage';
    // Shares cannot add to what an owner or an org admin has: skip the lookup (watches call this per event).
    const skipShares = box.orgId === subject.orgId && (box.owner === subject.name || subject.role === 'owner' || subject.role === 'admin');
    const shares = skipShares || !this.tenancy ? [] : ((await this.tenancy.tenancy.sharesOf([box.id], ex)).get(box.id) ?? []);
    return boxAccess(viewerOf(subject), sharedBox(box, shares));
  }

  /**
   * The box `name` of `owner` (default: the caller) when the caller has at least `need` on it: a box
   * the caller may not see is not found (404), one it may see but not use so is refused (403).
   */
  private async authorized(subject: Subject, name: string, need: BoxAccess, owner: string | undefined, ex: Executor = this.store.db): Promise<BoxRecord> {
    const box = await this.store.getBoxByName(owner ?? subject.name, name, ex);
    const access = box ? await this.accessOf(subject, box, ex) : 'none';
    if (!box || access === 'none') throw new DomainError('not-found', `box "${name}" not found`, { name, ...(owner ? { owner } : {}) });
    if (!accessAtLeast(access, need)) throw new DomainError('forbidden', `you may ${access} box "${name}", not ${need} it`, { name, access, need });
    return box;
  }

  async create(subject: Subject, req: CreateBoxRequest, idempotencyKey?: string): Promise<{ box: BoxRecord; replayed: boolean }> {
    const requestHash = createHash('sha256').update(JSON.stringify(req)).digest('hex');
    const now = this.now();
    const result = await this.store.transaction(async (tx) => {
      if (idempotencyKey !== undefined) {
        const prior = await this.store.getIdempotencyKey(subject.name, idempotencyKey, tx);
        if (prior) {
          if (prior.request_hash !== requestHash) {
            throw new DomainError('conflict', 'Idempotency-Key was already used with a different request body', { header: 'Idempotency-Key' });
          }
          const box = await this.store.getBox(prior.box_id, tx);
          if (!box) throw new DomainError('internal', 'idempotency key points at a missing box');
          return { box, replayed: true };
        }
      }
      const found = await this.store.getTemplate(req.template, req.templateVersion, tx);
      // Another organization's template does not exist for the caller (system loops see all).
      const template = found && (subject.kind === 'system' || visibleTo(found, subject.orgId)) ? found : undefined;
      if (!template) {
        const what = req.templateVersion ? `template "${req.template}" version ${req.templateVersion}` : `template "${req.template}"`;
        throw new DomainError('invalid-input', `${what} does not exist (see \`devyard templates\`)`, { field: 'template' });
      }
      // Untrusted organizations' boxes run in microVMs (core box-isolation).
      const trusted = this.tenancy ? await this.tenancy.tenancy.orgTrusted(subject.orgId, tx) : true;
      const runtime = decideBoxRuntime(req.runtime, template.runtime, trusted);
      if (runtime === 'sim') throw new DomainError('invalid-input', 'runtime "sim" is for scale tests only and not offered to users', { field: 'runtime' });
      const resources = resolveResources(req.resources, template.defaultResources, template.maxResources);
      const claimed = req.env === undefined && subject.kind !== 'system' ? await this.claimWarm(tx, subject, req.name, template.name, template.version, runtime, resources, now) : null;
      if (claimed) {
        if (idempotencyKey !== undefined) await this.store.putIdempotencyKey({ owner: subject.name, key: idempotencyKey, requestHash, boxId: claimed.id, now }, tx);
        return { box: claimed, replayed: false };
      }
      const box: BoxRecord = {
        id: newId('b'),
        name: req.name,
        owner: subject.name,
        orgId: subject.orgId,
        templateName: template.name,
        templateVersion: template.version,
        image: pinnedImage(template.image, template.imageDigest),
        runtime,
        desiredState: 'running',
        phase: 'pending',
        generation: 1,
        observedGeneration: 0,
        nodeId: null,
        computeReserved: false,
        resources,
        env: { ...template.env, ...(req.env ?? {}) },
        attempt: 1,
        lastError: null,
        nextAttemptAt: null,
        conditions: [],
        ip: null,
        createdAt: now,
        updatedAt: now,
        deletedAt: null,
        version: 1,
        forkOf: null,
        moveFromNodeId: null,
        cleanupNodeId: null,
      };
      if (this.tenancy) await this.tenancy.quotas.check(box, tx);
      await this.store.insertBox(box, tx);
      if (idempotencyKey !== undefined) await this.store.putIdempotencyKey({ owner: subject.name, key: idempotencyKey, requestHash, boxId: box.id, now }, tx);
      await this.recordChange(tx, box, 'Created', `created from template ${template.name} v${template.version} by ${subject.name}`);
      return { box, replayed: false };
    });
    if (!result.replayed) {
      this.feed.emit('box', result.box);
      // A claimed warm box is already on a node: its agent must learn the new name and owner.
      if (result.box.nodeId) this.feed.emit('node', result.box.nodeId);
    }
    return result;
  }

  /**
   * Takes a ready box of the template's warm pool, if one matches exactly (version, runtime,
   * resources), and hands it to the caller under the requested name. Runs inside the create
   * transaction and is conditional on the pool box's version, so two concurrent creates can never
   * claim the same box: the loser's update matches no row and it tries the next one.
   */
  private async claimWarm(
    tx: Executor,
    subject: Subject,
    name: string,
    templateName: string,
    templateVersion: number,
    runtime: string,
    resources: Resources,
    now: number,
  ): Promise<BoxRecord | null> {
    if (await this.store.getBoxByName(subject.name, name, tx)) {
      throw new DomainError('conflict', `a box named "${name}" already exists`, { field: 'name', name });
    }
    const candidates = (await this.store.listBoxes({ owner: WARM_POOL_OWNER }, tx)).filter(
      (b) =>
        // A pool is its template's organization's: another organization never gets its boxes.
        b.orgId === subject.orgId &&
        b.templateName === templateName &&
        b.templateVersion === templateVersion &&
        b.runtime === runtime &&
        b.desiredState === 'running' &&
        b.phase === 'running' &&
        b.resources.cpuMillis === resources.cpuMillis &&
        b.resources.memoryBytes === resources.memoryBytes &&
        b.resources.diskBytes === resources.diskBytes,
    );
    for (const pooled of candidates) {
      try {
        const claimed = { ...pooled, owner: subject.name, orgId: subject.orgId, name, updatedAt: now };
        if (this.tenancy) await this.tenancy.quotas.check(claimed, tx);
        const box = await this.store.updateBox(claimed, pooled.version, tx);
        await this.store.appendEvent({ boxId: box.id, boxName: name, owner: subject.name, time: now, type: 'Claimed', phase: box.phase, message: `claimed from the warm pool of ${templateName} v${templateVersion} by ${subject.name} (was ${pooled.name})` }, tx);
        return box;
      } catch (e) {
        if (!(e instanceof DomainError && e.code === 'conflict')) throw e;
      }
    }
    return null;
  }

  /**
   * Forks a running or paused microvm box into `count` new boxes of the caller (`name`, or
   * `name-1` … `name-N` when count > 1): same template version, image, runtime, resources and env,
   * bound at once to the source's node, the only one that holds its RAM, with `forkOf` naming the
   * source so that node's agent clones it. One transaction: the names, the caller's quotas and the
   * node's capacity (reserved as the reconciler's scheduling does, optimistic on the node's version)
   * are checked for all of them, and either every box is created or none.
   */
  async fork(subject: Subject, sourceName: string, req: { name: string; count: number }, owner?: string): Promise<BoxRecord[]> {
    const names = req.count === 1 ? [req.name] : Array.from({ length: req.count }, (_, i) => `${req.name}-${i + 1}`);
    for (const n of names) {
      if (!NameSchema.safeParse(n).success) throw new DomainError('invalid-input', `box name "${n}" is not a valid name (at most 40 characters with the -N suffix)`, { field: 'name', name: n });
    }
    for (let attempt = 1; ; attempt++) {
      try {
        const { boxes, nodeId } = await this.store.transaction((tx) => this.forkIn(tx, subject, sourceName, names, owner));
        for (const b of boxes) this.feed.emit('box', b);
        this.feed.emit('node', nodeId);
        return boxes;
      } catch (e) {
        if (!isNodeRace(e) || attempt >= 3) throw e;
      }
    }
  }

  private async forkIn(tx: Executor, subject: Subject, sourceName: string, names: string[], owner: string | undefined): Promise<{ boxes: BoxRecord[]; nodeId: string }> {
    const now = this.now();
    const src = await this.authorized(subject, sourceName, 'manage', owner, tx);
    if (src.runtime !== 'microvm') {
      throw new DomainError('invalid-state', `fork needs a microvm box; ${src.name} runs on ${src.runtime}`, { runtime: src.runtime });
    }
    const live = (s: string) => s === 'running' || s === 'paused';
    if (!live(src.desiredState) || !live(src.phase) || src.nodeId === null) {
      throw new DomainError('invalid-state', `fork needs a running or paused box; ${src.name} is ${src.phase}${src.phase === src.desiredState ? '' : ` (desired: ${src.desiredState})`}`, {
        phase: src.phase,
        desiredState: src.desiredState,
      });
    }
    const node = await this.store.getNode(src.nodeId, tx);
    if (!node) throw new DomainError('unavailable', `the node of box "${src.name}" is gone`, { name: src.name });
    const boxes: BoxRecord[] = [];
    for (const name of names) {
      if (await this.store.getBoxByName(subject.name, name, tx)) throw new DomainError('conflict', `a box named "${name}" already exists`, { field: 'name', name });
      const box: BoxRecord = {
        id: newId('b'),
        name,
        owner: subject.name,
        orgId: subject.orgId,
        templateName: src.templateName,
        templateVersion: src.templateVersion,
        image: src.image,
        runtime: src.runtime,
        desiredState: 'running',
        phase: 'provisioning',
        generation: 1,
        observedGeneration: 0,
        nodeId: node.id,
        computeReserved: true,
        resources: src.resources,
        env: { ...src.env },
        attempt: 1,
        lastError: null,
        nextAttemptAt: null,
        conditions: setCondition([], { type: 'Scheduled', status: 'True', reason: 'Forked', message: `placed on ${node.name} with its fork source ${src.name}` }, now),
        ip: null,
        createdAt: now,
        updatedAt: now,
        deletedAt: null,
        version: 1,
        forkOf: src.id,
        moveFromNodeId: null,
        cleanupNodeId: null,
      };
      // Each check sees the clones inserted before it: N boxes are counted as N.
      if (this.tenancy) await this.tenancy.quotas.check(box, tx);
      await this.store.insertBox(box, tx);
      await this.recordChange(tx, box, 'Created', `forked from box ${src.name} (owner ${src.owner}) by ${subject.name}`);
      await this.store.appendEvent({ boxId: box.id, boxName: name, owner: box.owner, time: now, type: 'Scheduled', phase: box.phase, message: `placed on node ${node.name}, where its fork source runs` }, tx);
      boxes.push(box);
    }
    // The scheduler's own filter, over the one node that may take the clones, for all of them at once.
    const total = names.reduce((sum) => add(sum, src.resources), { ...ZERO });
    const why = filterNode(nodeSnapshot(node, now), { runtime: src.runtime, resources: total });
    if (why.length > 0) {
      throw new DomainError('no-capacity', `cannot fork ${names.length === 1 ? 'a box' : `${names.length} boxes`} of ${src.name} onto its node ${node.name}: ${why.join(', ')}`, {
        node: node.name,
        reasons: why,
      });
    }
    await this.store.updateNode({ ...node, allocated: add(node.allocated, total) }, node.version, tx);
    await this.store.appendEvent({ boxId: src.id, boxName: src.name, owner: src.owner, time: now, type: 'Forked', phase: src.phase, message: `forked into ${names.join(', ')} by ${subject.name}` }, tx);
    return { boxes, nodeId: node.id };
  }

  /**
   * Moves a paused microvm box to another node (`node`, or the scheduler's pick among the others).
   * The box is bound to the new node at once, with `moveFromNodeId` naming the node it is paused
   * on: that node's agent keeps it and serves its snapshot and disks, the new node's agent pulls
   * them (NodeService.desiredSet tells both), and the move completes when the new node reports the
   * box paused (or goes back when its import fails: the reconciler's `abort-move`). One
   * transaction: the checks, the box's reservation taken on the new node (the scheduler's filter,
   * optimistic on the node's version, as scheduling does) and released on the old one, and a new
   * generation, so both agents see a new operation.
   */
  async move(subject: Subject, name: string, req: MoveBoxRequest, owner?: string): Promise<BoxRecord> {
    for (let attempt = 1; ; attempt++) {
      try {
        const { box, from } = await this.store.transaction((tx) => this.moveIn(tx, subject, name, req.node, owner));
        this.feed.emit('box', box);
        this.feed.emit('node', from);
        this.feed.emit('node', box.nodeId!);
        return box;
      } catch (e) {
        if (!isNodeRace(e) || attempt >= 3) throw e;
      }
    }
  }

  private async moveIn(tx: Executor, subject: Subject, name: string, nodeName: string | undefined, owner: string | undefined): Promise<{ box: BoxRecord; from: string }> {
    const now = this.now();
    const box = await this.authorized(subject, name, 'manage', owner, tx);
    if (box.runtime !== 'microvm') {
      throw new DomainError('invalid-state', `move needs a microvm box; ${box.name} runs on ${box.runtime}`, { runtime: box.runtime });
    }
    if (box.moveFromNodeId !== null) {
      const [from, to] = await this.nodeNames([box.moveFromNodeId, box.nodeId], tx);
      throw new DomainError('invalid-state', `box ${box.name} is already moving from node ${from} to node ${to}`, { from, to });
    }
    if (box.cleanupNodeId !== null) {
      // One copy left behind at a time: the next move could otherwise target the node that is deleting it.
      const [left] = await this.nodeNames([box.cleanupNodeId], tx);
      throw new DomainError('invalid-state', `the copy of box ${box.name} left on node ${left} by its last move is not deleted yet; move it once it is`, { node: left });
    }
    if (box.desiredState !== 'paused' || box.phase !== 'paused' || box.observedGeneration !== box.generation || box.nodeId === null) {
      const state = box.phase === box.desiredState ? box.phase : `${box.phase} (desired: ${box.desiredState})`;
      throw new DomainError('invalid-state', `move needs a paused box; ${box.name} is ${state}`, { phase: box.phase, desiredState: box.desiredState });
    }
    const from = await this.store.getNode(box.nodeId, tx);
    if (!from) throw new DomainError('unavailable', `the node of box "${box.name}" is gone`, { name: box.name });
    if (from.leaseExpiresAt <= now) {
      // Its agent is the only place the snapshot can come from.
      throw new DomainError('invalid-state', `node ${from.name} is not ready: the snapshot of ${box.name} is on it and there is no snapshot store to fetch it from`, { node: from.name });
    }
    const request = { runtime: box.runtime, resources: box.resources, image: box.image };
    let to: NodeRecord;
    if (nodeName !== undefined) {
      const named = await this.store.getNodeByName(nodeName, tx);
      if (!named) throw new DomainError('not-found', `node "${nodeName}" not found`, { node: nodeName });
      if (named.id === from.id) throw new DomainError('invalid-state', `box ${box.name} is on node ${from.name} already; name another node`, { node: from.name });
      const why = filterNode(nodeSnapshot(named, now), request);
      if (why.length > 0) {
        // Only full: no capacity; otherwise the node cannot take the box at all now.
        const full = why.length === shortfall(named.capacity, named.allocated, box.resources).length;
        throw new DomainError(full ? 'no-capacity' : 'invalid-state', `cannot move ${box.name} to node ${named.name}: ${why.join(', ')}`, { node: named.name, reasons: why });
      }
      to = named;
    } else {
      const others = (await this.store.listNodes(tx)).filter((n) => n.id !== from.id);
      const result = schedule(others.map((n) => nodeSnapshot(n, now)), request);
      if (!result.ok) {
        const why = others.length === 0 ? `there is no node besides ${from.name}` : describeRejection(result.reasons);
        throw new DomainError('no-capacity', `cannot move ${box.name}: ${why}`, { reasons: result.reasons });
      }
      to = others.find((n) => n.id === result.nodeId)!;
    }
    // The box needs its full reservation where it goes; the old node holds what the box held there.
    await this.store.updateNode({ ...to, allocated: add(to.allocated, box.resources) }, to.version, tx);
    await this.store.updateNode({ ...from, allocated: subtract(from.allocated, box.computeReserved ? box.resources : diskOnly(box.resources)) }, from.version, tx);
    const next: BoxRecord = {
      ...box,
      nodeId: to.id,
      moveFromNodeId: from.id,
      computeReserved: true,
      phase: 'provisioning',
      generation: box.generation + 1,
      attempt: 1,
      lastError: null,
      nextAttemptAt: null,
      updatedAt: now,
      conditions: setCondition(box.conditions, { type: 'Scheduled', status: 'True', reason: 'Moving', message: `moving from ${from.name} to ${to.name}` }, now),
    };
    const saved = await this.store.updateBox(next, box.version, tx);
    await this.recordChange(tx, saved, 'MoveRequested', `move from node ${from.name} to node ${to.name} requested by ${subject.name}`);
    return { box: saved, from: from.id };
  }

  /** Node names by id, in order (the id itself for a node that is gone). */
  private async nodeNames(ids: ReadonlyArray<string | null>, ex: Executor): Promise<string[]> {
    const out: string[] = [];
    for (const id of ids) out.push(id === null ? '-' : ((await this.store.getNode(id, ex))?.name ?? id));
    return out;
  }

  get(subject: Subject, name: string, opts: { owner?: string; need?: BoxAccess } = {}): Promise<BoxRecord> {
    return this.authorized(subject, name, opts.need ?? 'read', opts.owner);
  }

  /**
   * One page of the boxes of the caller's organization that the caller may see, oldest first,
   * without their env. The store filters by organization and, for members, by ownership and team
   * shares; the policy then checks each box again, so the SQL can only narrow what the rules allow.
   * `next` is where the following page starts; absent on the last page.
   */
  async list(subject: Subject, page: { limit: number; after?: BoxCursor }): Promise<{ items: BoxListing[]; next?: BoxCursor }> {
    const rows = await this.store.listOrgBoxes({
      orgId: subject.orgId,
      excludeOwner: WARM_POOL_OWNER,
      visibleTo: subject.kind === 'system' || seesEveryBox(subject.role) ? undefined : { owner: subject.name, teamIds: subject.teamIds },
      limit: page.limit,
      after: page.after,
    });
    const shares = this.tenancy ? await this.tenancy.tenancy.sharesOf(rows.map((b) => b.id)) : new Map<string, Array<{ teamId: string; access: string }>>();
    const items = rows.filter((b) => subject.kind === 'system' || boxAccess(viewerOf(subject), sharedBox(b, shares.get(b.id) ?? [])) !== 'none');
    const last = rows.at(-1);
    return { items, ...(rows.length === page.limit && last ? { next: { createdAt: last.createdAt, id: last.id } } : {}) };
  }

  /** Every box the caller may see, a page at a time (a watcher's first snapshot). */
  async *listAll(subject: Subject): AsyncGenerator<BoxListing> {
    let after: BoxCursor | undefined;
    do {
      const page = await this.list(subject, { limit: BOX_PAGE_MAX, after });
      yield* page.items;
      after = page.next;
    } while (after);
  }

  /** Applies a lifecycle verb. `ifMatch` is the box version the caller saw (ETag), if it sent one. */
  async applyVerb(subject: Subject, name: string, verb: Verb, ifMatch?: number, owner?: string): Promise<BoxRecord> {
    const now = this.now();
    const { box, changed } = await this.store.transaction(async (tx) => {
      const cur = await this.authorized(subject, name, 'manage', owner, tx);
      if (ifMatch !== undefined && ifMatch !== cur.version) {
        throw new DomainError('precondition-failed', `box "${name}" changed since version ${ifMatch} (now ${cur.version})`, { version: cur.version });
      }
      const plan = planVerb(cur, verb);
      if (!plan.changed) return { box: cur, changed: false };
      if (cur.moveFromNodeId !== null && verb !== 'delete') {
        // The new node's agent is importing the paused box: it takes no other operation meanwhile.
        const [from, to] = await this.nodeNames([cur.moveFromNodeId, cur.nodeId], tx);
        throw new DomainError('invalid-state', `box ${cur.name} is moving from node ${from} to node ${to}; ${verb} it once the move is done`, { verb, from, to });
      }
      const next: BoxRecord = {
        ...cur,
        desiredState: plan.desiredState,
        phase: plan.phase,
        generation: cur.generation + 1,
        attempt: 1,
        lastError: null,
        nextAttemptAt: null,
        updatedAt: now,
        // Deleted during a move: the node it was moving from deletes its copy too.
        ...(cur.moveFromNodeId !== null ? { moveFromNodeId: null, cleanupNodeId: cur.moveFromNodeId } : {}),
      };
      if ((verb === 'start' || verb === 'resume') && this.tenancy) {
        if (!mayRunIn(cur.runtime, await this.tenancy.tenancy.orgTrusted(cur.orgId, tx))) {
          throw new DomainError('forbidden', `box ${cur.name} runs in the sandbox, which this organization is no longer trusted to use: recreate it (it will run in a microVM)`, { runtime: cur.runtime });
        }
        await this.tenancy.quotas.check(next, tx);
      }
      const saved = await this.store.updateBox(next, cur.version, tx);
      await this.recordChange(tx, saved, verb === 'delete' ? 'DeleteRequested' : `${verb[0]!.toUpperCase()}${verb.slice(1)}Requested`, `${verb} requested by ${subject.name}`);
      return { box: saved, changed: true };
    });
    if (changed) {
      this.feed.emit('box', box);
      if (box.nodeId) this.feed.emit('node', box.nodeId);
      if (box.cleanupNodeId) this.feed.emit('node', box.cleanupNodeId);
    }
    return box;
  }

  async events(subject: Subject, name: string, owner?: string) {
    const box = await this.get(subject, name, { owner });
    return { box, events: await this.store.listEvents({ boxId: box.id }) };
  }

  /** Signs a short-lived token the box's node agent accepts for one command session. */
  async createExecSession(subject: Subject, name: string, owner?: string): Promise<{ url: string; token: string; expiresAt: number }> {
    const box = await this.get(subject, name, { owner, need: 'connect' });
    if (box.phase !== 'running' || box.desiredState !== 'running') {
      throw new DomainError('invalid-state', `box "${name}" is ${box.phase}, not running; start or resume it first`, { phase: box.phase });
    }
    const node = box.nodeId ? await this.store.getNode(box.nodeId) : undefined;
    if (!node) throw new DomainError('unavailable', `box "${name}" has no node`, {});
    const expiresAt = this.now() + 60_000;
    const token = signSessionToken({ boxId: box.id, sub: subject.name, exp: expiresAt }, node.sessionKey);
    const url = `${node.agentUrl.replace(/^http/, 'ws')}/v1/boxes/${box.id}/exec`;
    return { url, token, expiresAt };
  }

  /** Appends the event and the operation record that go with a change of desired state. */
  private async recordChange(tx: Executor, box: BoxRecord, type: string, message: string): Promise<void> {
    await this.store.appendEvent({ boxId: box.id, boxName: box.name, owner: box.owner, time: box.updatedAt, type, phase: box.phase, message }, tx);
    await this.store.upsertOperation(
      {
        id: `${box.id}:${box.generation}.${box.attempt}`,
        box_id: box.id,
        target_state: box.desiredState,
        generation: box.generation,
        attempt: box.attempt,
        state: 'pending',
        error: null,
        created_at: box.updatedAt,
        finished_at: null,
      },
      tx,
    );
  }
}

/** The template's image with the digest it was pinned to at publish time: every box runs exactly that. */
export function pinnedImage(image: string, digest: string | null): string {
  return digest && !image.includes('@') ? `${image}@${digest}` : image;
}
