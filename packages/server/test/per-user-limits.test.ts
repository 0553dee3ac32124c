/**
 * What one member can make the control plane hold or do, tried as a member who wants to slow it
 * down for everyone: lists are paginated and filtered in SQL and carry no env, a watcher's work per
 * change does not grow with the organization's boxes, each user holds a bounded number of watches,
 * tokens and SSH keys, and a watcher that stops reading is cut off instead of growing the server's
 * memory.
 */
import { once } from 'node:events';
import { connect } from 'node:net';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import Fastify from 'fastify';
import { DevyardClient } from '@devyard/sdk/devyard-client';
import { openSse } from '@devyard/server/http/sse-stream';
import { DEFAULT_WATCHES_PER_USER } from '@devyard/server/http/watch-slots';
import { MAX_SSH_KEYS_PER_USER } from '@devyard/server/services/access-service';
import { newSshKeyPair } from '@devyard/server/services/ssh-key-pairs';
import { MAX_TOKENS_PER_USER } from '@devyard/server/services/tenancy-service';
import { addKeyPair } from './ssh-key-proof-fixture.js';
import { problemOf, startTestControlPlane, until, type TestControlPlane } from './test-control-plane.js';

let fx: TestControlPlane;
let owner: DevyardClient;
let member: DevyardClient;
let memberName: string;

const BIG_ENV = { BLOB: 'x'.repeat(32 * 1024) };

async function raw(path: string, token: string) {
  const res = await fetch(fx.cp.url + path, { headers: { authorization: `Bearer ${token}` } });
  return { status: res.status, type: res.headers.get('content-type'), body: (await res.json()) as Record<string, unknown> };
}

/** Opens a watch and waits for its first bytes; the returned function closes it. */
async function openWatch(path: string, token: string): Promise<{ status: number; type: string | null; close: () => void; body?: unknown }> {
  const ac = new AbortController();
  const res = await fetch(fx.cp.url + path, { headers: { authorization: `Bearer ${token}`, accept: 'text/event-stream' }, signal: ac.signal });
  if (res.status !== 200) return { status: res.status, type: res.headers.get('content-type'), body: await res.json(), close: () => {} };
  const reader = res.body!.getReader();
  await reader.read();
  return { status: 200, type: res.headers.get('content-type'), close: () => ac.abort() };
}

beforeAll(async () => {
  fx = await startTestControlPlane('lists', { cpuMillis: 64_000, memoryBytes: 256 * 1024 ** 3 });
  owner = fx.user;
  const sa = await owner.createServiceAccount('lister', 'member');
  memberName = sa.info.user;
  member = new DevyardClient({ url: fx.cp.url, token: sa.token });
  for (let i = 0; i < 7; i++) await owner.createBox({ name: `o${i}`, template: 'tiny', resources: { cpu: 0.1, memory: '64MiB' }, env: BIG_ENV });
  for (let i = 0; i < 3; i++) await member.createBox({ name: `m${i}`, template: 'tiny', resources: { cpu: 0.1, memory: '64MiB' } });
});

afterAll(async () => {
  await fx?.close();
});

