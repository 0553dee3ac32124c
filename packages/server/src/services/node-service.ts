/**
 * The control plane's side of the agent protocol: registration, heartbeats (the node lease), the
 * desired set each node must run, and the phases agents observe. Agents dial in; the server never
 * needs to reach a node to keep a box alive.
 */
import { randomBytes } from 'node:crypto';
import { BoxSetupSchema, type BoxSetup, type DesiredBox, type DesiredPrebuild, type PrebuildReport, type BoxStatusReport, type DesiredSet, type RegisterNodeRequest } from '@devyard/api/node-schemas';
import { signSessionToken } from '@devyard/api/session-tokens';
import { agentDesired, backoffMs, DEFAULT_RETRY_POLICY, type RetryPolicy } from '@devyard/core/box-reconcile';
import { AGENT_PHASES, TARGET_PHASE, type DesiredState } from '@devyard/core/box-lifecycle';
import { DomainError } from '@devyard/core/domain-error';
import { ZERO } from '@devyard/core/resources';
import type { BoxSecret } from '@devyard/api/secret-schemas';
import type { ChangeFeed } from '../change-feed.js';
import { newId } from '../ids.js';
import { hashToken } from '../token-hash.js';
import { setCondition, type BoxRecord } from '../store/box-records.js';
import { pinnedImage, WARM_POOL_OWNER } from './box-service.js';
import type { Executor, NodeRecord, Store, TemplateRecord } from '../store/store.js';

export const NODE_LEASE_MS = 20_000;

/** The subject of the node join token (bootstrap-tokens.ts): it registers new nodes, nothing else. */
export const JOIN_SUBJECT = 'node';
/** The subject of one node's own credential. */
export const nodeSubject = (nodeId: string) => `node:${nodeId}`;

/** How long the token a new node fetches a moving box's snapshot with is valid (each desired set signs a fresh one). */
export const RESTORE_TOKEN_TTL_MS = 15 * 60_000;

export class NodeService {
  private revision = 0;
  private readonly templateCache = new Map<string, TemplateRecord>();
  /** Called with the box's creation time when it first reports running (provisioning latency). */
  onRunning?: (createdAt: number) => void;
  /** Decrypts the secrets of boxes for their desired entries; none when unset. */
  secrets?: { forBoxes(boxes: readonly BoxRecord[]): Promise<Map<string, BoxSecret[]>> };
  /** Last progress message per box, so repeats of the same line add no event. */
  private readonly lastProgress = new Map<string, string>();

  constructor(
    private readonly store: Store,
    private readonly feed: ChangeFeed,
    private readonly now: () => number,
    private readonly retry: RetryPolicy = DEFAULT_RETRY_POLICY,
  ) {}

  /**
   * Registers a new node (with the join token: `caller` is `node`) and gives it its own credential,
   * or re-registers an existing one (with that node's credential: `caller` is `node:<id>`). The
   * join token alone never reaches an existing node: re-registering returns the node's session key,
   * which signs every session into its boxes, and the node's desired set carries its boxes' secrets.
   */
  async register(req: RegisterNodeRequest, caller: string): Promise<{ node: NodeRecord; leaseSeconds: number; credential: string | null }> {
    const now = this.now();
    let credential: string | null = null;
    const node = await this.store.transaction(async (tx) => {
      const cur = await this.store.getNodeByName(req.name, tx);
      if (cur && caller !== nodeSubject(cur.id)) {
        throw new DomainError('forbidden', `a node named "${req.name}" is registered already: only that node re-registers, with its own credential (kept in its agent's data dir)`, { name: req.name });
      }
      if (!cur && caller !== JOIN_SUBJECT) throw new DomainError('forbidden', "a node's credential only re-registers that node; register a new node with the join token", { name: req.name });
      const fields = {
        arch: req.arch,
        region: req.region,
        labels: req.labels,
        runtimes: req.runtimes,
        capacity: req.capacity,
        images: req.images,
        agentUrl: req.agentUrl,
        leaseExpiresAt: now + NODE_LEASE_MS,
      };
      if (cur) return this.store.updateNode({ ...cur, ...fields }, cur.version, tx);
      const created: NodeRecord = {
        id: newId('n'),
        name: req.name,
        ...fields,
        allocated: { ...ZERO },
        // The key signs session tokens for this node; kept across re-registrations so tokens stay valid.
        sessionKey: randomBytes(32).toString('hex'),
        cordoned: false,
        registeredAt: now,
        version: 1,
      };
      await this.store.insertNode(created, tx);
      credential = `dy_n_${randomBytes(24).toString('base64url')}`;
      await this.store.insertToken({ id: newId('t'), token_hash: hashToken(credential), name: `node ${req.name}`, kind: 'node', subject: nodeSubject(created.id), created_at: now }, tx);
      return created;
    });
    this.feed.emit('node', node.id);
    return { node, leaseSeconds: NODE_LEASE_MS / 1000, credential };
  }

