/**
 * Envelope encryption of secrets: round trips, tamper detection in every part, wrong keys, rows
 * moved to another name, keyring sources, and KEK rotation (including dropping the old key).
 */
import { mkdtempSync, readFileSync, rmSync, statSync, writeFileSync, chmodSync } from 'node:fs';
import { randomBytes } from 'node:crypto';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import {
  derivedKekId,
  generateKek,
  keyringFile,
  Keyring,
  KeyringError,
  KeyringSource,
  openSecret,
  parseKeyring,
  rewrapSecret,
  sealSecret,
  SecretCryptoError,
  writeKeyringFile,
  type SealedSecret,
  type SecretBinding,
} from '@devyard/server/secrets/secret-envelope';
import { rotateKek } from '@devyard/server/secrets/kek-rotation';
import { ChangeFeed } from '@devyard/server/change-feed';
import { SecretService } from '@devyard/server/secrets/secret-service';
import { SecretStore } from '@devyard/server/store/secret-store';
import { openSqliteDatabase } from '@devyard/server/store/sqlite-database';
import { Store } from '@devyard/server/store/store';
import { DEFAULT_ORG_ID, type Subject } from '@devyard/server/services/box-service';
import { startControlPlane } from '@devyard/server/control-plane';

const binding: SecretBinding = { orgId: 'org_default', scopeType: 'user', scopeId: 'alice', name: 'NPM_TOKEN' };
const ring = () => new Keyring([generateKek()]);

function flip(buf: Buffer, at: number): Buffer {
  const out = Buffer.from(buf);
  out[at] = out[at]! ^ 0x01;
  return out;
}

describe('seal and open', () => {
  it('round-trips values, including empty, multi-line and non-ASCII ones', () => {
    const k = ring();
    for (const v of ['s3cr3t', '', 'line1\nline2\n', 'ünïcødé 🔑', 'x'.repeat(64 * 1024)]) {
      const s = sealSecret(v, binding, k);
      expect(s.iv.length).toBe(12);
      expect(s.wrappedDek.length).toBe(60);
      expect(s.kekId).toBe(k.current.id);
      expect(openSecret(s, binding, k)).toBe(v);
    }
  });

  it('uses a fresh data key and IV per seal: equal values give unrelated ciphertexts', () => {
    const k = ring();
    const a = sealSecret('same', binding, k);
    const b = sealSecret('same', binding, k);
    expect(a.iv.equals(b.iv)).toBe(false);
    expect(a.ciphertext.equals(b.ciphertext)).toBe(false);
    expect(a.wrappedDek.equals(b.wrappedDek)).toBe(false);
    expect(a.ciphertext.includes(Buffer.from('same'))).toBe(false);
  });

  it('refuses a flipped byte anywhere in the ciphertext, the tag, the IV or the wrapped data key', () => {
    const k = ring();
    const s = sealSecret('top secret value', binding, k);
    const variants: Array<[string, SealedSecret]> = [];
    for (let i = 0; i < s.ciphertext.length; i++) variants.push([`ciphertext[${i}]`, { ...s, ciphertext: flip(s.ciphertext, i) }]);
    for (let i = 0; i < s.iv.length; i++) variants.push([`iv[${i}]`, { ...s, iv: flip(s.iv, i) }]);
    for (let i = 0; i < s.wrappedDek.length; i++) variants.push([`wrappedDek[${i}]`, { ...s, wrappedDek: flip(s.wrappedDek, i) }]);
    variants.push(['truncated ciphertext', { ...s, ciphertext: s.ciphertext.subarray(0, 10) }]);
    variants.push(['truncated wrapped key', { ...s, wrappedDek: s.wrappedDek.subarray(0, 59) }]);
    for (const [what, v] of variants) expect(() => openSecret(v, binding, k), what).toThrow(SecretCryptoError);
    expect(openSecret(s, binding, k)).toBe('top secret value');
  });

  it('refuses the wrong KEK, a KEK not in the keyring, and a kek_id pointed at another key', () => {
    const k = ring();
    const s = sealSecret('v', binding, k);
    const other = new Keyring([{ id: k.current.id, key: randomBytes(32) }]);
    expect(() => openSecret(s, binding, other)).toThrow(/failed authentication/);
    expect(() => openSecret(s, binding, ring())).toThrow(/not in the keyring/);
    // Both keys present, the row's kek_id edited to name the other one: the DEK is bound to its KEK id.
    const second = generateKek();
    const both = new Keyring([second, k.current]);
    expect(() => openSecret({ ...s, kekId: second.id }, binding, both)).toThrow(SecretCryptoError);
    expect(openSecret(s, binding, both)).toBe('v');
  });

  it('binds the ciphertext to its row: moved to another name, scope, scope owner or org it does not decrypt', () => {
    const k = ring();
    const s = sealSecret('bound', binding, k);
    for (const moved of [
      { ...binding, name: 'OTHER_NAME' },
      { ...binding, scopeId: 'mallory' },
      { ...binding, scopeType: 'org' },
      { ...binding, orgId: 'org_other' },
    ]) {
      expect(() => openSecret(s, moved, k), JSON.stringify(moved)).toThrow(SecretCryptoError);
    }
    // Swapping just the value's ciphertext and IV between rows fails too (each DEK belongs to its row).
    const t = sealSecret('other', { ...binding, name: 'OTHER_NAME' }, k);
    expect(() => openSecret({ ...s, ciphertext: t.ciphertext, iv: t.iv }, binding, k)).toThrow(SecretCryptoError);
    expect(() => openSecret({ ...s, wrappedDek: t.wrappedDek }, binding, k)).toThrow(SecretCryptoError);
  });

  it('re-wraps under the current KEK without touching the value ciphertext; the old KEK can go afterwards', () => {
    const old = generateKek();
    const s = sealSecret('rotate me', binding, new Keyring([old]));
    const next = generateKek();
    const both = new Keyring([next, old]);
    const r = rewrapSecret(s, binding, both);
    expect(r.kekId).toBe(next.id);
    expect(r.ciphertext.equals(s.ciphertext)).toBe(true);
    expect(r.iv.equals(s.iv)).toBe(true);
    expect(openSecret(r, binding, new Keyring([next]))).toBe('rotate me');
    expect(() => openSecret(s, binding, new Keyring([next]))).toThrow(/not in the keyring/);
  });
});