describe('box lists', () => {
  it('come a page at a time, oldest first, each page pointing at the next', async () => {
    const names: string[] = [];
    let token: string | undefined;
    let pages = 0;
    do {
      const page = await owner.listBoxesPage({ limit: 4, pageToken: token });
      expect(page.items.length).toBeLessThanOrEqual(4);
      names.push(...page.items.map((b) => b.name));
      token = page.nextPageToken;
      pages++;
    } while (token);
    expect(pages).toBe(3); // 10 boxes: 4 + 4 + 2
    expect(names).toEqual(['o0', 'o1', 'o2', 'o3', 'o4', 'o5', 'o6', 'm0', 'm1', 'm2']);
    expect((await owner.listBoxes()).map((b) => b.name)).toEqual(names);
    // Without a limit a page holds the default number; ten boxes fit in one.
    expect((await owner.listBoxesPage()).nextPageToken).toBeUndefined();
  });

  it('fill a member’s pages with the boxes the member may see (filtered in SQL, not after the page)', async () => {
    const first = await member.listBoxesPage({ limit: 3 });
    expect(first.items.map((b) => b.name)).toEqual(['m0', 'm1', 'm2']);
    // A box shared with the member's team joins the member's list, in creation order.
    await owner.createTeam('listers');
    await owner.setTeamMember('listers', memberName, 'member');
    await owner.setBoxShare('o5', 'listers', 'connect');
    const page = await member.listBoxesPage({ limit: 2 });
    expect(page.items.map((b) => b.name)).toEqual(['o5', 'm0']);
    expect((await member.listBoxesPage({ limit: 2, pageToken: page.nextPageToken })).items.map((b) => b.name)).toEqual(['m1', 'm2']);
  });

  it('never read the env of the boxes they list', async () => {
    const rows = await fx.cp.store.listOrgBoxes({ orgId: 'org_default', limit: 100 });
    expect(rows).toHaveLength(10);
    for (const r of rows) expect(r).not.toHaveProperty('env');
    // The box itself still has it, for the node that runs it.
    const o0 = rows.find((r) => r.name === 'o0')!;
    expect((await fx.cp.store.getBox(o0.id))!.env).toEqual(BIG_ENV);
  });

  it('refuse a page token or limit the server did not hand out, as problem+json', async () => {
    for (const q of ['limit=0', 'limit=501', 'limit=0x10', 'limit=1.5', 'pageToken=%2F..%2F', `pageToken=${Buffer.from('1.b_x; drop').toString('base64url')}`, 'pageToken=AAAA']) {
      const r = await raw(`/v1/boxes?${q}`, fx.cp.tokens.adminToken);
      expect([r.status, r.type], q).toEqual([400, 'application/problem+json; charset=utf-8']);
    }
  });
});

describe('watches', () => {
  it('an organization-wide event stream does not re-list the organization on every change', async () => {
    const boxes = fx.cp.boxes;
    const list = boxes.list.bind(boxes);
    let lists = 0;
    boxes.list = (...a) => (lists++, list(...a));
    const ac = new AbortController();
    const seen: string[] = [];
    const reading = (async () => {
      const res = await fetch(`${fx.cp.url}/v1/events`, { headers: { authorization: `Bearer ${fx.cp.tokens.adminToken}` }, signal: ac.signal });
      const dec = new TextDecoder();
      for await (const chunk of res.body!) for (const m of dec.decode(chunk).matchAll(/"boxName":"([^"]+)"/g)) seen.push(m[1]!);
    })().catch(() => {});
    try {
      await new Promise((r) => setTimeout(r, 100));
      for (let i = 0; i < 5; i++) await owner.boxVerb(`o${i}`, 'stop');
      await until(async () => new Set(seen.filter((n) => /^o[0-4]$/.test(n))).size, (n) => n === 5);
      // Each change cost the watcher the new events and a look at their boxes, not a list of the organization.
      expect(lists).toBe(0);
    } finally {
      boxes.list = list;
      ac.abort();
      await reading;
    }
  });

  it(`a user holds at most ${DEFAULT_WATCHES_PER_USER} watches; the next is 429 problem+json, a closed one frees its slot`, async () => {
    const sa = await owner.createServiceAccount('watcher', 'member');
    const open: Array<() => void> = [];
    try {
      for (let i = 0; i < DEFAULT_WATCHES_PER_USER; i++) {
        const w = await openWatch(i % 2 ? '/v1/boxes?watch=1' : '/v1/events', sa.token);
        expect(w.status).toBe(200);
        open.push(w.close);
      }
      const refused = await openWatch('/v1/boxes?watch=1', sa.token);
      expect([refused.status, refused.type]).toEqual([429, 'application/problem+json; charset=utf-8']);
      expect(refused.body).toMatchObject({ status: 429, code: 'too-many-requests', limit: DEFAULT_WATCHES_PER_USER });
      // Another user is not affected by this one's watches.
      const other = await openWatch('/v1/events', fx.cp.tokens.adminToken);
      expect(other.status).toBe(200);
      other.close();
      // Closing one gives its slot back, once the server notices the closed connection.
      open.pop()!();
      const again = await until(
        async () => openWatch('/v1/events', sa.token),
        (w) => w.status !== 429,
      );
      open.push(again.close);
      expect(again.status).toBe(200);
    } finally {
      for (const c of open) c();
    }
  });

  it('a watcher that stops reading is cut off at the buffer bound, not buffered without limit', async () => {
    const app = Fastify();
    let closed = false;
    app.get('/flood', async (req, reply) => {
      const sse = openSse(req, reply, 60_000, 256 * 1024);
      void sse.closed.then(() => (closed = true));
      const chunk = 'y'.repeat(16 * 1024);
      // 64 MiB offered to a client that reads nothing: at most the bound (plus socket buffers) may be held.
      for (let i = 0; i < 4096 && !closed; i++) {
        sse.send('blob', chunk);
        if (i % 64 === 0) await new Promise((r) => setImmediate(r));
      }
    });
    await app.listen({ port: 0, host: '127.0.0.1' });
    const port = (app.server.address() as { port: number }).port;
    const sock = connect(port, '127.0.0.1');
    try {
      await once(sock, 'connect');
      sock.pause(); // never reads
      sock.write('GET /flood HTTP/1.1\r\nhost: x\r\n\r\n');
      await until(async () => closed, (c) => c, 10_000);
      expect(closed).toBe(true);
    } finally {
      sock.destroy();
      await app.close();
    }
  });
});

