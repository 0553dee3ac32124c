/**
 * The typed client of the Devyard API, used by the CLI, the agent, the web UI and the tests. Types
 * come from the same zod schemas the server validates with.
 */
import { BOX_PAGE_MAX, type Box, type BoxEvent, type BoxList, type CreateBoxRequest, type ExecSession, type ForkBoxRequest, type ForkBoxResponse, type MoveBoxRequest } from '@devyard/api/box-schemas';
import type { BoxStatusReport, DesiredSet, PrebuildReport, Node, RegisterNodeRequest, RegisterNodeResponse } from '@devyard/api/node-schemas';
import type { CreateTemplateInput, Prebuild, Template } from '@devyard/api/template-schemas';
import type { AccessToken, BoxConnection, BoxPort, PortVisibility, SshKey, SshKeyChallenge } from '@devyard/api/access-schemas';
import type { BrowserSession, GatewaySyncRequest, RouteTable } from '@devyard/api/gateway-schemas';
import type { SecretMetadata } from '@devyard/api/secret-schemas';
import type { AuditEntry, AuditVerification } from '@devyard/api/audit-schemas';
import type { OidcLoginToken } from '@devyard/api/oidc-schemas';
import type { BoxShare, CreatedInvitation, CreatedToken, Invitation, Me, Member, Quota, QuotaLimits, Team, Token } from '@devyard/api/tenancy-schemas';
import type { OrgRole } from '@devyard/core/rbac-policy';
import { ApiError } from './api-error.js';
import { readSse } from './sse-client.js';

export interface ClientOptions {
  url: string;
  token?: string;
  /** Per-request timeout for non-streaming calls. */
  timeoutMs?: number;
}

export type BoxVerb = 'start' | 'stop' | 'pause' | 'resume';

export class DevyardClient {
  readonly url: string;
  private readonly token?: string;
  private readonly timeoutMs: number;

  constructor(opts: ClientOptions) {
    this.url = opts.url.replace(/\/+$/, '');
    this.token = opts.token;
    this.timeoutMs = opts.timeoutMs ?? 30_000;
  }

  private headers(extra: Record<string, string> = {}): Record<string, string> {
    return { accept: 'application/json', ...(this.token ? { authorization: `Bearer ${this.token}` } : {}), ...extra };
  }

  /** Sends a request; answers the parsed body, or throws ApiError with the server's problem. */
  async request<T>(method: string, path: string, opts: { body?: unknown; headers?: Record<string, string>; stream?: boolean; signal?: AbortSignal } = {}): Promise<{ body: T; res: Response }> {
    let res: Response;
    for (let attempt = 1; ; attempt++) {
      try {
        res = await fetch(this.url + path, {
          method,
          headers: this.headers({ ...(opts.body !== undefined ? { 'content-type': 'application/json' } : {}), ...opts.headers }),
          body: opts.body !== undefined ? JSON.stringify(opts.body) : undefined,
          signal: opts.signal ?? (opts.stream ? undefined : AbortSignal.timeout(this.timeoutMs)),
        });
        break;
      } catch (e) {
        const cause = (e as { cause?: { code?: string } }).cause?.code ?? (e as Error).name;
        // A kept-alive connection the server closed while idle fails the request sent on it before
        // the client saw the close; like browsers, send an idempotent request once more on a new one.
        if (attempt === 1 && RETRYABLE_SOCKET_ERRORS.has(cause) && IDEMPOTENT.has(method.toUpperCase())) continue;
        throw new ApiError(0, 'unreachable', `cannot reach the Devyard server at ${this.url} (${cause}); is it running? (\`devyard up\`)`);
      }
    }
    if (!res.ok) {
      const text = await res.text();
      let problem: Record<string, unknown> = {};
      try {
        problem = JSON.parse(text) as Record<string, unknown>;
      } catch {}
      const detail = typeof problem.detail === 'string' ? problem.detail : text || res.statusText;
      throw new ApiError(res.status, typeof problem.code === 'string' ? problem.code : `http-${res.status}`, detail, problem);
    }
    if (opts.stream) return { body: undefined as T, res };
    const text = res.status === 204 ? '' : await res.text();
    return { body: (text ? JSON.parse(text) : undefined) as T, res };
  }

