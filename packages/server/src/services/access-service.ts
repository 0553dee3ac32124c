/**
 * Access to boxes: users' SSH keys, each box's SSH host identity, port visibility, signed access
 * tokens for gateways, and the gateway sync (registration, activity, route table) and wake calls.
 * The access rules themselves are core's access-policy, shared with the gateways.
 */
import { createHash, createHmac, createPrivateKey, generateKeyPairSync, randomBytes, timingSafeEqual, type KeyObject } from 'node:crypto';
import ssh2 from 'ssh2';
import { SSH_KEY_PROOF_NAMESPACE, type AccessToken, type AddSshKeyRequest, type BoxConnection, type BoxPort, type GatewayEndpoint, type PortVisibility, type SignInRequest, type SshKey, type SshKeyChallenge } from '@devyard/api/access-schemas';
import { BROWSER_SESSION_TTL_MS, SIGN_IN_LINK_TTL_MS, signAccessToken, verifyAccessToken } from '@devyard/api/access-tokens';
import type { BrowserSession, GatewaySyncRequest, RouteTable } from '@devyard/api/gateway-schemas';
import { signSessionToken } from '@devyard/api/session-tokens';
import { boxHostAlias, previewHost, type BrowserScope } from '@devyard/core/access-policy';
import { accessAtLeast } from '@devyard/core/rbac-policy';
import { DomainError } from '@devyard/core/domain-error';
import { newId } from '../ids.js';
import type { BoxRecord } from '../store/box-records.js';
import type { AccessStore } from '../store/access-store.js';
import type { Store } from '../store/store.js';
import type { TenancyStore } from '../store/tenancy-store.js';
import type { BoxService, Subject } from './box-service.js';
import { hasWholeEd25519Key, newSshKeyPair, type SshKeyPair } from './ssh-key-pairs.js';
import { SshSignatureError, verifySshFileSignature } from './ssh-signature.js';

export interface AccessServiceOptions {
  /** Lifetime of the agent tokens in a route table: how long gateways work on with the server down. */
  agentTokenTtlMs?: number;
  /** A gateway not seen for this long is not offered to clients. */
  gatewayFreshMs?: number;
  /** Memberships and box shares for the route table (absent: everyone is a member of the default org). */
  tenancy?: TenancyStore;
  /** The principal of a user in an organization (for wake: the gateway acts for a user it authenticated). */
  principalByName?: (name: string, orgId: string) => Promise<Subject | undefined>;
}

const ACCESS_SIGNING_KEY = 'access-token-signing';
const GATEWAY_HOST_KEY = 'gateway-host-key';
const KEY_CHALLENGE_SECRET = 'ssh-key-challenge-secret';
/** How long a key registration challenge may be signed and used. */
const KEY_CHALLENGE_TTL_MS = 5 * 60_000;
const b64url = (b: Buffer | string) => Buffer.from(b).toString('base64url');

/** `SHA256:…` as `ssh-keygen -l` prints it. */
export function sshFingerprint(publicBlob: Buffer): string {
  return `SHA256:${createHash('sha256').update(publicBlob).digest('base64').replace(/=+$/, '')}`;
}

/** Parses one OpenSSH public key line; refuses private keys, several keys and garbage. */
export function parsePublicKey(line: string): { algo: string; blob: Buffer; comment: string; canonical: string } {
  const text = line.trim();
  if (text.includes('\n')) throw new DomainError('invalid-input', 'give exactly one public key line', { field: 'publicKey' });
  if (/PRIVATE KEY/.test(text)) throw new DomainError('invalid-input', 'that is a private key; give the public key (the .pub file)', { field: 'publicKey' });
  const parsed = ssh2.utils.parseKey(text);
  if (parsed instanceof Error || Array.isArray(parsed) || parsed.isPrivateKey()) {
    throw new DomainError('invalid-input', `not an OpenSSH public key${parsed instanceof Error ? `: ${parsed.message}` : ''}`, { field: 'publicKey' });
  }
  const blob = parsed.getPublicSSH();
  const comment = text.split(/\s+/).slice(2).join(' ');
  return { algo: parsed.type, blob, comment, canonical: `${parsed.type} ${blob.toString('base64')}` };
}

