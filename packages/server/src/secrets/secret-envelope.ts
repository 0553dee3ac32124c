/**
 * Envelope encryption of secret values. Each value is encrypted with AES-256-GCM under its own
 * random data key (DEK) and a random 12-byte IV; the DEK is itself encrypted (wrapped) with
 * AES-256-GCM under a key-encryption key (KEK) that never enters the database. Rotating the KEK
 * therefore re-wraps 32-byte DEKs and never touches a value's ciphertext.
 *
 * Both layers carry authenticated data naming the row (org, scope, name) and, for the DEK, the
 * KEK id: a ciphertext or wrapped key copied onto another row, or a kek_id column edited to point
 * at another key, fails authentication instead of decrypting.
 *
 * KEKs come from a keyring (first key = current, the others only decrypt): the environment
 * variable `DEVYARD_KEK`, else the file `<server data dir>/secrets/kek.keyring`, created with one
 * random key at first start (mode 0600 in a 0700 directory).
 */
import { createCipheriv, createDecipheriv, createHash, randomBytes } from 'node:crypto';
import { chmodSync, closeSync, existsSync, fsyncSync, mkdirSync, openSync, readFileSync, renameSync, statSync, writeSync } from 'node:fs';
import { dirname, join } from 'node:path';

const KEY_BYTES = 32;
const IV_BYTES = 12;
const TAG_BYTES = 16;
const KEK_ID = /^[A-Za-z0-9._-]{1,64}$/;

/** One key-encryption key. */
export interface Kek {
  /** Stable id, stored next to every DEK wrapped with this key. */
  id: string;
  /** 32 key bytes. */
  key: Buffer;
}

/** The row a secret belongs to; bound into both layers as authenticated data. */
export interface SecretBinding {
  orgId: string;
  scopeType: string;
  scopeId: string;
  name: string;
}

/** A sealed value as stored: nothing here is usable without a KEK. */
export interface SealedSecret {
  /** AES-256-GCM ciphertext of the value followed by its 16-byte tag. */
  ciphertext: Buffer;
  /** The value's 12-byte IV. */
  iv: Buffer;
  /** IV (12) + encrypted DEK (32) + tag (16). */
  wrappedDek: Buffer;
  /** Id of the KEK that wrapped the DEK. */
  kekId: string;
}

/** A value or key failed to authenticate, or its KEK is not in the keyring. The message never holds key material. */
export class SecretCryptoError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'SecretCryptoError';
  }
}

/** A keyring configuration that cannot be used (bad entry, wrong key length, unsafe file mode). */
export class KeyringError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'KeyringError';
  }
}

/** An ordered set of KEKs: the first is current (wraps new DEKs), all of them unwrap. */
export class Keyring {
  private readonly byId: Map<string, Kek>;

  constructor(readonly keys: readonly Kek[]) {
    if (keys.length === 0) throw new KeyringError('a keyring needs at least one key');
    this.byId = new Map();
    for (const k of keys) {
      if (!KEK_ID.test(k.id)) throw new KeyringError(`invalid KEK id "${k.id}" (letters, digits, ".", "_", "-"; at most 64)`);
      if (k.key.length !== KEY_BYTES) throw new KeyringError(`KEK "${k.id}" must be ${KEY_BYTES} bytes, got ${k.key.length}`);
      if (this.byId.has(k.id)) throw new KeyringError(`KEK id "${k.id}" appears twice`);
      this.byId.set(k.id, k);
    }
  }

  /** The key new DEKs are wrapped with. */
  get current(): Kek {
    return this.keys[0]!;
  }

  get(id: string): Kek | undefined {
    return this.byId.get(id);
  }

  get ids(): string[] {
    return this.keys.map((k) => k.id);
  }
}

/**
 * Id of a key given without one (`DEVYARD_KEK=<base64>`): derived from the key, so replacing it
 * with another bare key is reported as "KEK not in keyring" rather than as a failed decryption.
 */
export function derivedKekId(key: Buffer): string {
  return `kek-${createHash('sha256').update('devyard-kek-id\0').update(key).digest('hex').slice(0, 16)}`;
}

/**
 * Parses `id:base64` entries separated by commas or newlines (`#` starts a comment); a bare
 * `base64` entry gets a derived id. The first entry is the current key.
 */