  private async get<T>(path: string): Promise<T> {
    return (await this.request<T>('GET', path)).body;
  }

  // ---- boxes ----

  async createBox(req: CreateBoxRequest, idempotencyKey?: string): Promise<Box> {
    return (await this.request<Box>('POST', '/v1/boxes', { body: req, headers: idempotencyKey ? { 'idempotency-key': idempotencyKey } : {} })).body;
  }

  /** Every box you may see in the current organization, oldest first (all pages). */
  async listBoxes(): Promise<Box[]> {
    const all: Box[] = [];
    let pageToken: string | undefined;
    do {
      const page = await this.listBoxesPage({ limit: BOX_PAGE_MAX, pageToken });
      all.push(...page.items);
      pageToken = page.nextPageToken;
    } while (pageToken);
    return all;
  }

  /** One page of boxes; pass the page's `nextPageToken` for the next one. */
  listBoxesPage(opts: { limit?: number; pageToken?: string } = {}): Promise<BoxList> {
    const q = new URLSearchParams();
    if (opts.limit !== undefined) q.set('limit', String(opts.limit));
    if (opts.pageToken !== undefined) q.set('pageToken', opts.pageToken);
    return this.get<BoxList>(`/v1/boxes${q.size ? `?${q}` : ''}`);
  }

  /** A box; `owner` addresses another user's box (shared with you, or you administer the organization). */
  getBox(name: string, owner?: string): Promise<Box> {
    return this.get<Box>(`/v1/boxes/${encodeURIComponent(name)}${this.ownerQuery(owner)}`);
  }

  async boxVerb(name: string, verb: BoxVerb, ifMatchVersion?: number, owner?: string): Promise<Box> {
    const headers = ifMatchVersion !== undefined ? { 'if-match': `"v${ifMatchVersion}"` } : undefined;
    return (await this.request<Box>('POST', `/v1/boxes/${encodeURIComponent(name)}/${verb}${this.ownerQuery(owner)}`, { headers })).body;
  }

  /**
   * Forks a running or paused microvm box into new boxes of yours (`body.name`, or NAME-1 … NAME-N
   * with `count`); `owner` addresses another user's box you may manage.
   */
  async forkBox(name: string, body: ForkBoxRequest, owner?: string): Promise<Box[]> {
    return (await this.request<ForkBoxResponse>('POST', `/v1/boxes/${encodeURIComponent(name)}/fork${this.ownerQuery(owner)}`, { body })).body.boxes;
  }

  /**
   * Moves a paused microvm box to another node (`body.node`, or one the scheduler picks); the box
   * shows `movingFrom` until its new node has it. `owner` addresses another user's box you may manage.
   */
  async moveBox(name: string, body: MoveBoxRequest = {}, owner?: string): Promise<Box> {
    return (await this.request<Box>('POST', `/v1/boxes/${encodeURIComponent(name)}/move${this.ownerQuery(owner)}`, { body })).body;
  }

  async deleteBox(name: string, ifMatchVersion?: number, owner?: string): Promise<Box> {
    const headers = ifMatchVersion !== undefined ? { 'if-match': `"v${ifMatchVersion}"` } : undefined;
    return (await this.request<Box>('DELETE', `/v1/boxes/${encodeURIComponent(name)}${this.ownerQuery(owner)}`, { headers })).body;
  }

  async boxEvents(name: string): Promise<BoxEvent[]> {
    return (await this.get<{ items: BoxEvent[] }>(`/v1/boxes/${encodeURIComponent(name)}/events`)).items;
  }

  /** Streams box snapshots as they change (first every current box). */
  async *watchBoxes(signal?: AbortSignal): AsyncGenerator<Box> {
    const { res } = await this.request('GET', '/v1/boxes?watch=1', { stream: true, signal, headers: { accept: 'text/event-stream' } });
    for await (const e of readSse<Box>(res, signal)) if (e.event === 'box') yield e.data;
  }