  /** Refuses (403) a caller that is not the node itself: a node reads and reports only its own state. */
  requireSelf(caller: string, nodeId: string): void {
    if (caller !== nodeSubject(nodeId)) throw new DomainError('forbidden', "a node reads and reports only its own state, with its own credential (the join token only registers new nodes)", { nodeId });
  }

  async heartbeat(nodeId: string, images?: string[]): Promise<number> {
    const now = this.now();
    for (;;) {
      const cur = await this.requireNode(nodeId);
      try {
        const next = await this.store.updateNode({ ...cur, leaseExpiresAt: now + NODE_LEASE_MS, images: images ?? cur.images }, cur.version);
        return next.leaseExpiresAt;
      } catch (e) {
        // Lost a race with a capacity reservation on the same row: read again and renew.
        if (e instanceof DomainError && e.code === 'conflict') continue;
        throw e;
      }
    }
  }

  async requireNode(nodeId: string): Promise<NodeRecord> {
    const node = await this.store.getNode(nodeId);
    if (!node) throw new DomainError('not-found', `node ${nodeId} is not registered; register first`, { nodeId });
    return node;
  }

  /**
   * What the node must run: the boxes bound to it, plus what it still holds of boxes bound
   * elsewhere. While a box moves here, its entry carries `restoreFrom` (the old node's agent and a
   * token for the box signed with that node's key). The node a box is moving from keeps an entry
   * with the box paused (its agent keeps the snapshot to hand over); the node that must delete its
   * copy after a move (`cleanupNodeId`) gets the box as deleted until it reports it gone.
   */
  async desiredSet(nodeId: string): Promise<DesiredSet> {
    const node = await this.requireNode(nodeId);
    const boxes = await this.store.listBoxes({ nodeId });
    const leftHere = (await this.store.listBoxesLeftOn(nodeId)).filter((b) => b.nodeId !== nodeId);
    const templates = new Map<string, TemplateRecord | undefined>();
    for (const b of [...boxes, ...leftHere]) {
      const key = `${b.templateName}:${b.templateVersion}`;
      if (!templates.has(key)) templates.set(key, await this.templateVersion(b.templateName, b.templateVersion));
    }
    // Secrets go only to boxes that should run or be paused: a stopped box has nowhere to keep them.
    const withCompute = boxes.filter((b) => ['running', 'paused'].includes(agentDesired(b).desiredState));
    const secrets = (await this.secrets?.forBoxes(withCompute)) ?? new Map<string, BoxSecret[]>();
    const now = this.now();
    const entry = (b: BoxRecord, desiredState: DesiredState, boxSecrets: BoxSecret[], restoreFrom: DesiredBox['restoreFrom']): DesiredBox => {
      const d = agentDesired(b);
      return {
        boxId: b.id,
        name: b.name,
        desiredState,
        generation: d.generation,
        operationId: d.operationId,
        image: b.image,
        runtime: b.runtime,
        resources: b.resources,
        env: b.env,
        setup: setupOf(templates.get(`${b.templateName}:${b.templateVersion}`)),
        templateName: b.templateName,
        templateVersion: b.templateVersion,
        pooled: b.owner === WARM_POOL_OWNER,
        secrets: boxSecrets,
        forkOf: b.forkOf,
        restoreFrom,
      };
    };
    const out: DesiredBox[] = [];
    for (const b of boxes) {
      let restoreFrom: DesiredBox['restoreFrom'] = null;
      if (b.moveFromNodeId !== null) {
        const from = await this.store.getNode(b.moveFromNodeId);
        // Signed with the old node's key: its agent verifies it offline, like an exec session's.
        if (from) restoreFrom = { agentUrl: from.agentUrl, token: signSessionToken({ boxId: b.id, sub: `node:${node.id}`, exp: now + RESTORE_TOKEN_TTL_MS }, from.sessionKey) };
      }
      out.push(entry(b, agentDesired(b).desiredState, secrets.get(b.id) ?? [], restoreFrom));
    }
    // Bound elsewhere: no secrets (the box no longer runs here) and nothing to restore from.
    for (const b of leftHere) out.push(entry(b, b.moveFromNodeId === nodeId ? 'paused' : 'deleted', [], null));
    return { nodeId, revision: ++this.revision, boxes: out, prebuilds: await this.desiredPrebuilds(node) };
  }

