/**
 * The TCP tunnel protocol over one WebSocket, used gateway → agent (a connection to a port inside a
 * box) and CLI → gateway (`devyard port-forward`, `devyard ssh --stdio`). Binary frames carry the
 * stream's bytes unchanged; a text frame `{"type":"eof"}` says the sender finished writing (TCP
 * half-close, which SSH channels and some protocols rely on); closing the WebSocket closes both
 * directions. A refused dial closes with code 4404 (nothing listens) or 4403 (not allowed) and a
 * reason the client shows.
 */
import { z } from 'zod';

export const TunnelControlSchema = z.object({ type: z.literal('eof') });

export type TunnelControl = z.infer<typeof TunnelControlSchema>;

/** WebSocket close codes for tunnels (4000–4999 are for applications). */
export const TUNNEL_CLOSE = {
  /** Nothing accepted the connection at the target port. */
  refused: 4404,
  /** The caller may not reach this port. */
  forbidden: 4403,
  /** The box is not running (stopped, paused or gone). */
  unavailable: 4503,
} as const;

/** Valid TCP port for a tunnel target. */
export const TunnelPortSchema = z.coerce.number().int().min(1).max(65535);
