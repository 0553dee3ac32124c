/**
 * `devyard server rotate-kek`: moves every secret's data key under the keyring's current KEK (one
 * transaction), optionally after adding a freshly generated KEK as the new current one, and
 * optionally dropping from the keyring file the KEKs no row needs any more. Safe next to a running
 * server: it re-reads a changed keyring file before it wraps or unwraps anything.
 */
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { ChangeFeed } from '../change-feed.js';
import { SecretStore } from '../store/secret-store.js';
import { openSqliteDatabase } from '../store/sqlite-database.js';
import { Store } from '../store/store.js';
import { generateKek, keyringFile, KeyringError, KeyringSource, parseKeyring, writeKeyringFile } from './secret-envelope.js';
import { SecretService } from './secret-service.js';

export interface RotateKekOptions {
  /** The server data dir (database and keyring file). */
  dataDir: string;
  /** DEVYARD_KEK, if set: the keyring then comes from it, and the file is not touched. */
  env?: string;
  /** Add a new random KEK to the keyring file as the current one first (file keyrings only). */
  generate?: boolean;
  /** Afterwards remove from the keyring file every non-current KEK that no secret uses (file keyrings only). */
  dropUnused?: boolean;
}

export interface RotateKekResult {
  /** Where the keys came from. */
  origin: string;
  /** The current KEK every data key is now wrapped with. */
  currentKekId: string;
  /** Id of the KEK `generate` added. */
  generatedKekId?: string;
  /** Rows whose data key was re-wrapped. */
  rewrapped: number;
  /** KEK ids removed from the keyring file. */
  dropped: string[];
  /** Non-current KEKs still in the keyring that no secret needs any more (safe to remove). */
  unused: string[];
}

export async function rotateKek(o: RotateKekOptions): Promise<RotateKekResult> {
  const fromEnv = o.env !== undefined && o.env.trim() !== '';
  if (fromEnv && (o.generate || o.dropUnused)) {
    throw new KeyringError('the keyring comes from DEVYARD_KEK: put the new key first in DEVYARD_KEK yourself (id:base64,…) instead of --generate / --drop-unused');
  }
  const file = keyringFile(o.dataDir);
  let generatedKekId: string | undefined;
  if (o.generate) {
    const ring = parseKeyring(readFileSync(file, 'utf8'), file);
    const kek = generateKek();
    writeKeyringFile(file, [kek, ...ring.keys]);
    generatedKekId = kek.id;
  }
  const keys = new KeyringSource({ dataDir: o.dataDir, env: o.env, create: false });
  const store = new Store(await openSqliteDatabase(join(o.dataDir, 'devyard.db')));
  try {
    const secrets = new SecretStore(store.db);
    const service = new SecretService({ store, secrets, keys, feed: new ChangeFeed(), now: Date.now });
    const { rewrapped, currentKekId } = await service.rewrapAll();
    const inUse = new Set(await secrets.kekIdsInUse());
    const ring = keys.keyring();
    const unused = ring.ids.filter((id) => id !== currentKekId && !inUse.has(id));
    let dropped: string[] = [];
    if (o.dropUnused && unused.length > 0) {
      // Re-check after the rewrite decision: a secret written meanwhile by a running server uses
      // the current key (it re-reads the file), so only keys no row references are dropped.
      const stillUsed = new Set(await secrets.kekIdsInUse());
      dropped = unused.filter((id) => !stillUsed.has(id));
      writeKeyringFile(file, ring.keys.filter((k) => !dropped.includes(k.id)));
    }
    return { origin: keys.origin, currentKekId, ...(generatedKekId ? { generatedKekId } : {}), rewrapped, dropped, unused: unused.filter((id) => !dropped.includes(id)) };
  } finally {
    await store.close();
  }
}
