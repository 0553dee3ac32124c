/**
 * A server closes kept-alive connections that sat idle; a request sent on one in the moment
 * before the client notices fails with a socket error. The client sends an idempotent request once
 * more on a fresh connection, and never repeats one that is not idempotent.
 */
import { execFileSync } from 'node:child_process';
import { createServer, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { DevyardClient } from '@devyard/sdk/devyard-client';

let server: Server;
let url: string;
let posts = 0;

beforeAll(async () => {
  server = createServer((req, res) => {
    if (req.method === 'POST') posts++;
    res.writeHead(200, { 'content-type': 'application/json' }).end(req.method === 'POST' ? '{"name":"x"}' : '{"items":[]}');
    // The server drops the connection a moment after answering, as an idle keep-alive timeout does.
    setTimeout(() => req.socket.destroy(), 50);
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  url = `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
});

afterAll(async () => {
  server.closeAllConnections();
  await new Promise<void>((r) => server.close(() => r()));
});

/** Blocks this process (a CLI's synchronous child, say) so the connection's close goes unnoticed. */
const blockEventLoop = () => execFileSync('sleep', ['0.3']);

describe('DevyardClient on a connection the server closed', () => {
  it('sends a GET again on a fresh connection', async () => {
    const c = new DevyardClient({ url, token: 't' });
    expect(await c.listBoxes()).toEqual([]);
    blockEventLoop();
    expect(await c.listBoxes()).toEqual([]);
  });

  it('does not send a POST twice: the failure is reported', async () => {
    const c = new DevyardClient({ url, token: 't' });
    await c.listBoxes();
    blockEventLoop();
    const before = posts;
    await expect(c.createBox({ name: 'x', template: 'tiny' })).rejects.toMatchObject({ status: 0, code: 'unreachable' });
    expect(posts).toBe(before);
  });
});
