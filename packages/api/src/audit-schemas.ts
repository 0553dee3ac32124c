/**
 * Schemas of the audit log API: read-only listing, the JSON Lines export and the chain
 * verification. There is deliberately no schema for changing or deleting entries: no route can.
 */
import { z } from 'zod';
import { TimestampSchema } from './common-schemas.js';
import { decimalInteger, inlineText } from './input-schemas.js';

export const AuditResultSchema = z
  .enum(['ok', 'denied', 'error'])
  .meta({ description: 'ok: 2xx/3xx; denied: 401/403/404 (refused or not visible); error: any other failure' });

export const AuditEntrySchema = z
  .object({
    seq: z.number().int().meta({ description: '1, 2, 3… per organization; a gap means a deleted entry' }),
    org: z.string(),
    time: TimestampSchema,
    actor: z.string().meta({ description: 'user or token subject, `system:<loop>` for background loops, `anonymous` when unauthenticated' }),
    action: z.string().meta({ description: 'operationId of the API route, or the system action' }),
    target: z.string().nullable().meta({ description: 'what was acted on, e.g. `box/demo`, `template/web`, `key/<id>`' }),
    requestId: z.string().nullable(),
    source: z.string().nullable().meta({ description: 'client address; null for system loops' }),
    result: AuditResultSchema,
    detail: z.record(z.string(), z.unknown()).nullable().meta({ description: 'e.g. `{status, code}` of a refused request' }),
    prevHash: z.string().meta({ description: 'hash of the previous entry of the org (64 zeros for the first)' }),
    hash: z.string().meta({ description: 'sha256(prevHash + canonical JSON of the entry), hex' }),
  })
  .meta({ id: 'AuditEntry' });

export const AuditListSchema = z.object({ items: z.array(AuditEntrySchema) }).meta({ id: 'AuditList' });

export const AuditQuerySchema = z.object({
  since: z.iso.datetime({ offset: true }).optional().meta({ description: 'RFC 3339: only entries at or after this time' }),
  actor: inlineText(200).optional().meta({ description: 'only entries of this actor' }),
  limit: decimalInteger(1, 1000).optional().meta({ description: 'at most this many entries (default 100; the JSON Lines export has no default limit)' }),
  afterSeq: decimalInteger(0, Number.MAX_SAFE_INTEGER).optional().meta({ description: 'only entries after this seq (forward paging)' }),
  order: z.enum(['asc', 'desc']).optional().meta({ description: 'asc (default): oldest first; desc: newest first' }),
  format: z.enum(['json', 'jsonl']).optional().meta({ description: 'jsonl: the export, one entry per line as application/x-ndjson, oldest first' }),
});

export const AuditVerificationSchema = z
  .object({
    ok: z.boolean(),
    entries: z.number().int().meta({ description: 'entries checked' }),
    seq: z.number().int().optional().meta({ description: 'first entry found tampered with (missing, edited or unlinked)' }),
    reason: z.string().optional(),
  })
  .meta({ id: 'AuditVerification' });

export type AuditEntry = z.infer<typeof AuditEntrySchema>;
export type AuditQuery = z.infer<typeof AuditQuerySchema>;
export type AuditVerification = z.infer<typeof AuditVerificationSchema>;