/** SSH keys one user may register: the gateway matches a connecting key against them. */
export const MAX_SSH_KEYS_PER_USER = 50;

export class AccessService {
  private signingKey: Promise<{ privateKey: KeyObject; publicPem: string }> | undefined;
  private readonly agentTokenTtlMs: number;
  private readonly gatewayFreshMs: number;
  private readonly principalByName: (name: string, orgId: string) => Promise<Subject | undefined>;
  private readonly tenancy: TenancyStore | undefined;

  constructor(
    private readonly store: Store,
    private readonly access: AccessStore,
    private readonly boxes: BoxService,
    private readonly now: () => number,
    opts: AccessServiceOptions = {},
  ) {
    this.agentTokenTtlMs = opts.agentTokenTtlMs ?? 15 * 60_000;
    this.gatewayFreshMs = opts.gatewayFreshMs ?? 60_000;
    this.tenancy = opts.tenancy;
    this.principalByName = opts.principalByName ?? (async (name, orgId) => ({ name, kind: 'user', orgId, role: 'member', teamIds: [] }));
  }

  // ---- SSH keys ----

  async listKeys(subject: Subject): Promise<SshKey[]> {
    return (await this.access.listSshKeys(subject.name)).map((k) => ({
      id: k.id,
      name: k.name,
      publicKey: k.public_key,
      fingerprint: k.fingerprint,
      createdAt: new Date(k.created_at).toISOString(),
    }));
  }

  /**
   * A challenge for registering a key: signed by the server (no state to keep), naming the user
   * and an expiry, so a signature made for one user's registration is worth nothing to another.
   */
  async keyChallenge(subject: Subject): Promise<SshKeyChallenge> {
    const expiresAt = this.now() + KEY_CHALLENGE_TTL_MS;
    const body = b64url(JSON.stringify({ sub: subject.name, exp: expiresAt, nonce: randomBytes(16).toString('hex') }));
    return { challenge: `devyard-ssh-key.${body}.${await this.challengeMac(body)}`, namespace: SSH_KEY_PROOF_NAMESPACE, expiresAt: new Date(expiresAt).toISOString() };
  }

  private async challengeMac(body: string): Promise<string> {
    const secret = await this.access.serverKey(KEY_CHALLENGE_SECRET, () => ({ privateKey: randomBytes(32).toString('hex'), publicKey: '' }), this.now());
    return createHmac('sha256', Buffer.from(secret.privateKey, 'hex')).update(body).digest('base64url');
  }

  /** Refuses a challenge this server did not issue to `subject`, or one that expired. */
  private async checkChallenge(subject: Subject, challenge: string): Promise<void> {
    const refuse = (why: string) => new DomainError('invalid-input', `${why}; get a new one (POST /v1/users/me/keys/challenge, or \`devyard keys add\`)`, { field: 'challenge' });
    const [prefix, body, mac, ...rest] = challenge.split('.');
    if (prefix !== 'devyard-ssh-key' || !body || !mac || rest.length) throw refuse('not a key challenge of this server');
    const want = Buffer.from(await this.challengeMac(body));
    if (want.length !== Buffer.from(mac).length || !timingSafeEqual(want, Buffer.from(mac))) throw refuse('not a key challenge of this server');
    const claims = JSON.parse(Buffer.from(body, 'base64url').toString()) as { sub: string; exp: number };
    if (claims.sub !== subject.name) throw refuse('the challenge was issued to another user');
    if (claims.exp <= this.now()) throw refuse('the challenge has expired');
  }

  async addKey(subject: Subject, req: AddSshKeyRequest): Promise<SshKey> {
    const k = parsePublicKey(req.publicKey);
    // Registration proves possession: the gateway knows a user by their key alone, so a key
    // registered by someone who does not hold it would hand its owner's connections to them.
    await this.checkChallenge(subject, req.challenge);
    try {
      verifySshFileSignature(req.signature, req.challenge, SSH_KEY_PROOF_NAMESPACE, k.blob);
    } catch (e) {
      if (!(e instanceof SshSignatureError)) throw e;
      throw new DomainError('invalid-input', `no proof that you hold this key: ${e.message}`, { field: 'signature' });
    }
    const held = (await this.access.listSshKeys(subject.name)).length;
    if (held >= MAX_SSH_KEYS_PER_USER) {
      throw new DomainError('quota-exceeded', `${subject.name} has ${held} SSH keys, the most one user may register; remove one first`, { limit: MAX_SSH_KEYS_PER_USER });
    }
    const row = {
      id: newId('key'),
      subject: subject.name,
      name: req.name ?? (k.comment || k.algo),
      public_key: k.canonical,
      fingerprint: sshFingerprint(k.blob),
      created_at: this.now(),
    };
    await this.access.insertSshKey(row);
    return { id: row.id, name: row.name, publicKey: row.public_key, fingerprint: row.fingerprint, createdAt: new Date(row.created_at).toISOString() };
  }

