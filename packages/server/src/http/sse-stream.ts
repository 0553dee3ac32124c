/** A Server-Sent Events response on a hijacked Fastify reply, with keep-alives and cleanup. */
import type { FastifyReply, FastifyRequest } from 'fastify';

export interface SseStream {
  send(event: string, data: unknown, id?: number): void;
  /** Resolves when the client goes away. */
  closed: Promise<void>;
  close(): void;
}

/**
 * Bytes a stream may have queued for a client that does not read. Past it the server ends the
 * stream rather than hold more for it: a slow or stalled reader cannot grow the server's memory,
 * and a client that wants every event reconnects with Last-Event-ID.
 */
export const SSE_MAX_BUFFERED_BYTES = 4 * 1024 * 1024;

export function openSse(req: FastifyRequest, reply: FastifyReply, keepAliveMs = 15_000, maxBufferedBytes = SSE_MAX_BUFFERED_BYTES): SseStream {
  reply.hijack();
  const res = reply.raw;
  res.writeHead(200, {
    'content-type': 'text/event-stream; charset=utf-8',
    'cache-control': 'no-cache, no-transform',
    connection: 'keep-alive',
    'x-accel-buffering': 'no',
  });
  res.write(': devyard watch\n\n');
  let open = true;
  let resolveClosed!: () => void;
  const closed = new Promise<void>((r) => (resolveClosed = r));
  const keepAlive = setInterval(() => open && res.write(': keep-alive\n\n'), keepAliveMs);
  const finish = () => {
    if (!open) return;
    open = false;
    clearInterval(keepAlive);
    resolveClosed();
  };
  req.raw.on('close', finish);
  res.on('close', finish);
  return {
    send(event, data, id) {
      if (!open) return;
      res.write(`${id !== undefined ? `id: ${id}\n` : ''}event: ${event}\ndata: ${JSON.stringify(data)}\n\n`);
      if (res.writableLength > maxBufferedBytes) {
        finish();
        res.destroy();
      }
    },
    closed,
    close() {
      finish();
      res.end();
    },
  };
}
