/**
 * Client side of the tunnel protocol (`@devyard/api/tunnel-protocol`): a WebSocket turned into a
 * Duplex byte stream with TCP-like half-close, for port forwards and SSH-over-WebSocket.
 */
import { Duplex } from 'node:stream';
import WebSocket from 'ws';
import { TunnelControlSchema } from '@devyard/api/tunnel-protocol';

export interface TunnelOptions {
  /** ws:// or wss:// URL of the tunnel endpoint. */
  url: string;
  /** Bearer token for the endpoint. */
  token: string;
  /** Pause reading from the source while this many bytes wait in the WebSocket (default 4 MiB). */
  highWaterMark?: number;
}

/** Error of a tunnel the far end refused, with its WebSocket close code (4404, 4403, 4503…). */
export class TunnelError extends Error {
  constructor(
    /** WebSocket close code or HTTP status of a refused upgrade. */
    readonly code: number,
    message: string,
  ) {
    super(message);
  }
}

/** Wraps an open (or opening) WebSocket speaking the tunnel protocol as a Duplex. */
export function tunnelStream(ws: WebSocket, highWaterMark = 4 * 1024 * 1024): Duplex {
  let readingPaused = false;
  const stream = new Duplex({
    allowHalfOpen: true,
    read() {
      if (readingPaused) {
        readingPaused = false;
        ws.resume();
      }
    },
    write(chunk: Buffer, _enc, cb) {
      const send = () => {
        if (ws.readyState !== WebSocket.OPEN) return cb(new Error('tunnel closed'));
        ws.send(chunk, { binary: true }, (err) => (err ? cb(err) : undefined));
        // Backpressure: hold the callback while too much waits in the socket's buffer.
        const wait = () => (ws.bufferedAmount > highWaterMark && ws.readyState === WebSocket.OPEN ? setTimeout(wait, 2) : cb());
        wait();
      };
      if (ws.readyState === WebSocket.CONNECTING) ws.once('open', send);
      else send();
    },
    final(cb) {
      const end = () => {
        if (ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify({ type: 'eof' }));
        cb();
      };
      if (ws.readyState === WebSocket.CONNECTING) ws.once('open', end);
      else end();
    },
    destroy(err, cb) {
      if (ws.readyState === WebSocket.OPEN || ws.readyState === WebSocket.CONNECTING) ws.close();
      cb(err);
    },
  });
  ws.on('message', (data: Buffer, isBinary: boolean) => {
    if (!isBinary) {
      try {
        if (TunnelControlSchema.safeParse(JSON.parse(data.toString())).success) stream.push(null);
      } catch {}
      return;
    }
    if (!stream.push(data) && !readingPaused) {
      readingPaused = true;
      ws.pause();
    }
  });
  ws.on('close', (code, reason) => {
    if (code >= 4000) stream.destroy(new TunnelError(code, reason.toString() || `tunnel closed (${code})`));
    else {
      stream.push(null);
      if (!stream.writableFinished) stream.destroy();
    }
  });
  ws.on('unexpected-response', (_req, res) => {
    let body = '';
    res.on('data', (d: Buffer) => (body += d.toString()));
    res.on('end', () => stream.destroy(new TunnelError(res.statusCode ?? 0, body.trim().split('\n')[0] || `HTTP ${res.statusCode}`)));
  });
  ws.on('error', (e) => stream.destroy(e));
  return stream;
}

/** Opens a tunnel; the returned stream is writable at once (writes wait for the connection). */
export function openTunnel(opts: TunnelOptions): Duplex {
  const ws = new WebSocket(opts.url, { headers: { authorization: `Bearer ${opts.token}` }, perMessageDeflate: false });
  return tunnelStream(ws, opts.highWaterMark);
}