  /** Streams a box's events: its whole timeline first, then new events. */
  async *watchBoxEvents(name: string, signal?: AbortSignal): AsyncGenerator<BoxEvent> {
    const { res } = await this.request('GET', `/v1/boxes/${encodeURIComponent(name)}/events?watch=1`, { stream: true, signal, headers: { accept: 'text/event-stream' } });
    for await (const e of readSse<BoxEvent>(res, signal)) if (e.event === 'event') yield e.data;
  }

  async createExecSession(name: string, tty = false): Promise<ExecSession> {
    return (await this.request<ExecSession>('POST', `/v1/boxes/${encodeURIComponent(name)}/exec-sessions`, { body: { tty } })).body;
  }

  // ---- templates ----

  async createTemplate(req: CreateTemplateInput): Promise<Template> {
    return (await this.request<Template>('POST', '/v1/templates', { body: req })).body;
  }

  async listTemplates(): Promise<Template[]> {
    return (await this.get<{ items: Template[] }>('/v1/templates')).items;
  }

  getTemplate(name: string, version?: number): Promise<Template> {
    return this.get<Template>(`/v1/templates/${encodeURIComponent(name)}${version ? `?version=${version}` : ''}`);
  }

  async listTemplateVersions(name: string): Promise<Template[]> {
    return (await this.get<{ items: Template[] }>(`/v1/templates/${encodeURIComponent(name)}/versions`)).items;
  }

  async listTemplatePrebuilds(name: string): Promise<Prebuild[]> {
    return (await this.get<{ items: Prebuild[] }>(`/v1/templates/${encodeURIComponent(name)}/prebuilds`)).items;
  }

  // ---- nodes ----

  async listNodes(): Promise<Node[]> {
    return (await this.get<{ items: Node[] }>('/v1/nodes')).items;
  }

  async setCordoned(name: string, cordoned: boolean): Promise<Node> {
    return (await this.request<Node>('POST', `/v1/nodes/${encodeURIComponent(name)}/${cordoned ? 'cordon' : 'uncordon'}`)).body;
  }

  // ---- agent protocol ----

  async registerNode(req: RegisterNodeRequest): Promise<RegisterNodeResponse> {
    return (await this.request<RegisterNodeResponse>('POST', '/v1/agent/nodes', { body: req })).body;
  }

  async heartbeat(nodeId: string, images?: string[]): Promise<void> {
    await this.request('POST', `/v1/agent/nodes/${nodeId}/heartbeat`, { body: { images } });
  }

  getDesiredSet(nodeId: string): Promise<DesiredSet> {
    return this.get<DesiredSet>(`/v1/agent/nodes/${nodeId}/desired`);
  }

  async *watchDesiredSet(nodeId: string, signal?: AbortSignal): AsyncGenerator<DesiredSet> {
    const { res } = await this.request('GET', `/v1/agent/nodes/${nodeId}/desired?watch=1`, { stream: true, signal, headers: { accept: 'text/event-stream' } });
    for await (const e of readSse<DesiredSet>(res, signal)) if (e.event === 'desired') yield e.data;
  }

  async reportStatus(nodeId: string, reports: BoxStatusReport[], prebuilds: PrebuildReport[] = []): Promise<void> {
    await this.request('POST', `/v1/agent/nodes/${nodeId}/status`, { body: { reports, prebuilds } });
  }

  // ---- access ----

  getBoxConnection(name: string): Promise<BoxConnection> {
    return this.get<BoxConnection>(`/v1/boxes/${encodeURIComponent(name)}/connection`);
  }

  async listBoxPorts(name: string, owner?: string): Promise<BoxPort[]> {
    return (await this.get<{ items: BoxPort[] }>(`/v1/boxes/${encodeURIComponent(name)}/ports${this.ownerQuery(owner)}`)).items;
  }

  async setBoxPort(name: string, port: number, visibility: PortVisibility, owner?: string): Promise<BoxPort> {
    return (await this.request<BoxPort>('PUT', `/v1/boxes/${encodeURIComponent(name)}/ports/${port}${this.ownerQuery(owner)}`, { body: { visibility } })).body;
  }

