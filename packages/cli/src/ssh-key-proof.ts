/**
 * Signs a key registration challenge with OpenSSH's own signer (`ssh-keygen -Y sign`), so the
 * server learns that whoever registers a key holds its private half — from the private key file,
 * or from ssh-agent when only the public key is at hand.
 */
import { spawnSync } from 'node:child_process';
import { existsSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { SSH_KEY_PROOF_NAMESPACE } from '@devyard/api/access-schemas';
import { CliUsageError } from './cli-config.js';

/**
 * The armored signature of `challenge` made with the key of `publicKeyLine`: with `identity` (a
 * private key file), else the private key beside `publicKeyFile` (its name without `.pub`), else
 * ssh-agent (ssh-keygen signs with the agent's key for a public key file).
 */
export function signKeyChallenge(challenge: string, publicKeyLine: string, opts: { identity?: string; publicKeyFile?: string } = {}): string {
  const beside = opts.publicKeyFile?.endsWith('.pub') ? opts.publicKeyFile.slice(0, -4) : undefined;
  const privateFile = opts.identity ?? (beside && existsSync(beside) ? beside : undefined);
  const tmp = privateFile ? undefined : mkdtempSync(join(tmpdir(), 'devyard-key-'));
  try {
    let keyFile = privateFile;
    if (!keyFile) {
      keyFile = join(tmp!, 'key.pub');
      writeFileSync(keyFile, `${publicKeyLine.trim()}\n`, { mode: 0o600 });
    }
    const r = spawnSync('ssh-keygen', ['-q', '-Y', 'sign', '-n', SSH_KEY_PROOF_NAMESPACE, '-f', keyFile], { input: challenge, encoding: 'utf8', stdio: ['pipe', 'pipe', 'pipe'] });
    if (r.error) throw new CliUsageError(`cannot run ssh-keygen to prove you hold the key: ${r.error.message}`);
    if (r.status !== 0 || !r.stdout.includes('BEGIN SSH SIGNATURE')) {
      const where = privateFile ? `with ${privateFile}` : 'with ssh-agent (no private key file next to it: name one with --identity)';
      throw new CliUsageError(`could not sign the registration challenge ${where}: ${r.stderr.trim() || `ssh-keygen exited ${r.status}`}`);
    }
    return r.stdout;
  } finally {
    if (tmp) rmSync(tmp, { recursive: true, force: true });
  }
}
