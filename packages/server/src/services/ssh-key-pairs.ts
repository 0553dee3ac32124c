/**
 * SSH key pairs the server makes: each box's host key and the gateway's. ssh2 (the gateway's SSH
 * server and this module's generator) drops the leading zero bytes of an ed25519 public key when it
 * writes one, so about one pair in 256 comes out malformed — neither half loads again. A new pair
 * is only handed out once both halves load; a stored pair with such a key (written before this
 * check) is recognised by its public key's length and replaced, instead of breaking its box's or
 * the gateway's SSH for good.
 */
import ssh2 from 'ssh2';

/** An OpenSSH key pair as stored: private key (OpenSSH PEM) and public key line. */
export interface SshKeyPair {
  privateKey: string;
  publicKey: string;
}

/** Whether both halves of a pair load as the same key. */
export function isLoadableSshKeyPair(k: SshKeyPair): boolean {
  const priv = ssh2.utils.parseKey(k.privateKey);
  const pub = ssh2.utils.parseKey(k.publicKey);
  if (priv instanceof Error || pub instanceof Error || Array.isArray(priv) || Array.isArray(pub)) return false;
  return priv.isPrivateKey() && !pub.isPrivateKey() && priv.getPublicSSH().equals(pub.getPublicSSH());
}

/**
 * Whether a stored pair's ed25519 public key has its 32 bytes — a check cheap enough for every
 * route table (parsing both halves costs ~30 µs a pair). Other key types pass.
 */
export function hasWholeEd25519Key(k: SshKeyPair): boolean {
  const [type, b64] = k.publicKey.trim().split(/\s+/);
  if (type !== 'ssh-ed25519' || !b64) return true;
  const blob = Buffer.from(b64, 'base64');
  // string "ssh-ed25519" (4 + 11 bytes), then string key (4 + 32 bytes).
  return blob.length === 51 && blob.readUInt32BE(15) === 32;
}

/** A new ed25519 key pair in OpenSSH format, both halves loadable. */
export function newSshKeyPair(comment?: string): SshKeyPair {
  for (;;) {
    const k = ssh2.utils.generateKeyPairSync('ed25519', comment === undefined ? undefined : { comment });
    const pair = { privateKey: k.private, publicKey: k.public };
    if (isLoadableSshKeyPair(pair)) return pair;
  }
}