  async resetBoxPort(name: string, port: number, owner?: string): Promise<void> {
    await this.request('DELETE', `/v1/boxes/${encodeURIComponent(name)}/ports/${port}${this.ownerQuery(owner)}`);
  }

  async listSshKeys(): Promise<SshKey[]> {
    return (await this.get<{ items: SshKey[] }>('/v1/users/me/keys')).items;
  }

  /** `devyard login`: redeems the one-time code of a sign-in with the verifier that started it. */
  async redeemOidcLogin(code: string, verifier: string): Promise<OidcLoginToken> {
    return (await this.request<OidcLoginToken>('POST', '/v1/auth/oidc/token', { body: { code, verifier } })).body;
  }

  /** A challenge to sign with a key before registering it (`ssh-keygen -Y sign -n devyard-ssh-key`). */
  async sshKeyChallenge(): Promise<SshKeyChallenge> {
    return (await this.request<SshKeyChallenge>('POST', '/v1/users/me/keys/challenge')).body;
  }

  /** Registers a key with the proof that you hold it: a challenge and its signature made with the key. */
  async addSshKey(publicKey: string, proof: { challenge: string; signature: string }, name?: string): Promise<SshKey> {
    return (await this.request<SshKey>('POST', '/v1/users/me/keys', { body: { publicKey, ...proof, ...(name ? { name } : {}) } })).body;
  }

  async removeSshKey(idOrFingerprint: string): Promise<void> {
    await this.request('DELETE', `/v1/users/me/keys/${encodeURIComponent(idOrFingerprint)}`);
  }

  async createAccessToken(ttlSeconds?: number): Promise<AccessToken> {
    return (await this.request<AccessToken>('POST', '/v1/access-tokens', { body: ttlSeconds ? { ttlSeconds } : {} })).body;
  }

  /** The token of a browser sign-in link: a box's terminal, or with `port` that port's preview (one use, a minute). */
  async createSignInToken(box: string, port?: number): Promise<AccessToken> {
    return (await this.request<AccessToken>('POST', '/v1/access-tokens', { body: { signIn: { box, ...(port !== undefined ? { port } : {}) } } })).body;
  }

  // ---- secrets (values are write-only: nothing here reads one back) ----

  /** Sets a secret; scope is `org`, `user`, `team:<team>` or `template:<template>`. */
  async putSecret(scope: string, name: string, value: string): Promise<{ secret: SecretMetadata; created: boolean }> {
    const { body, res } = await this.request<SecretMetadata>('PUT', `/v1/secrets/${encodeURIComponent(scope)}/${encodeURIComponent(name)}`, { body: { value } });
    return { secret: body, created: res.status === 201 };
  }

  async listSecrets(): Promise<SecretMetadata[]> {
    return (await this.get<{ items: SecretMetadata[] }>('/v1/secrets')).items;
  }

  async deleteSecret(scope: string, name: string): Promise<void> {
    await this.request('DELETE', `/v1/secrets/${encodeURIComponent(scope)}/${encodeURIComponent(name)}`);
  }

  /** Gateway only: register, report activity, fetch the route table. */
  async syncGateway(req: GatewaySyncRequest): Promise<RouteTable> {
    return (await this.request<RouteTable>('POST', '/v1/gateway/sync', { body: req })).body;
  }

  /** Gateway only: start or resume a box for a connecting user. */
  async wakeBox(boxId: string, subject: string): Promise<Box> {
    return (await this.request<Box>('POST', `/v1/gateway/boxes/${encodeURIComponent(boxId)}/wake`, { body: { subject } })).body;
  }

  /** Gateway only: redeem a browser sign-in link (once) for the session token of its cookie. */
  async redeemSignIn(token: string): Promise<BrowserSession> {
    return (await this.request<BrowserSession>('POST', '/v1/gateway/sign-ins', { body: { token } })).body;
  }

  // ---- audit log ----

