/** Handlers of the audit routes: read-only, every read gated by `mayReadAudit`. */
import { Readable } from 'node:stream';
import type { AuditEntry, AuditQuery } from '@devyard/api/audit-schemas';
import { DomainError } from '@devyard/core/domain-error';
import { mayReadAudit, type AuditLog, type AuditRecord } from '../audit/audit-log.js';
import type { Subject } from '../services/box-service.js';
import type { HandlerContext, Handlers } from './create-app.js';

export function toApiAuditEntry(e: AuditRecord): AuditEntry {
  return {
    seq: e.seq,
    org: e.orgId,
    time: new Date(e.time).toISOString(),
    actor: e.actor,
    action: e.action,
    target: e.target,
    requestId: e.requestId,
    source: e.source,
    result: e.result,
    detail: e.detail,
    prevHash: e.prevHash,
    hash: e.hash,
  };
}

async function requireReader(subject: Subject): Promise<void> {
  if (!(await mayReadAudit(subject))) throw new DomainError('forbidden', 'you may not read the audit log of this organization');
}

export function createAuditHandlers(audit: AuditLog): Pick<Handlers, 'listAudit' | 'verifyAudit'> {
  return {
    listAudit: async (ctx: HandlerContext) => {
      await requireReader(ctx.subject);
      const q = ctx.query as AuditQuery;
      const filter = { orgId: ctx.subject.orgId, since: q.since !== undefined ? Date.parse(q.since) : undefined, actor: q.actor, afterSeq: q.afterSeq };
      if (q.format === 'jsonl') {
        void ctx.reply.type('application/x-ndjson').header('content-disposition', 'attachment; filename="audit.jsonl"');
        const lines = async function* () {
          for await (const e of audit.iterate(filter, q.limit ?? Infinity)) yield `${JSON.stringify(toApiAuditEntry(e))}\n`;
        };
        return Readable.from(lines());
      }
      return { items: (await audit.list({ ...filter, limit: q.limit ?? 100, order: q.order })).map(toApiAuditEntry) };
    },
    verifyAudit: async (ctx: HandlerContext) => {
      await requireReader(ctx.subject);
      return audit.verify(ctx.subject.orgId);
    },
  };
}