  /**
   * Every latest template version with a repository and a runtime this node offers: the node
   * keeps its prebuild current, so a new version or a new commit on the tracked ref is built ahead
   * of the next create.
   */
  private async desiredPrebuilds(node: NodeRecord): Promise<DesiredPrebuild[]> {
    const out: DesiredPrebuild[] = [];
    for (const t of await this.store.listTemplates()) {
      if (!t.spec.repository || !node.runtimes.includes(t.runtime)) continue;
      out.push({ templateName: t.name, templateVersion: t.version, image: pinnedImage(t.image, t.imageDigest), setup: setupOf(t) });
    }
    return out;
  }

  /** Records the prebuilds a node finished; they are what `templates prebuilds` shows. */
  async reportPrebuilds(nodeId: string, reports: PrebuildReport[]): Promise<void> {
    const now = this.now();
    for (const p of reports) {
      await this.store.upsertPrebuild({
        node_id: nodeId,
        id: p.prebuildId,
        template_name: p.templateName,
        template_version: p.templateVersion,
        commit_sha: p.commit,
        status: p.status,
        error: p.error,
        log_tail: JSON.stringify(p.logTail),
        finished_at: now,
      });
    }
  }

  /**
   * Records what an agent observed. Reports are accepted only for boxes bound to that node and
   * only if not older than what was already observed, so duplicated, reordered or stale reports
   * cannot move a box backwards. A node that still holds a box bound elsewhere (a move's old node)
   * is heard only when it says its copy is deleted; the new node reporting the moved box paused
   * completes the move.
   */
  async report(nodeId: string, reports: BoxStatusReport[]): Promise<void> {
    const now = this.now();
    const changed: BoxRecord[] = [];
    const nodesChanged = new Set<string>();
    for (const r of reports) {
      if (!AGENT_PHASES.has(r.phase)) throw new DomainError('invalid-input', `phase "${r.phase}" cannot be reported by an agent`, { field: 'phase' });
      const saved = await this.store.transaction(async (tx) => {
        const box = await this.store.getBox(r.boxId, tx);
        if (!box) return null;
        if (box.nodeId !== nodeId || box.deletedAt !== null) {
          if (box.cleanupNodeId !== nodeId || r.phase !== 'deleted' || r.error) return null;
          // The copy a move left behind is gone: nothing of the box remains on that node.
          const stored = await this.store.updateBox({ ...box, cleanupNodeId: null, updatedAt: now }, box.version, tx);
          const [left] = await this.nodeNames([nodeId], tx);
          await this.store.appendEvent({ boxId: box.id, boxName: box.name, owner: box.owner, time: now, type: 'MoveCleanedUp', phase: stored.phase, message: `the copy on node ${left} is deleted` }, tx);
          nodesChanged.add(nodeId);
          return stored;
        }
        if (r.observedGeneration < box.observedGeneration || r.observedGeneration > box.generation) return null;
        const current = r.observedGeneration === box.generation;
        const attempt = Number(r.operationId.split('.').pop()) || box.attempt;
        const failedNow = box.phase === 'failed';
        const next: BoxRecord = { ...box, observedGeneration: r.observedGeneration, ip: r.ip ?? box.ip, updatedAt: now };
        if (current && !failedNow) next.phase = r.phase;
        const events: Array<{ type: string; message: string }> = [];
        if (current && r.error && attempt === box.attempt && !(box.lastError?.generation === box.generation && box.lastError.attempt === attempt)) {
          next.lastError = { generation: box.generation, attempt, message: r.error };
          next.nextAttemptAt = now + backoffMs(this.retry, attempt);
          events.push({ type: 'OperationFailed', message: `attempt ${attempt}: ${r.error}` });
          await this.store.upsertOperation({ id: r.operationId, box_id: box.id, target_state: box.desiredState, generation: box.generation, attempt, state: 'failed', error: r.error, created_at: now, finished_at: now }, tx);
        }
        if (next.phase !== box.phase) events.push({ type: 'PhaseChanged', message: `${box.phase} → ${next.phase}` });
        // Progress lines (image pull, unpack, checkout, hooks) become events when they change.
        if (r.phase === 'deleted') this.lastProgress.delete(box.id);
        else if (current && r.message && this.lastProgress.get(box.id) !== r.message) {
          this.lastProgress.set(box.id, r.message);
          events.push({ type: 'Progress', message: r.message });
        }
        if (current && !r.error && next.phase === TARGET_PHASE[box.desiredState] && box.phase !== next.phase) {
          await this.store.upsertOperation({ id: r.operationId, box_id: box.id, target_state: box.desiredState, generation: box.generation, attempt, state: 'succeeded', error: null, created_at: now, finished_at: now }, tx);
        }
        if (box.moveFromNodeId !== null && current && !r.error && r.phase === 'paused') {
          // The new node has the box whole: the old one may delete its copy now.
          const [from, to] = await this.nodeNames([box.moveFromNodeId, nodeId], tx);
          next.moveFromNodeId = null;
          next.cleanupNodeId = box.moveFromNodeId;
          next.conditions = setCondition(box.conditions, { type: 'Scheduled', status: 'True', reason: 'Moved', message: `moved from ${from} to ${to}` }, now);
          events.push({ type: 'Moved', message: `moved from node ${from} to node ${to}; the copy on ${from} is deleted next` });
          nodesChanged.add(box.moveFromNodeId);
        }
        const unchanged = events.length === 0 && next.ip === box.ip && next.observedGeneration === box.observedGeneration;
        if (unchanged) return null;
        const stored = await this.store.updateBox(next, box.version, tx);
        if (next.phase === 'running' && box.generation === 1 && box.phase !== 'running') this.onRunning?.(box.createdAt);
        for (const e of events) await this.store.appendEvent({ boxId: box.id, boxName: box.name, owner: box.owner, time: now, type: e.type, phase: stored.phase, message: e.message }, tx);
        return stored;
      });
      if (saved) changed.push(saved);
    }
    for (const b of changed) this.feed.emit('box', b);
    // Their desired sets changed (a move's old node: its copy is to be deleted, or is gone).
    for (const id of nodesChanged) this.feed.emit('node', id);
  }