describe('keyrings', () => {
  it('parses id:base64 lists (first is current), bare keys with a derived id, comments', () => {
    const a = randomBytes(32);
    const b = randomBytes(32);
    const k = parseKeyring(`new:${a.toString('base64')},old:${b.toString('base64')}`, 'env');
    expect(k.ids).toEqual(['new', 'old']);
    expect(k.current.key.equals(a)).toBe(true);
    const bare = parseKeyring(a.toString('base64'), 'env');
    expect(bare.current.id).toBe(derivedKekId(a));
    expect(bare.current.id).not.toContain(a.toString('hex').slice(0, 8));
    expect(parseKeyring(`# comment\n\nk1:${a.toString('base64')} # current\nk2:${b.toString('base64')}\n`, 'file').ids).toEqual(['k1', 'k2']);
  });

  it('refuses short keys, bad ids, duplicates, empty rings and non-base64', () => {
    expect(() => parseKeyring(randomBytes(16).toString('base64'), 'env')).toThrow(/32 bytes/);
    expect(() => parseKeyring(`bad id:${randomBytes(32).toString('base64')}`, 'env')).toThrow(KeyringError);
    const k = randomBytes(32).toString('base64');
    expect(() => parseKeyring(`a:${k},a:${k}`, 'env')).toThrow(/twice/);
    expect(() => parseKeyring(' , ', 'env')).toThrow(/no key/);
    expect(() => parseKeyring('a:not base64!', 'env')).toThrow(/base64/);
  });

  describe('sources', () => {
    const dirs: string[] = [];
    const tmp = () => {
      const d = mkdtempSync(join(tmpdir(), 'devyard-kek-'));
      dirs.push(d);
      return d;
    };
    afterEach(() => {
      for (const d of dirs.splice(0)) rmSync(d, { recursive: true, force: true });
    });

    it('creates the keyring file at first start (0600 in a 0700 dir) and reads it back', () => {
      const d = tmp();
      expect(() => new KeyringSource({ dataDir: d })).toThrow(/no keyring/);
      const s = new KeyringSource({ dataDir: d, create: true });
      const file = keyringFile(d);
      expect(statSync(file).mode & 0o777).toBe(0o600);
      expect(statSync(join(d, 'secrets')).mode & 0o777).toBe(0o700);
      expect(new KeyringSource({ dataDir: d }).keyring().current.id).toBe(s.keyring().current.id);
    });

    it('prefers DEVYARD_KEK and then neither reads nor creates the file', () => {
      const d = tmp();
      const key = randomBytes(32);
      const s = new KeyringSource({ dataDir: d, env: `envkey:${key.toString('base64')}`, create: true });
      expect(s.keyring().ids).toEqual(['envkey']);
      expect(s.origin).toBe('DEVYARD_KEK');
      expect(() => statSync(keyringFile(d))).toThrow();
    });

    it('refuses a keyring file others can read', () => {
      const d = tmp();
      new KeyringSource({ dataDir: d, create: true });
      chmodSync(keyringFile(d), 0o644);
      expect(() => new KeyringSource({ dataDir: d })).toThrow(/chmod 600/);
    });

    it('picks up a changed file (a rotation next to a running server), keeping the last good one on a broken edit', () => {
      const d = tmp();
      const errors: string[] = [];
      const s = new KeyringSource({ dataDir: d, create: true, onReloadError: (m) => errors.push(m) });
      const first = s.keyring().current;
      const next = generateKek();
      writeKeyringFile(keyringFile(d), [next, first]);
      expect(s.keyring().ids).toEqual([next.id, first.id]);
      writeFileSync(keyringFile(d), 'garbage', { mode: 0o600 });
      expect(s.keyring().ids).toEqual([next.id, first.id]);
      expect(errors.length).toBe(1);
      expect(errors[0]).not.toContain(next.key.toString('base64'));
    });
  });
});

