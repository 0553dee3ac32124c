/**
 * Repository credentials named by a template (`repository.credentialsSecret`), read from files
 * the node's administrator places in `<node data dir>/secrets/<name>.json` as
 * `{"username": "...", "password": "..."}` (mode 0600, root-owned). They are used host-side by
 * the checkout only: never passed into a box, a prebuild, an image or a log. The control plane's
 * own secret store (per org/team/user, encrypted at rest) is a later release; until then this is
 * where a node gets credentials from.
 */
import { readFile, stat } from 'node:fs/promises';
import { join } from 'node:path';
import type { GitCredentials } from './repository-checkout.js';

const NAME = /^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$/;

export class NodeSecretFiles {
  constructor(private readonly dir: string) {}

  /** The credentials of `name`; a clear error says where they are expected when they are missing. */
  async gitCredentials(name: string): Promise<GitCredentials> {
    if (!NAME.test(name)) throw new Error(`invalid secret name "${name}"`);
    const file = join(this.dir, `${name}.json`);
    let raw: string;
    try {
      const st = await stat(file);
      // Readable by others means the secret already leaked on this host: refuse to use it.
      if ((st.mode & 0o077) !== 0) throw new Error(`secret file ${file} must not be readable by group or others (chmod 600)`);
      raw = await readFile(file, 'utf8');
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code === 'ENOENT') throw new Error(`secret "${name}" is not on this node: put {"username","password"} in ${file} (mode 0600)`);
      throw e;
    }
    let parsed: unknown;
    try {
      parsed = JSON.parse(raw);
    } catch {
      throw new Error(`secret file ${file} is not JSON`);
    }
    const c = parsed as Partial<GitCredentials>;
    if (typeof c.username !== 'string' || typeof c.password !== 'string' || !c.username || !c.password) {
      throw new Error(`secret file ${file} must hold {"username": "...", "password": "..."}`);
    }
    return { username: c.username, password: c.password };
  }
}
