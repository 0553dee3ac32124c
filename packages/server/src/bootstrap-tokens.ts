/**
 * First-start credentials: an admin API token, a node join token and a gateway token, stored hashed in the store and
 * in plain text only in files readable by root (0600) in the data dir, from where `devyard up`
 * hands them to the CLI and the local agent.
 */
import { randomBytes } from 'node:crypto';
import { existsSync, mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { hashToken } from './token-hash.js';
import { newId } from './ids.js';
import type { Store } from './store/store.js';

export interface BootstrapTokens {
  adminToken: string;
  nodeToken: string;
  /** Token `devyard gateway` processes authenticate with. */
  gatewayToken: string;
}

async function ensureToken(store: Store, file: string, kind: 'user' | 'node' | 'gateway', subject: string, now: number): Promise<string> {
  if (existsSync(file)) {
    const token = readFileSync(file, 'utf8').trim();
    if (await store.findTokenByHash(hashToken(token))) return token;
  }
  const token = `dy_${kind[0]}_${randomBytes(24).toString('base64url')}`;
  // The admin token speaks for the bootstrap admin (user u_admin, owner of the default organization).
  const user = kind === 'user' ? { user_id: 'u_admin', org_id: 'org_default' } : {};
  await store.insertToken({ id: newId('t'), token_hash: hashToken(token), name: `bootstrap ${kind}`, kind, subject, created_at: now, ...user });
  writeFileSync(file, `${token}\n`, { mode: 0o600 });
  return token;
}

export async function ensureBootstrapTokens(store: Store, dataDir: string, now: number): Promise<BootstrapTokens> {
  mkdirSync(dataDir, { recursive: true });
  return {
    adminToken: await ensureToken(store, join(dataDir, 'admin.token'), 'user', 'admin', now),
    nodeToken: await ensureToken(store, join(dataDir, 'node.token'), 'node', 'node', now),
    gatewayToken: await ensureToken(store, join(dataDir, 'gateway.token'), 'gateway', 'gateway', now),
  };
}