describe('rotation over a store', () => {
  it('re-wraps every row in one transaction, after which the old key can be dropped', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'devyard-rotate-'));
    try {
      const store = new Store(await openSqliteDatabase(join(dir, 'devyard.db')));
      const keys = new KeyringSource({ dataDir: dir, create: true });
      const oldId = keys.keyring().current.id;
      const svc = new SecretService({ store, secrets: new SecretStore(store.db), keys, feed: new ChangeFeed(), now: Date.now });
      const admin: Subject = { name: 'admin', kind: 'user', orgId: DEFAULT_ORG_ID, role: 'owner', teamIds: [] } as Subject;
      await svc.put(admin, 'org', 'A_TOKEN', 'value-a');
      await svc.put(admin, 'user', 'B_TOKEN', 'value-b');
      await store.close();

      const r = await rotateKek({ dataDir: dir, generate: true });
      expect(r.generatedKekId).toBeDefined();
      expect(r.currentKekId).toBe(r.generatedKekId);
      expect(r.rewrapped).toBe(2);
      expect(r.unused).toEqual([oldId]);
      const again = await rotateKek({ dataDir: dir, dropUnused: true });
      expect(again.rewrapped).toBe(0);
      expect(again.dropped).toEqual([oldId]);
      expect(readFileSync(keyringFile(dir), 'utf8')).not.toContain(`${oldId}:`);

      // Only the new key is left, and every secret still opens with it.
      const store2 = new Store(await openSqliteDatabase(join(dir, 'devyard.db')));
      const keys2 = new KeyringSource({ dataDir: dir });
      expect(keys2.keyring().ids).toEqual([r.generatedKekId]);
      const svc2 = new SecretService({ store: store2, secrets: new SecretStore(store2.db), keys: keys2, feed: new ChangeFeed(), now: Date.now });
      const box = { id: 'b_1', owner: 'admin', orgId: DEFAULT_ORG_ID, templateName: 'tiny' } as Parameters<SecretService['forBoxes']>[0][number];
      expect((await svc2.forBoxes([box])).get('b_1')).toEqual([
        { name: 'A_TOKEN', value: 'value-a' },
        { name: 'B_TOKEN', value: 'value-b' },
      ]);
      await store2.close();
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  it('re-wraps at server start once a new current key is in the keyring file', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'devyard-rotate-'));
    try {
      const cp1 = await startControlPlane({ dataDir: dir, secrets: { kek: '' } });
      const admin = { name: 'admin', kind: 'user', orgId: DEFAULT_ORG_ID, role: 'owner', teamIds: [] } as Subject;
      await cp1.secrets.put(admin, 'org', 'ON_START', 'v');
      await cp1.close();
      const old = parseKeyring(readFileSync(keyringFile(dir), 'utf8'), 'file');
      const next = generateKek();
      writeKeyringFile(keyringFile(dir), [next, ...old.keys]);
      const cp2 = await startControlPlane({ dataDir: dir, secrets: { kek: '' } });
      expect(await new SecretStore(cp2.store.db).kekIdsInUse()).toEqual([next.id]);
      await cp2.close();
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  it('changes nothing when a row cannot be re-wrapped (its KEK is missing)', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'devyard-rotate-'));
    try {
      const store = new Store(await openSqliteDatabase(join(dir, 'devyard.db')));
      const first = generateKek();
      const second = generateKek();
      const secrets = new SecretStore(store.db);
      const admin = { name: 'admin', kind: 'user', orgId: DEFAULT_ORG_ID, role: 'owner', teamIds: [] } as Subject;
      const env1 = `${first.id}:${first.key.toString('base64')}`;
      await new SecretService({ store, secrets, keys: new KeyringSource({ dataDir: dir, env: env1 }), feed: new ChangeFeed(), now: Date.now }).put(admin, 'org', 'A', 'a');
      const env2 = `${second.id}:${second.key.toString('base64')}`;
      await new SecretService({ store, secrets, keys: new KeyringSource({ dataDir: dir, env: env2 }), feed: new ChangeFeed(), now: Date.now }).put(admin, 'org', 'B', 'b');
      await store.close();
      // A keyring with a new current key and only the second old one: A's KEK is missing.
      const third = generateKek();
      await expect(rotateKek({ dataDir: dir, env: `${third.id}:${third.key.toString('base64')},${env2}` })).rejects.toThrow(/not in the keyring/);
      const store2 = new Store(await openSqliteDatabase(join(dir, 'devyard.db')));
      expect((await new SecretStore(store2.db).kekIdsInUse()).sort()).toEqual([first.id, second.id].sort());
      await store2.close();
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});