export function parseKeyring(text: string, source: string): Keyring {
  const keys: Kek[] = [];
  for (const raw of text.split(/[,\n]/)) {
    const entry = raw.replace(/#.*$/, '').trim();
    if (!entry) continue;
    const i = entry.indexOf(':');
    const id = i >= 0 ? entry.slice(0, i).trim() : undefined;
    const b64 = (i >= 0 ? entry.slice(i + 1) : entry).trim();
    if (!/^[A-Za-z0-9+/_-]+={0,2}$/.test(b64)) throw new KeyringError(`${source}: ${id ? `key "${id}"` : `entry ${keys.length + 1}`} is not base64`);
    const key = Buffer.from(b64, 'base64');
    if (key.length !== KEY_BYTES) throw new KeyringError(`${source}: ${id ? `key "${id}"` : `entry ${keys.length + 1}`} must decode to ${KEY_BYTES} bytes, got ${key.length}`);
    keys.push({ id: id ?? derivedKekId(key), key });
  }
  if (keys.length === 0) throw new KeyringError(`${source}: no key`);
  try {
    return new Keyring(keys);
  } catch (e) {
    throw new KeyringError(`${source}: ${(e as Error).message}`);
  }
}

/** The keyring file's text: one `id:base64` line per key, current first. */
export function formatKeyring(keys: readonly Kek[]): string {
  return [
    '# Devyard key-encryption keys: id:base64 (32 bytes). The first line is current; the others only decrypt.',
    '# Keep a copy offline: without these keys the secrets in the database cannot be decrypted.',
    ...keys.map((k) => `${k.id}:${k.key.toString('base64')}`),
    '',
  ].join('\n');
}

/** A fresh random KEK with a readable, unique id. */
export function generateKek(now = new Date()): Kek {
  return { id: `kek-${now.toISOString().slice(0, 10).replaceAll('-', '')}-${randomBytes(4).toString('hex')}`, key: randomBytes(KEY_BYTES) };
}

function aad(kind: 'value' | 'dek', b: SecretBinding, kekId?: string): Buffer {
  // JSON of an array: unambiguous whatever the fields contain.
  return Buffer.from(`devyard/${kind}/v1\n${JSON.stringify([b.orgId, b.scopeType, b.scopeId, b.name, ...(kekId !== undefined ? [kekId] : [])])}`);
}

function gcmSeal(key: Buffer, iv: Buffer, plaintext: Buffer, ad: Buffer): Buffer {
  const c = createCipheriv('aes-256-gcm', key, iv, { authTagLength: TAG_BYTES });
  c.setAAD(ad);
  return Buffer.concat([c.update(plaintext), c.final(), c.getAuthTag()]);
}

function gcmOpen(key: Buffer, iv: Buffer, sealed: Buffer, ad: Buffer, what: string): Buffer {
  if (iv.length !== IV_BYTES || sealed.length < TAG_BYTES) throw new SecretCryptoError(`${what} is malformed`);
  const d = createDecipheriv('aes-256-gcm', key, iv, { authTagLength: TAG_BYTES });
  d.setAAD(ad);
  d.setAuthTag(sealed.subarray(sealed.length - TAG_BYTES));
  try {
    return Buffer.concat([d.update(sealed.subarray(0, sealed.length - TAG_BYTES)), d.final()]);
  } catch {
    throw new SecretCryptoError(`${what} failed authentication (tampered, moved to another row, or the wrong key)`);
  }
}

function wrapDek(dek: Buffer, kek: Kek, b: SecretBinding): Buffer {
  const iv = randomBytes(IV_BYTES);
  return Buffer.concat([iv, gcmSeal(kek.key, iv, dek, aad('dek', b, kek.id))]);
}

function unwrapDek(s: SealedSecret, keyring: Keyring, b: SecretBinding): Buffer {
  const kek = keyring.get(s.kekId);
  if (!kek) throw new SecretCryptoError(`KEK "${s.kekId}" is not in the keyring (have: ${keyring.ids.join(', ')})`);
  if (s.wrappedDek.length !== IV_BYTES + KEY_BYTES + TAG_BYTES) throw new SecretCryptoError('wrapped data key is malformed');
  return gcmOpen(kek.key, s.wrappedDek.subarray(0, IV_BYTES), s.wrappedDek.subarray(IV_BYTES), aad('dek', b, kek.id), 'wrapped data key');
}

/** Encrypts a value under a fresh DEK wrapped by the keyring's current KEK. */
export function sealSecret(value: string, b: SecretBinding, keyring: Keyring): SealedSecret {
  const dek = randomBytes(KEY_BYTES);
  const iv = randomBytes(IV_BYTES);
  try {
    const ciphertext = gcmSeal(dek, iv, Buffer.from(value, 'utf8'), aad('value', b));
    return { ciphertext, iv, wrappedDek: wrapDek(dek, keyring.current, b), kekId: keyring.current.id };
  } finally {
    dek.fill(0);
  }
}

/** Decrypts a sealed value; throws SecretCryptoError on any mismatch. */
export function openSecret(s: SealedSecret, b: SecretBinding, keyring: Keyring): string {
  const dek = unwrapDek(s, keyring, b);
  try {
    return gcmOpen(dek, s.iv, s.ciphertext, aad('value', b), 'secret value').toString('utf8');
  } finally {
    dek.fill(0);
  }
}

/** The same secret with its DEK wrapped under the current KEK; the value's ciphertext is unchanged. */
export function rewrapSecret(s: SealedSecret, b: SecretBinding, keyring: Keyring): SealedSecret {
  const dek = unwrapDek(s, keyring, b);
  try {
    return { ...s, wrappedDek: wrapDek(dek, keyring.current, b), kekId: keyring.current.id };
  } finally {
    dek.fill(0);
  }
}

// ---- where the keyring comes from ----

/** The keyring file of a server data dir. */
export function keyringFile(dataDir: string): string {
  return join(dataDir, 'secrets', 'kek.keyring');
}

/** Writes the keyring file atomically (temp file, fsync, rename), mode 0600 in a 0700 directory. */
export function writeKeyringFile(file: string, keys: readonly Kek[]): void {
  const dir = dirname(file);
  if (!existsSync(dir)) mkdirSync(dir, { recursive: true, mode: 0o700 });
  chmodSync(dir, 0o700);
  const tmp = `${file}.${process.pid}.tmp`;
  const fd = openSync(tmp, 'w', 0o600);
  try {
    writeSync(fd, formatKeyring(keys));
    fsyncSync(fd);
  } finally {
    closeSync(fd);
  }
  chmodSync(tmp, 0o600);
  renameSync(tmp, file);
}

function readKeyringFile(file: string): Keyring {
  const st = statSync(file);
  // Readable by group or others means the keys may already have leaked: refuse rather than use them.
  if ((st.mode & 0o077) !== 0) throw new KeyringError(`${file} must not be accessible by group or others (chmod 600 ${file})`);
  return parseKeyring(readFileSync(file, 'utf8'), file);
}

export interface KeyringSourceOptions {
  /** The server data dir (for `secrets/kek.keyring`). */
  dataDir: string;
  /** Value of DEVYARD_KEK; when set, the file is neither read nor created. */
  env?: string;
  /** Create the file with one random key when it is missing (the server does; tools do not). */
  create?: boolean;
  /** Told when a changed keyring file cannot be used (the last good keyring stays in use). */
  onReloadError?: (message: string) => void;
}

/**
 * The server's keyring, from DEVYARD_KEK or the keyring file. A file keyring is re-read when the
 * file changes (size, mtime or inode), so `devyard server rotate-kek` next to a running server
 * takes effect without a restart: new secrets are wrapped under the new current key and DEKs
 * rewrapped under it stay readable.
 */
export class KeyringSource {
  private cached: Keyring;
  private stamp = '';
  private failedStamp = '';
  private readonly onReloadError: (message: string) => void;
  /** Where the keys come from: `DEVYARD_KEK` or the file path. */
  readonly origin: string;
  /** The file, when the keys come from one. */
  readonly file: string | null;

  constructor(opts: KeyringSourceOptions) {
    this.onReloadError = opts.onReloadError ?? (() => undefined);
    if (opts.env !== undefined && opts.env.trim() !== '') {
      this.origin = 'DEVYARD_KEK';
      this.file = null;
      this.cached = parseKeyring(opts.env, 'DEVYARD_KEK');
      return;
    }
    this.file = keyringFile(opts.dataDir);
    this.origin = this.file;
    if (!existsSync(this.file)) {
      if (!opts.create) throw new KeyringError(`no keyring: ${this.file} does not exist and DEVYARD_KEK is not set`);
      writeKeyringFile(this.file, [generateKek()]);
    }
    this.cached = readKeyringFile(this.file);
    this.stamp = this.fileStamp();
  }

  private fileStamp(): string {
    if (!this.file) return '';
    try {
      const st = statSync(this.file);
      return `${st.ino}:${st.size}:${st.mtimeMs}`;
    } catch {
      return 'missing';
    }
  }

  /** The current keyring (re-read first when the file changed). */
  keyring(): Keyring {
    if (this.file) {
      const stamp = this.fileStamp();
      if (stamp !== this.stamp) {
        // A broken edit keeps the last good keyring: secrets stay readable while it is fixed.
        try {
          this.cached = readKeyringFile(this.file);
          this.stamp = stamp;
        } catch (e) {
          if (this.failedStamp !== stamp) this.onReloadError(`keyring ${this.file} changed but cannot be used; keeping the previous keys: ${(e as Error).message}`);
          this.failedStamp = stamp;
        }
      }
    }
    return this.cached;
  }
}
