/** Handlers of the audit routes: read-only; who may read is the routes' `audit:read` permission, checked for every request in create-app. */
import { Readable } from 'node:stream';
import type { AuditEntry, AuditQuery } from '@devyard/api/audit-schemas';
import type { AuditLog, AuditRecord } from '../audit/audit-log.js';
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

export function createAuditHandlers(audit: AuditLog): Pick<Handlers, 'listAudit' | 'verifyAudit'> {
  return {
    listAudit: async (ctx: HandlerContext) => {
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
      return audit.verify(ctx.subject.orgId);
    },
  };
}