  async removeKey(subject: Subject, idOrFingerprint: string): Promise<void> {
    if (!(await this.access.deleteSshKey(subject.name, idOrFingerprint))) {
      throw new DomainError('not-found', `you have no SSH key "${idOrFingerprint}"`, { id: idOrFingerprint });
    }
  }

  // ---- host identities ----

  /** Host keys of the given boxes, generating the missing ones (boxes created before this existed) and replacing unloadable ones. */
  private async hostKeys(boxIds: string[]): Promise<Map<string, SshKeyPair>> {
    const keys = await this.access.getHostKeys(boxIds);
    const missing = boxIds.filter((id) => !keys.has(id));
    const broken = boxIds.filter((id) => keys.has(id) && !hasWholeEd25519Key(keys.get(id)!));
    if (missing.length === 0 && broken.length === 0) return keys;
    for (const id of missing) await this.access.insertHostKeyIfAbsent(id, newSshKeyPair());
    for (const id of broken) await this.access.replaceHostKey(id, keys.get(id)!.privateKey, newSshKeyPair());
    for (const [id, k] of await this.access.getHostKeys([...missing, ...broken])) keys.set(id, k);
    return keys;
  }

  private async gatewayHostKey(): Promise<SshKeyPair> {
    const k = await this.access.serverKey(GATEWAY_HOST_KEY, newSshKeyPair, this.now());
    if (hasWholeEd25519Key(k)) return k;
    await this.access.replaceServerKey(GATEWAY_HOST_KEY, k.privateKey, newSshKeyPair(), this.now());
    return this.access.serverKey(GATEWAY_HOST_KEY, newSshKeyPair, this.now());
  }

  private accessSigningKey(): Promise<{ privateKey: KeyObject; publicPem: string }> {
    this.signingKey ??= this.access
      .serverKey(
        ACCESS_SIGNING_KEY,
        () => {
          const k = generateKeyPairSync('ed25519');
          return {
            privateKey: k.privateKey.export({ type: 'pkcs8', format: 'pem' }).toString(),
            publicKey: k.publicKey.export({ type: 'spki', format: 'pem' }).toString(),
          };
        },
        this.now(),
      )
      .then((k) => ({ privateKey: createPrivateKey(k.privateKey), publicPem: k.publicKey }));
    return this.signingKey;
  }

  private async gatewayEndpoint(): Promise<GatewayEndpoint | null> {
    const g = await this.access.freshestGateway(this.now() - this.gatewayFreshMs);
    return g ? (JSON.parse(g.endpoint) as GatewayEndpoint) : null;
  }

  async connection(subject: Subject, name: string, owner?: string): Promise<BoxConnection> {
    const box = await this.connectable(subject, name, owner);
    const [hostKey, gatewayKey, gateway, activity] = await Promise.all([
      this.hostKeys([box.id]),
      this.gatewayHostKey(),
      this.gatewayEndpoint(),
      this.access.getActivity(box.id),
    ]);
    return {
      box: box.name,
      hostKeyAlias: boxHostAlias(box.name),
      hostKey: hostKey.get(box.id)!.publicKey,
      gatewayHostKey: gatewayKey.publicKey,
      sshUser: box.name,
      gateway,
      lastActivityAt: activity ? new Date(activity.last_active_at).toISOString() : null,
    };
  }

  /** A box the caller may connect to (404 when it may not see it, 403 when it may only read it). */
  private async connectable(subject: Subject, name: string, owner?: string): Promise<BoxRecord> {
    return this.boxes.get(subject, name, { owner, need: 'connect' });
  }

