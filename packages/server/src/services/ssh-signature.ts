/**
 * Verifies OpenSSH file signatures (`ssh-keygen -Y sign`, the SSHSIG format of OpenSSH's
 * PROTOCOL.sshsig): the proof that whoever registers an SSH key holds its private half. Without
 * it, anyone could register another user's public key, and the gateway (which knows a user by
 * their key) would hand that user's connections to them.
 *
 * Signed data: "SSHSIG" ‖ string namespace ‖ string reserved ‖ string hash ‖ string H(message);
 * the armored blob: "SSHSIG" ‖ uint32 1 ‖ string publickey ‖ string namespace ‖ string reserved ‖
 * string hash ‖ string signature, where the signature is an SSH signature blob (string algorithm ‖
 * string bytes). Ed25519, RSA (SHA-2 only) and ECDSA keys are accepted.
 */
import { createHash, createPublicKey, verify as cryptoVerify, type KeyObject } from 'node:crypto';
import ssh2 from 'ssh2';

const MAGIC = Buffer.from('SSHSIG');

/** Why a signature is refused, for the caller's error message. */
export class SshSignatureError extends Error {}

/** Reads SSH wire strings one after another. */
class WireReader {
  private off = 0;
  constructor(private readonly buf: Buffer) {}

  bytes(n: number): Buffer {
    if (this.off + n > this.buf.length) throw new SshSignatureError('the signature is truncated');
    const out = this.buf.subarray(this.off, this.off + n);
    this.off += n;
    return out;
  }

  uint32(): number {
    return this.bytes(4).readUInt32BE(0);
  }

  string(): Buffer {
    return this.bytes(this.uint32());
  }

  get done(): boolean {
    return this.off === this.buf.length;
  }
}

const wireString = (b: Buffer | string): Buffer => {
  const data = typeof b === 'string' ? Buffer.from(b) : b;
  const len = Buffer.alloc(4);
  len.writeUInt32BE(data.length);
  return Buffer.concat([len, data]);
};

/** The blob inside `-----BEGIN SSH SIGNATURE-----` armor. */
function dearmor(text: string): Buffer {
  const m = /^-----BEGIN SSH SIGNATURE-----\r?\n([A-Za-z0-9+/=\r\n]+)-----END SSH SIGNATURE-----\s*$/.exec(text.trim() + '\n');
  if (!m) throw new SshSignatureError('not an SSH signature (expected the output of `ssh-keygen -Y sign`)');
  return Buffer.from(m[1]!.replace(/\s+/g, ''), 'base64');
}

/** An ECDSA signature's two mpints as the fixed-size r‖s Node verifies. */
function ecdsaP1363(sig: Buffer, size: number): Buffer {
  const r = new WireReader(sig);
  const [a, b] = [r.string(), r.string()];
  const fixed = (x: Buffer) => {
    const trimmed = x.subarray(Math.max(0, x.findIndex((v) => v !== 0)));
    if (trimmed.length > size) throw new SshSignatureError('malformed ECDSA signature');
    return Buffer.concat([Buffer.alloc(size - trimmed.length), trimmed]);
  };
  return Buffer.concat([fixed(a), fixed(b)]);
}

/** Checks one SSH signature blob (algorithm + bytes) over `data` with `key`. */
function verifySshSignature(blob: Buffer, data: Buffer, key: KeyObject, keyType: string): boolean {
  const r = new WireReader(blob);
  const algo = r.string().toString();
  const sig = r.string();
  switch (algo) {
    case 'ssh-ed25519':
      return keyType === 'ssh-ed25519' && cryptoVerify(null, data, key, sig);
    case 'rsa-sha2-256':
    case 'rsa-sha2-512':
      return keyType === 'ssh-rsa' && cryptoVerify(algo === 'rsa-sha2-256' ? 'sha256' : 'sha512', data, key, sig);
    case 'ecdsa-sha2-nistp256':
    case 'ecdsa-sha2-nistp384':
    case 'ecdsa-sha2-nistp521': {
      if (keyType !== algo) return false;
      const [hash, size] = algo.endsWith('256') ? ['sha256', 32] : algo.endsWith('384') ? ['sha384', 48] : ['sha512', 66];
      return cryptoVerify(hash, data, { key, dsaEncoding: 'ieee-p1363' }, ecdsaP1363(sig, size));
    }
    default:
      // ssh-rsa means SHA-1, which OpenSSH itself no longer accepts for signatures.
      throw new SshSignatureError(`signature algorithm ${algo} is not accepted`);
  }
}

/**
 * Throws SshSignatureError unless `armored` is a signature of `message` in `namespace` made with
 * the private half of `publicKeyBlob` (the key's SSH wire encoding).
 */
export function verifySshFileSignature(armored: string, message: Buffer | string, namespace: string, publicKeyBlob: Buffer): void {
  const r = new WireReader(dearmor(armored));
  if (!r.bytes(6).equals(MAGIC)) throw new SshSignatureError('not an SSH signature (bad preamble)');
  const version = r.uint32();
  if (version !== 1) throw new SshSignatureError(`SSH signature version ${version} is not supported`);
  const signer = r.string();
  const ns = r.string().toString();
  const reserved = r.string();
  const hashAlgo = r.string().toString();
  const sigBlob = r.string();
  if (!r.done) throw new SshSignatureError('trailing bytes after the signature');
  if (!signer.equals(publicKeyBlob)) throw new SshSignatureError('the signature was made with another key than the one being registered');
  if (ns !== namespace) throw new SshSignatureError(`the signature is for namespace "${ns}", not "${namespace}"`);
  if (hashAlgo !== 'sha256' && hashAlgo !== 'sha512') throw new SshSignatureError(`hash ${hashAlgo} is not accepted`);
  const parsed = ssh2.utils.parseKey(`${new WireReader(signer).string().toString()} ${signer.toString('base64')}`);
  if (parsed instanceof Error || Array.isArray(parsed)) throw new SshSignatureError('the signing key cannot be read');
  const key = createPublicKey(parsed.getPublicPEM());
  const digest = createHash(hashAlgo).update(message).digest();
  const signed = Buffer.concat([MAGIC, wireString(ns), wireString(reserved), wireString(hashAlgo), wireString(digest)]);
  let ok: boolean;
  try {
    ok = verifySshSignature(sigBlob, signed, key, parsed.type);
  } catch (e) {
    if (e instanceof SshSignatureError) throw e;
    throw new SshSignatureError(`the signature cannot be checked: ${(e as Error).message}`);
  }
  if (!ok) throw new SshSignatureError('the signature does not verify with this key');
}
