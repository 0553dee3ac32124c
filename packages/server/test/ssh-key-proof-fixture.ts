/**
 * Registering SSH keys in tests the way the CLI does: a challenge from the server, signed with the
 * key by OpenSSH's `ssh-keygen -Y sign` (the real signer, not one of ours).
 */
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { SshKey } from '@devyard/api/access-schemas';
import { signKeyChallenge } from '@devyard/cli/ssh-key-proof';
import type { DevyardClient } from '@devyard/sdk/devyard-client';
import type { SshKeyPair } from '@devyard/server/services/ssh-key-pairs';

/** A challenge for `client`'s user, signed with the private key in `privateKeyFile`. */
export async function proofWithFile(client: DevyardClient, privateKeyFile: string, publicKeyLine: string): Promise<{ challenge: string; signature: string }> {
  const { challenge } = await client.sshKeyChallenge();
  return { challenge, signature: signKeyChallenge(challenge, publicKeyLine, { identity: privateKeyFile }) };
}

/** Registers the key pair in `privateKeyFile` (+ `.pub`), as `devyard keys add` does. */
export async function addKeyFile(client: DevyardClient, privateKeyFile: string, name?: string): Promise<SshKey> {
  const pub = readFileSync(`${privateKeyFile}.pub`, 'utf8').trim();
  return client.addSshKey(pub, await proofWithFile(client, privateKeyFile, pub), name);
}

/** A proof for an in-memory pair (written to a private temp file for ssh-keygen). */
export async function proofForPair(client: DevyardClient, pair: SshKeyPair): Promise<{ challenge: string; signature: string }> {
  const dir = mkdtempSync(join(tmpdir(), 'devyard-keyproof-'));
  try {
    const file = join(dir, 'key');
    writeFileSync(file, pair.privateKey, { mode: 0o600 });
    return await proofWithFile(client, file, pair.publicKey);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

/** Registers an in-memory pair with its proof. */
export async function addKeyPair(client: DevyardClient, pair: SshKeyPair, name?: string): Promise<SshKey> {
  return client.addSshKey(pair.publicKey, await proofForPair(client, pair), name);
}