  // ---- ports ----

  /** Previews live only on their own hosts, never under the gateway's origin: none without a preview domain. */
  private previewUrl(endpoint: GatewayEndpoint | null, box: string, port: number): string | null {
    if (!endpoint?.previewDomain) return null;
    const u = new URL(endpoint.url);
    return `${u.protocol}//${previewHost(port, box, endpoint.previewDomain)}${u.port ? `:${u.port}` : ''}/`;
  }

  async listPorts(subject: Subject, name: string, owner?: string): Promise<BoxPort[]> {
    const box = await this.connectable(subject, name, owner);
    const endpoint = await this.gatewayEndpoint();
    return (await this.access.listPorts([box.id])).map((p) => ({ port: p.port, visibility: p.visibility as PortVisibility, previewUrl: this.previewUrl(endpoint, box.name, p.port) }));
  }

  /**
   * Changes who may open a port's preview. Making a port visible to the organization publishes
   * what the box serves there, so it takes managing the box: a connect-only share may use the box
   * and list its ports, not widen who else reaches them.
   */
  async setPort(subject: Subject, name: string, port: number, visibility: PortVisibility, owner?: string): Promise<BoxPort> {
    const box = await this.boxes.get(subject, name, { owner, need: 'manage' });
    if (visibility === 'private') await this.access.deletePort(box.id, port);
    else await this.access.setPort(box.id, port, visibility, this.now());
    return { port, visibility, previewUrl: this.previewUrl(await this.gatewayEndpoint(), box.name, port) };
  }

  async resetPort(subject: Subject, name: string, port: number, owner?: string): Promise<void> {
    const box = await this.boxes.get(subject, name, { owner, need: 'manage' });
    await this.access.deletePort(box.id, port);
  }

  // ---- tokens for gateways ----

  /**
   * A bearer token for the CLI, or with `signIn` the token of a browser sign-in link: valid for a
   * minute, for one terminal or one preview. A terminal link needs a box the caller may connect
   * to (404 otherwise, before any link exists); a preview's box is resolved by the gateway for the
   * viewer, as an org-visible port of another user's box may be meant.
   */
  async createAccessToken(subject: Subject, ttlSeconds: number, signIn?: SignInRequest): Promise<AccessToken> {
    const { privateKey } = await this.accessSigningKey();
    const iat = this.now();
    if (!signIn) {
      const exp = iat + ttlSeconds * 1000;
      return {
        token: signAccessToken({ sub: subject.name, aud: 'devyard-gateway', use: 'access', iat, exp }, privateKey),
        expiresAt: new Date(exp).toISOString(),
        gateway: await this.gatewayEndpoint(),
      };
    }
    let scope: BrowserScope;
    if (signIn.port === undefined) {
      await this.connectable(subject, signIn.box);
      scope = { kind: 'terminal', box: signIn.box };
    } else scope = { kind: 'preview', box: signIn.box, port: signIn.port };
    const exp = iat + SIGN_IN_LINK_TTL_MS;
    return {
      token: signAccessToken({ sub: subject.name, aud: 'devyard-gateway', use: 'sign-in', scope, jti: randomBytes(16).toString('base64url'), iat, exp }, privateKey),
      expiresAt: new Date(exp).toISOString(),
      gateway: await this.gatewayEndpoint(),
    };
  }

  /**
   * Redeems a sign-in link for the browser session it becomes (same user, same scope), once: the
   * store records the link's id, so a second redemption through any gateway is refused.
   */
  async redeemSignIn(token: string): Promise<BrowserSession> {
    const { privateKey, publicPem } = await this.accessSigningKey();
    const now = this.now();
    const link = verifyAccessToken(token, publicPem, now, 'sign-in');
    if (!link) throw new DomainError('unauthenticated', 'this sign-in link is invalid or expired (links last a minute): run `devyard open` again', { reason: 'sign-in-link-invalid' });
    if (!(await this.access.redeemSignIn({ jti: link.jti!, subject: link.sub, redeemed_at: now, expires_at: link.exp }, now))) {
      throw new DomainError('unauthenticated', 'this sign-in link was used already (each works once): run `devyard open` again', { reason: 'sign-in-link-used' });
    }
    const exp = now + BROWSER_SESSION_TTL_MS;
    return {
      token: signAccessToken({ sub: link.sub, aud: 'devyard-gateway', use: 'session', scope: link.scope, jti: randomBytes(16).toString('base64url'), iat: now, exp }, privateKey),
      expiresAt: exp,
    };
  }