describe('objects per user', () => {
  it(`a user holds at most ${MAX_TOKENS_PER_USER} live tokens; the next is 403 problem+json until one is revoked`, async () => {
    const sa = await owner.createServiceAccount('minter', 'member');
    const minter = new DevyardClient({ url: fx.cp.url, token: sa.token });
    const made: string[] = [];
    for (;;) {
      try {
        made.push((await minter.createToken({ name: `t${made.length}` })).info.id);
      } catch (e) {
        const p = await problemOf(Promise.reject(e));
        expect([p.status, p.problem.code, p.problem.limit]).toEqual([403, 'quota-exceeded', MAX_TOKENS_PER_USER]);
        break;
      }
      expect(made.length).toBeLessThan(MAX_TOKENS_PER_USER);
    }
    // The service account's own token counts: one plus the ones it made.
    expect(made.length + 1).toBe(MAX_TOKENS_PER_USER);
    await minter.revokeToken(made[0]!);
    expect((await minter.createToken({ name: 'after-revoke' })).token).toMatch(/^dy_/);
  });

  it(`a user registers at most ${MAX_SSH_KEYS_PER_USER} SSH keys; the next is 403 until one is removed`, async () => {
    const sa = await owner.createServiceAccount('keyring', 'member');
    const holder = new DevyardClient({ url: fx.cp.url, token: sa.token });
    const keys = [];
    for (let i = 0; i < MAX_SSH_KEYS_PER_USER; i++) keys.push(await addKeyPair(holder, newSshKeyPair(), `k${i}`));
    const p = await problemOf(addKeyPair(holder, newSshKeyPair(), 'one-too-many'));
    expect([p.status, p.problem.code]).toEqual([403, 'quota-exceeded']);
    expect(await holder.listSshKeys()).toHaveLength(MAX_SSH_KEYS_PER_USER);
    await holder.removeSshKey(keys[0]!.id);
    expect((await addKeyPair(holder, newSshKeyPair(), 'after-remove')).name).toBe('after-remove');
  }, 120_000);
});
