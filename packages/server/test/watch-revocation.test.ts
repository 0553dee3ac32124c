/**
 * Watches outlive the request that authorized them. Tried as a member whose access was taken
 * away: a revoked token or a removal from the organization ends the member's open watches within
 * 5 s, and after leaving a team the member's watch no longer shows the boxes shared with it.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { DevyardClient } from '@devyard/sdk/devyard-client';
import { startTestControlPlane, until, type TestControlPlane } from './test-control-plane.js';

let fx: TestControlPlane;
let owner: DevyardClient;

/** An open stream: what it has received so far, and whether the server ended it. */
interface Stream {
  text: () => string;
  ended: () => boolean;
  close: () => void;
}

async function stream(path: string, token: string): Promise<Stream> {
  const ac = new AbortController();
  const res = await fetch(fx.cp.url + path, { headers: { authorization: `Bearer ${token}`, accept: 'text/event-stream' }, signal: ac.signal });
  expect(res.status).toBe(200);
  let text = '';
  let ended = false;
  const dec = new TextDecoder();
  void (async () => {
    for await (const chunk of res.body!) text += dec.decode(chunk);
  })()
    .catch(() => {})
    .finally(() => (ended = true));
  return { text: () => text, ended: () => ended, close: () => ac.abort() };
}

const res = { cpu: 0.1, memory: '64MiB' };

beforeAll(async () => {
  fx = await startTestControlPlane('watch-revoke', { cpuMillis: 64_000, memoryBytes: 256 * 1024 ** 3 });
  owner = fx.user;
});

afterAll(async () => {
  await fx?.close();
});

describe('open watches when access is taken away', () => {
  it('revoking the token ends every watch it opened within 5 s', async () => {
    const sa = await owner.createServiceAccount('revoked', 'member');
    const streams = [await stream('/v1/events', sa.token), await stream('/v1/boxes?watch=1', sa.token)];
    try {
      await new Promise((r) => setTimeout(r, 200));
      expect(streams.map((s) => s.ended())).toEqual([false, false]);
      await owner.revokeToken(sa.info.id);
      const t0 = Date.now();
      await until(async () => streams.every((s) => s.ended()), (v) => v, 5000);
      expect(Date.now() - t0).toBeLessThan(5000);
      for (const s of streams) expect(s.text()).toContain('"code":"unauthenticated"');
    } finally {
      for (const s of streams) s.close();
    }
  });

  it('removing the member from the organization ends their watches within 5 s', async () => {
    const sa = await owner.createServiceAccount('leaver', 'member');
    const s = await stream('/v1/events', sa.token);
    try {
      await owner.removeMember(sa.info.user);
      await until(async () => s.ended(), (v) => v, 5000);
    } finally {
      s.close();
    }
  });

  it('after leaving a team, the watch no longer shows the boxes shared with it', async () => {
    const sa = await owner.createServiceAccount('teammate', 'member');
    const mate = new DevyardClient({ url: fx.cp.url, token: sa.token });
    await owner.createTeam('crew');
    await owner.setTeamMember('crew', sa.info.user, 'member');
    await owner.createBox({ name: 'crew-box', template: 'tiny', resources: res });
    await owner.setBoxShare('crew-box', 'crew', 'connect');
    await mate.createBox({ name: 'own-box', template: 'tiny', resources: res });
    const boxes = await stream('/v1/boxes?watch=1', sa.token);
    const events = await stream('/v1/boxes/crew-box/events?watch=1&owner=admin', sa.token);
    try {
      await until(async () => boxes.text(), (t) => t.includes('"name":"crew-box"') && t.includes('"name":"own-box"'));
      await owner.removeTeamMember('crew', sa.info.user);
      await new Promise((r) => setTimeout(r, 2500)); // one re-check of the watch's subject
      const before = boxes.text().length;
      const eventsBefore = events.text().length;
      await owner.boxVerb('crew-box', 'stop');
      await mate.boxVerb('own-box', 'stop');
      // The member's own change arrives; the shared box's change does not, on either stream.
      await until(async () => boxes.text().slice(before), (t) => t.includes('"name":"own-box"'));
      await new Promise((r) => setTimeout(r, 300));
      expect(boxes.text().slice(before)).not.toContain('crew-box');
      expect(boxes.ended()).toBe(false);
      await until(async () => events.ended(), (v) => v, 5000);
      expect(events.text().slice(eventsBefore)).not.toContain('"type"');
    } finally {
      boxes.close();
      events.close();
    }
  });
});