  // ---- gateways ----

  async sync(req: GatewaySyncRequest): Promise<RouteTable> {
    const now = this.now();
    await this.access.upsertGateway({ id: req.gatewayId, endpoint: JSON.stringify(req.endpoint), last_seen_at: now });
    const boxes = await this.store.listBoxes();
    const known = new Set(boxes.map((b) => b.id));
    for (const a of req.activity) {
      if (!known.has(a.boxId)) continue;
      await this.access.recordActivity({ box_id: a.boxId, last_active_at: Math.min(a.lastActiveAt, now), sessions: a.sessions, gateway_id: req.gatewayId, reported_at: now });
    }
    const ids = boxes.map((b) => b.id);
    const [hostKeys, ports, nodes, keys, gatewayKey, signing, shares, directory] = await Promise.all([
      this.hostKeys(ids),
      this.access.listPorts(ids),
      this.store.listNodes(),
      this.access.listSshKeys(),
      this.gatewayHostKey(),
      this.accessSigningKey(),
      this.tenancy ? this.tenancy.sharesOf(ids) : new Map<string, Array<{ teamId: string; access: string }>>(),
      this.tenancy ? this.tenancy.directory() : undefined,
    ]);
    const nodeById = new Map(nodes.map((n) => [n.id, n]));
    const expiresAt = now + this.agentTokenTtlMs;
    const users = new Map<string, string[]>();
    for (const k of keys) users.set(k.subject, [...(users.get(k.subject) ?? []), k.public_key]);
    return {
      generatedAt: now,
      expiresAt,
      accessTokenKey: signing.publicPem,
      gatewayHostKey: gatewayKey.privateKey,
      boxes: boxes.map((b) => {
        const node = b.nodeId ? nodeById.get(b.nodeId) : undefined;
        return {
          id: b.id,
          name: b.name,
          owner: b.owner,
          orgId: b.orgId,
          shares: (shares.get(b.id) ?? []) as Array<{ teamId: string; access: 'connect' | 'manage' }>,
          phase: b.phase,
          desiredState: b.desiredState,
          agentUrl: node?.agentUrl ?? null,
          agentToken: node ? signSessionToken({ boxId: b.id, sub: 'gateway', exp: expiresAt }, node.sessionKey) : null,
          hostKey: hostKeys.get(b.id)!.privateKey,
          ports: ports.filter((p) => p.boxId === b.id).map((p) => ({ port: p.port, visibility: p.visibility as PortVisibility })),
        };
      }),
      users: [...new Set([...users.keys(), ...(directory?.keys() ?? [])])].map((subject) => ({
        subject,
        keys: users.get(subject) ?? [],
        memberships: (directory?.get(subject) ?? [{ orgId: 'org_default', role: 'member', teamIds: [] }]) as RouteTable['users'][number]['memberships'],
      })),
    };
  }

  /** Starts or resumes a box for a user connecting through a gateway, if that user may. */
  async wake(boxId: string, subjectName: string): Promise<BoxRecord> {
    const box = await this.store.getBox(boxId);
    const subject = box ? await this.principalByName(subjectName, box.orgId) : undefined;
    const access = box && subject ? await this.boxes.accessOf(subject, box) : 'none';
    if (!box || !subject || box.deletedAt !== null || !accessAtLeast(access, 'connect')) throw new DomainError('not-found', `box ${boxId} not found`, { id: boxId });
    if (!accessAtLeast(access, 'manage')) throw new DomainError('forbidden', `you may not start box "${box.name}"`, { name: box.name });
    if (box.desiredState === 'paused') return this.boxes.applyVerb(subject, box.name, 'resume', undefined, box.owner);
    if (box.desiredState === 'stopped') return this.boxes.applyVerb(subject, box.name, 'start', undefined, box.owner);
    if (box.desiredState === 'deleted') throw new DomainError('not-found', `box ${boxId} not found`, { id: boxId });
    return box;
  }
}
