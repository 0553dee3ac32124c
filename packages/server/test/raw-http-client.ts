/**
 * Sends bytes to a server's socket as they are and reads the answer: for what fetch refuses or
 * rewrites (duplicate and oversized headers, a chosen Host, malformed request lines and framing).
 */
import { connect } from 'node:net';

export interface RawHttpAnswer {
  /** 0 when the server closed the connection without an HTTP answer. */
  status: number;
  /** Header names lower-cased; repeated headers keep the last value. */
  headers: Record<string, string>;
  /** The body, de-chunked; empty for a stream (text/event-stream), which is cut off after its head. */
  body: string;
}

function dechunk(data: string): string {
  let out = '';
  let i = 0;
  for (;;) {
    const lineEnd = data.indexOf('\r\n', i);
    if (lineEnd < 0) return out;
    const size = parseInt(data.slice(i, lineEnd), 16);
    if (!Number.isFinite(size) || size === 0) return out;
    out += data.slice(lineEnd + 2, lineEnd + 2 + size);
    i = lineEnd + 2 + size + 2;
  }
}

function parse(raw: string): RawHttpAnswer {
  const headEnd = raw.indexOf('\r\n\r\n');
  const head = headEnd >= 0 ? raw.slice(0, headEnd) : raw;
  const [statusLine = '', ...lines] = head.split('\r\n');
  const headers: Record<string, string> = {};
  for (const l of lines) {
    const i = l.indexOf(':');
    if (i > 0) headers[l.slice(0, i).trim().toLowerCase()] = l.slice(i + 1).trim();
  }
  const rest = headEnd >= 0 ? raw.slice(headEnd + 4) : '';
  const body = /chunked/i.test(headers['transfer-encoding'] ?? '') ? dechunk(rest) : rest;
  // Bytes are read as latin1 so framing is exact; the body is UTF-8.
  return { status: Number(/^HTTP\/1\.[01] (\d{3})/.exec(statusLine)?.[1] ?? 0), headers, body: Buffer.from(body, 'latin1').toString('utf8') };
}

/** Writes `request` (latin1: one character per byte) to the server at `url` and reads until it closes. */
export function rawHttp(url: string, request: string, timeoutMs = 5000): Promise<RawHttpAnswer> {
  const u = new URL(url);
  return new Promise((resolve, reject) => {
    const s = connect(Number(u.port), u.hostname, () => s.write(request, 'latin1'));
    let raw = '';
    let settled = false;
    const done = () => {
      if (settled) return;
      settled = true;
      s.destroy();
      resolve(parse(raw));
    };
    s.setEncoding('latin1');
    s.on('data', (d: string) => {
      raw += d;
      // A stream never ends on its own: its head is the answer.
      const headEnd = raw.indexOf('\r\n\r\n');
      if (headEnd >= 0 && /\r\ncontent-type:\s*text\/event-stream/i.test(raw.slice(0, headEnd))) done();
    });
    s.on('end', done);
    s.on('close', done);
    s.on('error', (e: NodeJS.ErrnoException) => (e.code === 'ECONNRESET' || e.code === 'EPIPE' ? done() : reject(e)));
    s.setTimeout(timeoutMs, () => {
      settled = true;
      s.destroy();
      reject(new Error(`no answer within ${timeoutMs} ms to ${JSON.stringify(request.slice(0, 200))}`));
    });
  });
}