  /** Entries of your organization's audit log: oldest first, or newest first with `order: 'desc'`. */
  async listAudit(q: AuditListQuery = {}): Promise<AuditEntry[]> {
    return (await this.get<{ items: AuditEntry[] }>(`/v1/audit${auditQueryString(q)}`)).items;
  }

  /** The export: every matching entry as one JSON line (the server's bytes), oldest first. */
  async *exportAudit(q: Omit<AuditListQuery, 'order'> = {}, signal?: AbortSignal): AsyncGenerator<string> {
    const { res } = await this.request('GET', `/v1/audit${auditQueryString({ ...q, format: 'jsonl' })}`, { stream: true, signal, headers: { accept: 'application/x-ndjson' } });
    const decoder = new TextDecoder();
    let buf = '';
    for await (const chunk of res.body as unknown as AsyncIterable<Uint8Array>) {
      buf += decoder.decode(chunk, { stream: true });
      let nl: number;
      while ((nl = buf.indexOf('\n')) >= 0) {
        const line = buf.slice(0, nl);
        buf = buf.slice(nl + 1);
        if (line !== '') yield line;
      }
    }
    buf += decoder.decode();
    if (buf !== '') yield buf;
  }

  /** Checks the organization's hash chain on the server. */
  verifyAudit(): Promise<AuditVerification> {
    return this.get<AuditVerification>('/v1/audit/verify');
  }

  // ---- identity and tenancy ----

  getMe(): Promise<Me> {
    return this.get<Me>('/v1/users/me');
  }

  async listTokens(): Promise<Token[]> {
    return (await this.get<{ items: Token[] }>('/v1/tokens')).items;
  }

  async createToken(req: { name: string; ttlSeconds?: number; scopes?: Array<'read' | 'write'>; org?: string }): Promise<CreatedToken> {
    return (await this.request<CreatedToken>('POST', '/v1/tokens', { body: req })).body;
  }

  async revokeToken(id: string): Promise<void> {
    await this.request('DELETE', `/v1/tokens/${encodeURIComponent(id)}`);
  }

  async listOrgs(): Promise<Array<{ name: string; role: OrgRole; createdAt: string; trusted: boolean }>> {
    return (await this.get<{ items: Array<{ name: string; role: OrgRole; createdAt: string; trusted: boolean }> }>('/v1/orgs')).items;
  }

  async createOrg(name: string): Promise<{ name: string; role: OrgRole; createdAt: string; trusted: boolean }> {
    return (await this.request<{ name: string; role: OrgRole; createdAt: string; trusted: boolean }>('POST', '/v1/orgs', { body: { name } })).body;
  }

  /** Operators: whether the organization's code may share the node's kernel (sandbox runtime). */
  async setOrgTrust(name: string, trusted: boolean): Promise<{ name: string; trusted: boolean }> {
    return (await this.request<{ name: string; trusted: boolean }>('PUT', `/v1/orgs/${encodeURIComponent(name)}/trust`, { body: { trusted } })).body;
  }

  async listInvitations(): Promise<Invitation[]> {
    return (await this.get<{ items: Invitation[] }>('/v1/org/invitations')).items;
  }

  async createInvitation(role: OrgRole, ttlSeconds?: number): Promise<CreatedInvitation> {
    return (await this.request<CreatedInvitation>('POST', '/v1/org/invitations', { body: { role, ...(ttlSeconds ? { ttlSeconds } : {}) } })).body;
  }

  async revokeInvitation(id: string): Promise<void> {
    await this.request('DELETE', `/v1/org/invitations/${encodeURIComponent(id)}`);
  }

  async acceptInvitation(token: string): Promise<{ org: string; role: OrgRole }> {
    return (await this.request<{ org: string; role: OrgRole }>('POST', '/v1/invitations/accept', { body: { token } })).body;
  }

  async listMembers(): Promise<Member[]> {
    return (await this.get<{ items: Member[] }>('/v1/org/members')).items;
  }

  async setMember(user: string, role: OrgRole): Promise<void> {
    await this.request('PUT', `/v1/org/members/${encodeURIComponent(user)}`, { body: { role } });
  }

