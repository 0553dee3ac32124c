/**
 * SSH key squatting: the gateway knows a user by their key alone, so whoever registers a key
 * receives the SSH sessions made with it. Registration must prove possession of the private key:
 * a server challenge signed with it by OpenSSH (`ssh-keygen -Y sign`). Keys and signatures here
 * are made by the real OpenSSH tools.
 */
import { execFileSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { signKeyChallenge } from '@devyard/cli/ssh-key-proof';
import { DevyardClient } from '@devyard/sdk/devyard-client';
import { addKeyFile, proofWithFile } from './ssh-key-proof-fixture.js';
import { problemOf, startTestControlPlane, type TestControlPlane } from './test-control-plane.js';

let t: TestControlPlane;
let keys: string;
let victim: DevyardClient;
let mallory: DevyardClient;

const sshKeygen = (...args: string[]) => execFileSync('ssh-keygen', args, { encoding: 'utf8' });
const newKey = (name: string, type = 'ed25519', bits?: string) => {
  const file = join(keys, name);
  sshKeygen('-q', '-t', type, ...(bits ? ['-b', bits] : []), '-N', '', '-C', name, '-f', file);
  return { file, pub: readFileSync(`${file}.pub`, 'utf8').trim() };
};

beforeAll(async () => {
  t = await startTestControlPlane('keyreg', { cpuMillis: 8000, memoryBytes: 8 * 1024 ** 3 });
  keys = mkdtempSync(join(tmpdir(), 'devyard-keyreg-'));
  victim = new DevyardClient({ url: t.cp.url, token: (await t.user.createServiceAccount('victim', 'member')).token });
  mallory = new DevyardClient({ url: t.cp.url, token: (await t.user.createServiceAccount('mallory', 'member')).token });
});

afterAll(async () => {
  await t?.close();
  if (keys) rmSync(keys, { recursive: true, force: true });
});

describe('SSH key registration proves possession', () => {
  it("refuses a key registered by someone who only has its public half (mallory squatting the victim's key)", async () => {
    const victimKey = newKey('victim');
    const malloryKey = newKey('mallory');
    // Mallory signs her own challenge with her own key and presents the victim's public key.
    const forged = await proofWithFile(mallory, malloryKey.file, malloryKey.pub);
    const refused = await problemOf(mallory.addSshKey(victimKey.pub, forged));
    expect([refused.status, refused.code]).toEqual([400, 'invalid-input']);
    expect(refused.message).toMatch(/no proof that you hold this key: the signature was made with another key/);
    // Nor with no signature of a challenge at all, or a signature of something else.
    const { challenge } = await mallory.sshKeyChallenge();
    const other = signKeyChallenge('something else', malloryKey.pub, { identity: malloryKey.file });
    expect((await problemOf(mallory.addSshKey(victimKey.pub, { challenge, signature: other }))).status).toBe(400);
    expect((await problemOf(mallory.addSshKey(victimKey.pub, { challenge, signature: 'x' }))).status).toBe(400);
    expect(await mallory.listSshKeys()).toEqual([]);
    // The victim registers it, and it is theirs.
    await addKeyFile(victim, victimKey.file);
    expect((await victim.listSshKeys()).map((k) => k.name)).toEqual(['victim']);
  });

  it("refuses a signature made for another user's challenge, another namespace, or an expired or forged challenge", async () => {
    const k = newKey('replay');
    // The victim's own signed challenge, captured and replayed by mallory with the same key.
    const victimProof = await proofWithFile(victim, k.file, k.pub);
    const replayed = await problemOf(mallory.addSshKey(k.pub, victimProof));
    expect(replayed.message).toMatch(/issued to another user/);
    // A signature for another purpose (namespace) does not count.
    const { challenge } = await mallory.sshKeyChallenge();
    const wrongNs = execFileSync('ssh-keygen', ['-q', '-Y', 'sign', '-n', 'git', '-f', k.file], { input: challenge, encoding: 'utf8' });
    expect((await problemOf(mallory.addSshKey(k.pub, { challenge, signature: wrongNs }))).message).toMatch(/namespace "git"/);
    // A challenge with its body changed no longer carries the server's MAC.
    const [p, body, mac] = challenge.split('.');
    const claims = JSON.parse(Buffer.from(body!, 'base64url').toString()) as Record<string, unknown>;
    const tampered = `${p}.${Buffer.from(JSON.stringify({ ...claims, exp: Date.now() + 86_400_000 })).toString('base64url')}.${mac}`;
    const sig = signKeyChallenge(tampered, k.pub, { identity: k.file });
    expect((await problemOf(mallory.addSshKey(k.pub, { challenge: tampered, signature: sig }))).message).toMatch(/not a key challenge of this server/);
    expect(await mallory.listSshKeys()).toEqual([]);
  });

  it('accepts ed25519, ECDSA and RSA keys signed by OpenSSH', async () => {
    const user = new DevyardClient({ url: t.cp.url, token: (await t.user.createServiceAccount('keys', 'member')).token });
    for (const [name, type, bits] of [['ed', 'ed25519'], ['ec256', 'ecdsa', '256'], ['ec384', 'ecdsa', '384'], ['ec521', 'ecdsa', '521'], ['rsa', 'rsa', '3072']] as const) {
      const k = newKey(name, type, bits);
      const added = await addKeyFile(user, k.file);
      expect(added.fingerprint).toBe(sshKeygen('-l', '-E', 'sha256', '-f', `${k.file}.pub`).split(' ')[1]);
    }
    expect((await user.listSshKeys()).map((k) => k.name).sort()).toEqual(['ec256', 'ec384', 'ec521', 'ed', 'rsa']);
  });
});
