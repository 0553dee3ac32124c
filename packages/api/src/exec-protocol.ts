/**
 * The command-session protocol over one WebSocket, spoken by the CLI (and later the gateway) with
 * the node agent. Binary frames carry stream bytes behind a one-byte channel id; text frames carry
 * JSON control messages.
 */
import { z } from 'zod';

export const CHANNEL = { stdin: 0, stdout: 1, stderr: 2 } as const;

export const ExecStartSchema = z
  .object({
    type: z.literal('start'),
    argv: z.array(z.string()).min(1),
    tty: z.boolean().default(false),
    cols: z.number().int().min(1).max(1000).default(80),
    rows: z.number().int().min(1).max(1000).default(24),
    env: z.record(z.string(), z.string()).default({}),
    cwd: z.string().optional(),
  })
  .strict();

export const ExecClientMessageSchema = z.discriminatedUnion('type', [
  ExecStartSchema,
  z.object({ type: z.literal('resize'), cols: z.number().int().min(1).max(1000), rows: z.number().int().min(1).max(1000) }),
  z.object({ type: z.literal('signal'), signal: z.enum(['SIGINT', 'SIGTERM', 'SIGKILL', 'SIGHUP', 'SIGQUIT']) }),
  /** The client's stdin ended. */
  z.object({ type: z.literal('eof') }),
]);

export type ExecStart = z.infer<typeof ExecStartSchema>;
export type ExecClientMessage = z.infer<typeof ExecClientMessageSchema>;

export type ExecServerMessage = { type: 'exit'; code: number } | { type: 'error'; message: string };

export function frame(channel: number, data: Uint8Array): Buffer {
  const out = Buffer.allocUnsafe(data.length + 1);
  out[0] = channel;
  out.set(data, 1);
  return out;
}
