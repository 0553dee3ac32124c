/**
 * Registry credentials from files an administrator places at `<secrets dir>/registry/<host>.json`
 * (`{"username": "...", "password": "..."}`, mode 0600), used by the control plane (to pin tags at
 * template push) and by nodes (to pull). A registry without a file is used anonymously. The
 * control plane's own secret store is a later release; until then this is where credentials live.
 */
import { readFile, stat } from 'node:fs/promises';
import { join } from 'node:path';
import type { RegistryCredentials } from './registry-client.js';

const HOST = /^[A-Za-z0-9.-]+(:\d+)?$/;

export function registryCredentialFiles(secretsDir: string): (host: string) => Promise<RegistryCredentials | undefined> {
  return async (host) => {
    if (!HOST.test(host)) return undefined;
    const file = join(secretsDir, 'registry', `${host}.json`);
    try {
      const st = await stat(file);
      // Readable by others means the secret already leaked on this host: refuse to use it.
      if ((st.mode & 0o077) !== 0) throw new Error(`registry credentials ${file} must not be readable by group or others (chmod 600)`);
      const c = JSON.parse(await readFile(file, 'utf8')) as Partial<RegistryCredentials>;
      if (typeof c.username !== 'string' || typeof c.password !== 'string') throw new Error(`${file} must hold {"username": "...", "password": "..."}`);
      return { username: c.username, password: c.password };
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
      throw e;
    }
  };
}
