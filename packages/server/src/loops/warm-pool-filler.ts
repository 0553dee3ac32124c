/**
 * Warm pools: per template, keep N boxes provisioned ahead so that `create` only claims one. Pool
 * boxes belong to the system subject `system:warm-pool` in the template's organization (they count
 * against its quota, only its members claim them, and they hold no secrets until claimed: the
 * template's hooks that run in the pool are written by any template publisher) and run the
 * template's latest version; the filler creates what is missing, retires boxes of older
 * versions and re-checks on every box or template change plus periodically. It only ever goes
 * through BoxService, so pool boxes are reconciled, scheduled and reported like any other box.
 */
import type { ChangeFeed } from '../change-feed.js';
import { DEFAULT_ORG_ID, WARM_POOL_OWNER, type BoxService, type Subject } from '../services/box-service.js';
import type { BoxRecord } from '../store/box-records.js';
import type { Store, TemplateRecord } from '../store/store.js';
import { orgOfBox, type AuditLog } from '../audit/audit-log.js';

export const WARM_POOL_SUBJECT: Subject = { name: WARM_POOL_OWNER, kind: 'system', orgId: DEFAULT_ORG_ID, role: 'owner', teamIds: [] };

/** The pool's subject in an organization: pool boxes are created and retired in their template's. */
const poolSubjectIn = (orgId: string): Subject => ({ ...WARM_POOL_SUBJECT, orgId });

export interface WarmPoolOptions {
  /** Pool size of a template version (0: no pool). */
  poolSize: (t: TemplateRecord) => number;
  periodMs?: number;
  log?: (msg: string, fields?: Record<string, unknown>) => void;
  /** Where pool boxes created and retired are recorded (actor `system:warm-pool`). */
  audit?: AuditLog;
}

export class WarmPoolFiller {
  private timer: NodeJS.Timeout | undefined;
  private pending: NodeJS.Timeout | undefined;
  private running: Promise<void> | null = null;
  private again = false;
  private seq = 0;
  private readonly onBox = (b: BoxRecord) => {
    if (b.owner === WARM_POOL_SUBJECT.name || b.deletedAt !== null) this.kick();
  };

  constructor(
    private readonly store: Store,
    private readonly feed: ChangeFeed,
    private readonly boxes: BoxService,
    private readonly opts: WarmPoolOptions,
  ) {}

  start(): void {
    this.feed.on('box', this.onBox);
    this.timer = setInterval(() => this.kick(), this.opts.periodMs ?? 5000);
    this.kick();
  }

  async stop(): Promise<void> {
    this.feed.off('box', this.onBox);
    clearInterval(this.timer);
    clearTimeout(this.pending);
    await this.running;
  }

  /** Coalesces bursts of changes into one pass. */
  kick(): void {
    if (this.running) {
      this.again = true;
      return;
    }
    clearTimeout(this.pending);
    this.pending = setTimeout(() => {
      this.running = this.fill()
        .catch((e) => this.opts.log?.('warm pool pass failed', { err: String(e) }))
        .finally(() => {
          this.running = null;
          if (this.again) {
            this.again = false;
            this.kick();
          }
        });
    }, 10);
  }

  /** One pass: top up every pool to its size and retire boxes of superseded template versions. */
  async fill(): Promise<void> {
    const templates = await this.store.listTemplates();
    const pool = await this.store.listBoxes({ owner: WARM_POOL_SUBJECT.name });
    const retired = new Set<string>();
    for (const t of templates) {
      const size = this.opts.poolSize(t);
      const mine = pool.filter((b) => b.templateName === t.name && b.desiredState !== 'deleted');
      for (const old of mine.filter((b) => b.templateVersion !== t.version)) await this.retire(old, `superseded by ${t.name} v${t.version}`, retired);
      const current = mine.filter((b) => b.templateVersion === t.version && b.phase !== 'failed');
      for (const extra of current.slice(size)) await this.retire(extra, `pool size is ${size}`, retired);
      for (let i = current.length; i < size; i++) {
        const name = `pool-${t.name}-${Date.now().toString(36)}${(this.seq++).toString(36)}`.slice(0, 40).replace(/-+$/, '');
        const { box } = await this.boxes.create(poolSubjectIn(t.orgId), { name, template: t.name, templateVersion: t.version });
        await this.record('createBox', box, { template: t.name, templateVersion: t.version });
      }
    }
    // A failed pool box helps nobody: delete it so the next pass replaces it.
    for (const b of pool.filter((x) => x.phase === 'failed' && x.desiredState !== 'deleted')) await this.retire(b, 'failed', retired);
  }

  // ---- audit ----
  /** Deletes a pool box once per pass (`retired`), so a box is not recorded twice. */
  private async retire(box: BoxRecord, reason: string, retired: Set<string>): Promise<void> {
    if (retired.has(box.id)) return;
    retired.add(box.id);
    const deleted = await this.boxes.applyVerb(poolSubjectIn(box.orgId), box.name, 'delete');
    await this.record('deleteBox', deleted, { reason });
  }

  /**
   * Records a pool change. BoxService owns the transaction of the change itself, so this entry
   * follows it in a transaction of its own: a crash in between loses the entry, not the change.
   */
  private async record(action: string, box: BoxRecord, detail: Record<string, unknown>): Promise<void> {
    if (!this.opts.audit) return;
    await this.opts.audit.append({ orgId: orgOfBox(box), actor: WARM_POOL_SUBJECT.name, action, target: `box/${box.name}`, result: 'ok', detail: { boxId: box.id, ...detail } });
  }
}