  async removeMember(user: string): Promise<void> {
    await this.request('DELETE', `/v1/org/members/${encodeURIComponent(user)}`);
  }

  async createServiceAccount(name: string, role: OrgRole, ttlSeconds?: number): Promise<CreatedToken> {
    return (await this.request<CreatedToken>('POST', '/v1/org/service-accounts', { body: { name, role, ...(ttlSeconds ? { ttlSeconds } : {}) } })).body;
  }

  async listTeams(): Promise<Team[]> {
    return (await this.get<{ items: Team[] }>('/v1/teams')).items;
  }

  async createTeam(name: string): Promise<void> {
    await this.request('POST', '/v1/teams', { body: { name } });
  }

  async deleteTeam(name: string): Promise<void> {
    await this.request('DELETE', `/v1/teams/${encodeURIComponent(name)}`);
  }

  async setTeamMember(team: string, user: string, role: 'admin' | 'member'): Promise<void> {
    await this.request('PUT', `/v1/teams/${encodeURIComponent(team)}/members/${encodeURIComponent(user)}`, { body: { role } });
  }

  async removeTeamMember(team: string, user: string): Promise<void> {
    await this.request('DELETE', `/v1/teams/${encodeURIComponent(team)}/members/${encodeURIComponent(user)}`);
  }

  private ownerQuery(owner?: string): string {
    return owner ? `?owner=${encodeURIComponent(owner)}` : '';
  }

  async listBoxShares(name: string, owner?: string): Promise<BoxShare[]> {
    return (await this.get<{ items: BoxShare[] }>(`/v1/boxes/${encodeURIComponent(name)}/shares${this.ownerQuery(owner)}`)).items;
  }

  async setBoxShare(name: string, team: string, access: 'connect' | 'manage', owner?: string): Promise<BoxShare> {
    return (await this.request<BoxShare>('PUT', `/v1/boxes/${encodeURIComponent(name)}/shares/${encodeURIComponent(team)}${this.ownerQuery(owner)}`, { body: { access } })).body;
  }

  async removeBoxShare(name: string, team: string, owner?: string): Promise<void> {
    await this.request('DELETE', `/v1/boxes/${encodeURIComponent(name)}/shares/${encodeURIComponent(team)}${this.ownerQuery(owner)}`);
  }

  /** Quotas that apply to you, or (operators) every quota of the organization named `org`. */
  async listQuotas(org?: string): Promise<Quota[]> {
    return (await this.get<{ items: Quota[] }>(`/v1/quotas${orgQuery(org)}`)).items;
  }

  /** Sets a quota in your organization, or (operators) in the organization named `org`. */
  async setQuota(scope: string, limits: QuotaLimits, org?: string): Promise<Quota> {
    return (await this.request<Quota>('PUT', `/v1/quotas/${encodeURIComponent(scope)}${orgQuery(org)}`, { body: limits })).body;
  }

  async deleteQuota(scope: string, org?: string): Promise<void> {
    await this.request('DELETE', `/v1/quotas/${encodeURIComponent(scope)}${orgQuery(org)}`);
  }
}

/** Filters of the audit log (`since` is RFC 3339). */
export interface AuditListQuery {
  since?: string;
  actor?: string;
  limit?: number;
  afterSeq?: number;
  order?: 'asc' | 'desc';
}

/** Methods that mean the same when sent twice (RFC 9110 §9.2.2). */
const IDEMPOTENT = new Set(['GET', 'HEAD', 'PUT', 'DELETE', 'OPTIONS']);
/** How undici reports a connection that the server had closed. */
const RETRYABLE_SOCKET_ERRORS = new Set(['UND_ERR_SOCKET', 'ECONNRESET', 'EPIPE']);

const orgQuery = (org: string | undefined) => (org === undefined ? '' : `?org=${encodeURIComponent(org)}`);

function auditQueryString(q: AuditListQuery & { format?: 'jsonl' }): string {
  const p = new URLSearchParams();
  for (const [k, v] of Object.entries(q)) if (v !== undefined) p.set(k, String(v));
  const s = p.toString();
  return s ? `?${s}` : '';

}