  /** Node names by id, in order (the id itself for a node that is gone). */
  private async nodeNames(ids: readonly string[], ex: Executor): Promise<string[]> {
    const out: string[] = [];
    for (const id of ids) out.push((await this.store.getNode(id, ex))?.name ?? id);
    return out;
  }

  /** Template versions are immutable: each is read from the store once. */
  private async templateVersion(name: string, version: number): Promise<TemplateRecord | undefined> {
    const key = `${name}:${version}`;
    if (!this.templateCache.has(key)) {
      const t = await this.store.getTemplate(name, version);
      if (!t) return undefined;
      this.templateCache.set(key, t);
    }
    return this.templateCache.get(key);
  }

  async list(): Promise<Array<{ node: NodeRecord; boxes: number }>> {
    const nodes = await this.store.listNodes();
    const boxes = await this.store.listBoxes();
    return nodes.map((node) => ({ node, boxes: boxes.filter((b) => b.nodeId === node.id).length }));
  }

  async setCordoned(name: string, cordoned: boolean): Promise<NodeRecord> {
    for (;;) {
      const cur = await this.store.getNodeByName(name);
      if (!cur) throw new DomainError('not-found', `node "${name}" not found`, { name });
      try {
        return await this.store.updateNode({ ...cur, cordoned }, cur.version);
      } catch (e) {
        if (e instanceof DomainError && e.code === 'conflict') continue;
        throw e;
      }
    }
  }
}

/** What the agent must do to set a box up, from its template version's spec. */
function setupOf(t: TemplateRecord | undefined): BoxSetup {
  const spec = t?.spec;
  const hooks = spec?.hooks ?? {};
  return BoxSetupSchema.parse({
    repository: spec?.repository ? { url: spec.repository.url, ref: spec.repository.ref ?? null, credentialsSecret: spec.repository.credentialsSecret ?? null } : null,
    build: spec?.build ? { packages: spec.build.packages ?? [], run: spec.build.run ?? [] } : null,
    onCreate: hooks.onCreate ?? null,
    updateContent: hooks.updateContent ?? null,
    postCreate: hooks.postCreate ?? null,
    postStart: hooks.postStart ?? null,
    // A repository is checked out and its onCreate/updateContent run once per commit, then cloned.
    prebuild: Boolean(spec?.repository),
    templateEnv: spec?.env ?? {},
  });
}
