/**
 * The route table: every HTTP route of the server with its schemas. The server registers its
 * handlers from this table, the OpenAPI document is generated from it, and the SDK's types come from
 * the same schemas, so the three cannot drift apart.
 */
import { z } from 'zod';
import type { OrgPermission } from '@devyard/core/rbac-policy';
import { NameSchema } from './common-schemas.js';
import { decimalInteger, IdParamSchema, inlineText } from './input-schemas.js';
import {
  BoxEventListSchema,
  BoxListSchema,
  ListBoxesQuerySchema,
  BoxSchema,
  CreateBoxRequestSchema,
  ExecSessionRequestSchema,
  ForkBoxRequestSchema,
  ForkBoxResponseSchema,
  MoveBoxRequestSchema,
  ExecSessionSchema,
} from './box-schemas.js';
import { CreateTemplateRequestSchema, PrebuildListSchema, TemplateListSchema, TemplateSchema } from './template-schemas.js';
import {
  DesiredSetSchema,
  HeartbeatRequestSchema,
  NodeListSchema,
  NodeSchema,
  RegisterNodeRequestSchema,
  RegisterNodeResponseSchema,
  StatusReportRequestSchema,
} from './node-schemas.js';
import {
  AccessTokenSchema,
  AddSshKeyRequestSchema,
  SshKeyChallengeSchema,
  BoxConnectionSchema,
  BoxPortListSchema,
  BoxPortSchema,
  CreateAccessTokenRequestSchema,
  PortParamSchema,
  SetBoxPortRequestSchema,
  SshKeyListSchema,
  SshKeySchema,
} from './access-schemas.js';
import {
  BoxShareListSchema,
  BoxShareSchema,
  CreateServiceAccountRequestSchema,
  CreateTeamRequestSchema,
  CreateTokenRequestSchema,
  CreateOrgRequestSchema,
  OrgTrustSchema,
  SetOrgTrustRequestSchema,
  AcceptInvitationRequestSchema,
  AcceptedInvitationSchema,
  CreateInvitationRequestSchema,
  CreatedInvitationSchema,
  InvitationListSchema,
  OrgListSchema,
  OrgSchema,
  CreatedTokenSchema,
  MeSchema,
  MemberListSchema,
  QuotaLimitsSchema,
  QuotaListSchema,
  QuotaScopeParamSchema,
  QuotaSchema,
  SetBoxShareRequestSchema,
  SetMemberRequestSchema,
  SetTeamMemberRequestSchema,
  TeamListSchema,
  TokenListSchema,
} from './tenancy-schemas.js';
import { BrowserSessionSchema, GatewaySyncRequestSchema, RedeemSignInRequestSchema, RouteTableSchema, WakeBoxRequestSchema } from './gateway-schemas.js';
import { AuditListSchema, AuditQuerySchema, AuditVerificationSchema } from './audit-schemas.js';
import { OidcCallbackQuerySchema, OidcLoginQuerySchema, OidcLoginTokenSchema, OidcRedeemRequestSchema } from './oidc-schemas.js';
import { PutSecretRequestSchema, SecretListSchema, SecretMetadataSchema, SecretParamsSchema } from './secret-schemas.js';

export interface RouteDef {
  operationId: string;
  method: 'GET' | 'POST' | 'DELETE' | 'PUT' | 'PATCH';
  /** OpenAPI-style path with `{param}` placeholders. */
  path: string;
  summary: string;
  tag: string;
  /** Who may call it: anyone, a user token, a node agent token or a gateway token. */
  auth: 'none' | 'user' | 'node' | 'gateway';
  /** Organization permission a user needs (core rbac-policy); resource rules come on top. */
  permission?: OrgPermission;
  params?: z.ZodObject;
  query?: z.ZodObject;
  body?: z.ZodType;
  /** Request headers the route honours (documented in OpenAPI). */
  headers?: Array<{ name: string; description: string }>;
  status: number;
  response?: z.ZodType;
  /** Whether `?watch=1` turns the response into a Server-Sent Events stream. */
  sse?: boolean;
  /** Whether a browser (Accept: text/html) gets an error as an HTML page rather than problem+json. */
  htmlErrors?: boolean;
}

const boxName = z.object({ name: NameSchema });
const orgName = z.object({ name: NameSchema });
const anyName = z.object({ name: inlineText(63) });
const nodeId = z.object({ id: IdParamSchema });
const boxId = z.object({ id: IdParamSchema });
const boxPort = z.object({ name: NameSchema, port: PortParamSchema });
const keyId = z.object({ id: IdParamSchema });
const userParam = z.object({ user: NameSchema });
const teamParam = z.object({ team: NameSchema });
const teamUser = z.object({ team: NameSchema, user: NameSchema });
const boxTeam = z.object({ name: NameSchema, team: NameSchema });
const quotaScope = z.object({ scope: QuotaScopeParamSchema });
const quotaOrgQuery = z.object({ org: NameSchema.optional().meta({ description: "operators: another organization's quotas" }) });
const watchQuery = z.object({ watch: z.enum(['0', '1', 'true', 'false']).optional().meta({ description: '1: stream changes as Server-Sent Events' }) });
const ifMatch = { name: 'If-Match', description: 'ETag of the box; the update is refused with 412 if the box changed since' };

const ownerQuery = z.object({ owner: NameSchema.optional().meta({ description: "another user's box (shared with you, or you administer the organization)" }) });

const verb = (v: 'start' | 'stop' | 'pause' | 'resume', summary: string): RouteDef => ({
  operationId: `${v}Box`,
  method: 'POST',
  path: `/v1/boxes/{name}/${v}`,
  summary,
  tag: 'boxes',
  auth: 'user',
  permission: 'org:use',
  params: boxName,
  query: ownerQuery,
  headers: [ifMatch],
  status: 202,
  response: BoxSchema,
});

export const ROUTES = [
  { operationId: 'healthz', method: 'GET', path: '/healthz', summary: 'Liveness and store health', tag: 'system', auth: 'none', status: 200, response: z.object({ status: z.literal('ok') }) },
  { operationId: 'openapi', method: 'GET', path: '/v1/openapi.json', summary: 'This OpenAPI document', tag: 'system', auth: 'none', status: 200 },
  // ---- OIDC sign-in: browser redirects, not JSON calls (docs/identity.md) ----
  { operationId: 'oidcLogin', method: 'GET', path: '/v1/auth/oidc/login', summary: 'Browser redirect: start signing in at the OpenID provider (302 to it); ?cli= names the loopback URL of a waiting `devyard login`, with ?cli_challenge= (its PKCE S256 challenge)', tag: 'identity', auth: 'none', query: OidcLoginQuerySchema, status: 302, htmlErrors: true },
  { operationId: 'oidcCallback', method: 'GET', path: '/v1/auth/oidc/callback', summary: "Browser redirect: the provider's answer; 302 to the CLI's loopback URL with a one-time code, or a page showing the login token once; 400 for unknown, expired or replayed sign-ins", tag: 'identity', auth: 'none', query: OidcCallbackQuerySchema, status: 302, htmlErrors: true },
  { operationId: 'redeemOidcLogin', method: 'POST', path: '/v1/auth/oidc/token', summary: "The CLI redeems the one-time code of its sign-in with its PKCE verifier: the login token (once; the code lives 2 minutes)", tag: 'identity', auth: 'none', body: OidcRedeemRequestSchema, status: 200, response: OidcLoginTokenSchema },
  {
    operationId: 'createBox',
    method: 'POST',
    path: '/v1/boxes',
    summary: 'Create a box (asynchronous: returns at once, the box then converges to running)',
    tag: 'boxes',
    auth: 'user', permission: 'org:use',
    body: CreateBoxRequestSchema,
    headers: [{ name: 'Idempotency-Key', description: 'same key and body return the same box; the same key with another body is a 409' }],
    status: 202,
    response: BoxSchema,
  },
  { operationId: 'listBoxes', method: 'GET', path: '/v1/boxes', summary: 'List boxes a page at a time (oldest first), or watch them with ?watch=1 (SSE)', tag: 'boxes', auth: 'user', permission: 'org:read', query: ListBoxesQuerySchema, status: 200, response: BoxListSchema, sse: true },
  { operationId: 'getBox', method: 'GET', path: '/v1/boxes/{name}', summary: 'Get a box (with its ETag)', tag: 'boxes', auth: 'user', permission: 'org:read', params: boxName, query: ownerQuery, status: 200, response: BoxSchema },
  verb('start', 'Start a stopped box (cold boot)'),
  verb('stop', 'Stop a box: end all processes, release CPU and memory, keep the disk'),
  verb('pause', 'Pause a running box: freeze its processes in place'),
  verb('resume', 'Resume a paused box'),
  {
    operationId: 'forkBox',
    method: 'POST',
    path: '/v1/boxes/{name}/fork',
    summary: 'Fork a running or paused microvm box: clones of its RAM and disk, on its node, as new boxes of yours (all or none)',
    tag: 'boxes',
    auth: 'user', permission: 'org:use',
    params: boxName,
    query: ownerQuery,
    body: ForkBoxRequestSchema,
    status: 201,
    response: ForkBoxResponseSchema,
  },
  {
    operationId: 'moveBox',
    method: 'POST',
    path: '/v1/boxes/{name}/move',
    summary: 'Move a paused microvm box to another node (asynchronous): the new node fetches its RAM snapshot and disks from the old one; it stays paused',
    tag: 'boxes',
    auth: 'user', permission: 'org:use',
    params: boxName,
    query: ownerQuery,
    body: MoveBoxRequestSchema,
    status: 202,
    response: BoxSchema,
  },
  { operationId: 'deleteBox', method: 'DELETE', path: '/v1/boxes/{name}', summary: 'Delete a box and everything of it on its node', tag: 'boxes', auth: 'user', permission: 'org:use', params: boxName, query: ownerQuery, headers: [ifMatch], status: 202, response: BoxSchema },
  {
    operationId: 'listBoxEvents',
    method: 'GET',
    path: '/v1/boxes/{name}/events',
    summary: "A box's event timeline (?watch=1 streams new events)",
    tag: 'boxes',
    auth: 'user', permission: 'org:read',
    params: boxName,
    query: watchQuery.extend(ownerQuery.shape),
    status: 200,
    response: BoxEventListSchema,
    sse: true,
  },
  { operationId: 'createExecSession', method: 'POST', path: '/v1/boxes/{name}/exec-sessions', summary: 'Authorize a command session in a running box', tag: 'boxes', auth: 'user', permission: 'org:use', params: boxName, query: ownerQuery, body: ExecSessionRequestSchema, status: 201, response: ExecSessionSchema },
  { operationId: 'getBoxConnection', method: 'GET', path: '/v1/boxes/{name}/connection', summary: "How to reach a box over SSH: its host key, alias and a gateway", tag: 'access', auth: 'user', permission: 'org:use', params: boxName, query: ownerQuery, status: 200, response: BoxConnectionSchema },
  { operationId: 'listBoxPorts', method: 'GET', path: '/v1/boxes/{name}/ports', summary: "The box's ports with a non-default visibility, and their preview URLs", tag: 'access', auth: 'user', permission: 'org:read', params: boxName, query: ownerQuery, status: 200, response: BoxPortListSchema },
  { operationId: 'setBoxPort', method: 'PUT', path: '/v1/boxes/{name}/ports/{port}', summary: "Set who may open a port's preview: private (default) or org", tag: 'access', auth: 'user', permission: 'org:use', params: boxPort, query: ownerQuery, body: SetBoxPortRequestSchema, status: 200, response: BoxPortSchema },
  { operationId: 'resetBoxPort', method: 'DELETE', path: '/v1/boxes/{name}/ports/{port}', summary: 'Make a port private again', tag: 'access', auth: 'user', permission: 'org:use', params: boxPort, query: ownerQuery, status: 204 },
  { operationId: 'listSshKeys', method: 'GET', path: '/v1/users/me/keys', summary: 'Your registered SSH public keys', tag: 'access', auth: 'user', permission: 'org:read', status: 200, response: SshKeyListSchema },
  { operationId: 'createSshKeyChallenge', method: 'POST', path: '/v1/users/me/keys/challenge', summary: 'A challenge to sign with an SSH key you are about to register (proof that you hold it)', tag: 'access', auth: 'user', permission: 'org:use', status: 201, response: SshKeyChallengeSchema },
  { operationId: 'addSshKey', method: 'POST', path: '/v1/users/me/keys', summary: 'Register an SSH public key for the gateway, with a signature of a fresh challenge made with it', tag: 'access', auth: 'user', permission: 'org:use', body: AddSshKeyRequestSchema, status: 201, response: SshKeySchema },
  { operationId: 'removeSshKey', method: 'DELETE', path: '/v1/users/me/keys/{id}', summary: 'Remove one of your SSH keys (by id or fingerprint)', tag: 'access', auth: 'user', permission: 'org:use', params: keyId, status: 204 },
  { operationId: 'createAccessToken', method: 'POST', path: '/v1/access-tokens', summary: 'A short-lived signed token for a gateway (browser terminal, previews, `devyard ssh`)', tag: 'access', auth: 'user', permission: 'org:use', body: CreateAccessTokenRequestSchema, status: 201, response: AccessTokenSchema },
  { operationId: 'syncGateway', method: 'POST', path: '/v1/gateway/sync', summary: 'Gateway: register, report session activity and fetch the route table', tag: 'gateway', auth: 'gateway', body: GatewaySyncRequestSchema, status: 200, response: RouteTableSchema },
  { operationId: 'wakeBox', method: 'POST', path: '/v1/gateway/boxes/{id}/wake', summary: 'Gateway: start or resume a box for a user who connects to it', tag: 'gateway', auth: 'gateway', params: boxId, body: WakeBoxRequestSchema, status: 202, response: BoxSchema },
  { operationId: 'redeemSignIn', method: 'POST', path: '/v1/gateway/sign-ins', summary: 'Gateway: redeem a browser sign-in link (once: a second redemption, through any gateway, is refused) for a browser session token of the same scope', tag: 'gateway', auth: 'gateway', body: RedeemSignInRequestSchema, status: 200, response: BrowserSessionSchema },
  { operationId: 'getMe', method: 'GET', path: '/v1/users/me', summary: 'Who you are: user, organization, role, teams, this token', tag: 'tenancy', auth: 'user', permission: 'org:read', status: 200, response: MeSchema },
  { operationId: 'listTokens', method: 'GET', path: '/v1/tokens', summary: 'Your API tokens (never their secrets)', tag: 'tenancy', auth: 'user', permission: 'org:read', status: 200, response: TokenListSchema },
  { operationId: 'createToken', method: 'POST', path: '/v1/tokens', summary: 'A personal API token, shown once (stored hashed), with expiry and scopes', tag: 'tenancy', auth: 'user', permission: 'org:read', body: CreateTokenRequestSchema, status: 201, response: CreatedTokenSchema },
  { operationId: 'revokeToken', method: 'DELETE', path: '/v1/tokens/{id}', summary: "Revoke one of your tokens (admins: a service account's)", tag: 'tenancy', auth: 'user', permission: 'org:read', params: keyId, status: 204 },
  { operationId: 'listOrgs', method: 'GET', path: '/v1/orgs', summary: 'Organizations you belong to, with your role', tag: 'tenancy', auth: 'user', permission: 'org:read', status: 200, response: OrgListSchema },
  { operationId: 'createOrg', method: 'POST', path: '/v1/orgs', summary: "Create an organization (operators, unless the server lets anyone); you become its owner, it gets the installation's default quota (then `POST /v1/tokens` with `org` to act in it)", tag: 'tenancy', auth: 'user', permission: 'org:read', body: CreateOrgRequestSchema, status: 201, response: OrgSchema },
  { operationId: 'setOrgTrust', method: 'PUT', path: '/v1/orgs/{name}/trust', summary: "Operators: trust an organization's code to share the node's kernel (its boxes may use the sandbox runtime), or take it back; untrusted organizations' boxes run in microVMs", tag: 'tenancy', auth: 'user', permission: 'org:admin', params: orgName, body: SetOrgTrustRequestSchema, status: 200, response: OrgTrustSchema },
  { operationId: 'listMembers', method: 'GET', path: '/v1/org/members', summary: 'Members of your organization and their roles', tag: 'tenancy', auth: 'user', permission: 'org:read', status: 200, response: MemberListSchema },
  { operationId: 'setMember', method: 'PUT', path: '/v1/org/members/{user}', summary: "Change a member's role (admins; only owners grant or take owner)", tag: 'tenancy', auth: 'user', permission: 'org:admin', params: userParam, body: SetMemberRequestSchema, status: 204 },
  { operationId: 'removeMember', method: 'DELETE', path: '/v1/org/members/{user}', summary: 'Remove a member (the last owner stays)', tag: 'tenancy', auth: 'user', permission: 'org:admin', params: userParam, status: 204 },
  { operationId: 'listInvitations', method: 'GET', path: '/v1/org/invitations', summary: 'Invitations to your organization (admins)', tag: 'tenancy', auth: 'user', permission: 'org:admin', status: 200, response: InvitationListSchema },
  { operationId: 'createInvitation', method: 'POST', path: '/v1/org/invitations', summary: 'Invite someone with a role you may grant: a single-use token, shown once', tag: 'tenancy', auth: 'user', permission: 'org:admin', body: CreateInvitationRequestSchema, status: 201, response: CreatedInvitationSchema },
  { operationId: 'revokeInvitation', method: 'DELETE', path: '/v1/org/invitations/{id}', summary: 'Revoke an open invitation', tag: 'tenancy', auth: 'user', permission: 'org:admin', params: keyId, status: 204 },
  { operationId: 'acceptInvitation', method: 'POST', path: '/v1/invitations/accept', summary: "Join an invitation's organization (then `POST /v1/tokens` with `org` to act in it)", tag: 'tenancy', auth: 'user', permission: 'org:read', body: AcceptInvitationRequestSchema, status: 200, response: AcceptedInvitationSchema },
  { operationId: 'createServiceAccount', method: 'POST', path: '/v1/org/service-accounts', summary: 'A service account with a role and its first token (shown once)', tag: 'tenancy', auth: 'user', permission: 'org:admin', body: CreateServiceAccountRequestSchema, status: 201, response: CreatedTokenSchema },
  { operationId: 'listTeams', method: 'GET', path: '/v1/teams', summary: 'Teams of your organization with their members', tag: 'tenancy', auth: 'user', permission: 'org:read', status: 200, response: TeamListSchema },
  { operationId: 'createTeam', method: 'POST', path: '/v1/teams', summary: 'Create a team (admins)', tag: 'tenancy', auth: 'user', permission: 'org:admin', body: CreateTeamRequestSchema, status: 201 },
  { operationId: 'deleteTeam', method: 'DELETE', path: '/v1/teams/{team}', summary: 'Delete a team and its box shares (admins)', tag: 'tenancy', auth: 'user', permission: 'org:admin', params: teamParam, status: 204 },
  { operationId: 'setTeamMember', method: 'PUT', path: '/v1/teams/{team}/members/{user}', summary: 'Add a member to a team or change their team role (org admins; team admins for members)', tag: 'tenancy', auth: 'user', permission: 'org:read', params: teamUser, body: SetTeamMemberRequestSchema, status: 204 },
  { operationId: 'removeTeamMember', method: 'DELETE', path: '/v1/teams/{team}/members/{user}', summary: 'Remove a member from a team', tag: 'tenancy', auth: 'user', permission: 'org:read', params: teamUser, status: 204 },
  { operationId: 'listBoxShares', method: 'GET', path: '/v1/boxes/{name}/shares', summary: 'Teams a box is shared with', tag: 'tenancy', auth: 'user', permission: 'org:read', params: boxName, query: ownerQuery, status: 200, response: BoxShareListSchema },
  { operationId: 'setBoxShare', method: 'PUT', path: '/v1/boxes/{name}/shares/{team}', summary: 'Share a box with a team: connect, or manage', tag: 'tenancy', auth: 'user', permission: 'org:use', params: boxTeam, query: ownerQuery, body: SetBoxShareRequestSchema, status: 200, response: BoxShareSchema },
  { operationId: 'removeBoxShare', method: 'DELETE', path: '/v1/boxes/{name}/shares/{team}', summary: 'Stop sharing a box with a team', tag: 'tenancy', auth: 'user', permission: 'org:use', params: boxTeam, query: ownerQuery, status: 204 },
  { operationId: 'listQuotas', method: 'GET', path: '/v1/quotas', summary: 'Quotas that apply to you (organization, your teams, you) with current use; operators: every quota of ?org=', tag: 'tenancy', auth: 'user', permission: 'org:read', query: quotaOrgQuery, status: 200, response: QuotaListSchema },
  { operationId: 'setQuota', method: 'PUT', path: '/v1/quotas/{scope}', summary: "Set a team's or user's quota (admins), or an organization's own quota (operators; ?org= for another organization)", tag: 'tenancy', auth: 'user', permission: 'org:admin', params: quotaScope, query: quotaOrgQuery, body: QuotaLimitsSchema, status: 200, response: QuotaSchema },
  { operationId: 'deleteQuota', method: 'DELETE', path: '/v1/quotas/{scope}', summary: 'Remove a quota (no limit): team and user quotas by admins, organization quotas by operators', tag: 'tenancy', auth: 'user', permission: 'org:admin', params: quotaScope, query: quotaOrgQuery, status: 204 },
  { operationId: 'watchEvents', method: 'GET', path: '/v1/events', summary: 'Server-Sent Events of every box event the caller may see', tag: 'boxes', auth: 'user', permission: 'org:read', status: 200, sse: true },
  { operationId: 'createTemplate', method: 'POST', path: '/v1/templates', summary: 'Publish a new immutable template version', tag: 'templates', auth: 'user', permission: 'template:write', body: CreateTemplateRequestSchema, status: 201, response: TemplateSchema },
  { operationId: 'listTemplates', method: 'GET', path: '/v1/templates', summary: 'Latest version of every template', tag: 'templates', auth: 'user', permission: 'org:read', status: 200, response: TemplateListSchema },
  {
    operationId: 'getTemplate',
    method: 'GET',
    path: '/v1/templates/{name}',
    summary: 'A template (latest version, or ?version=N)',
    tag: 'templates',
    auth: 'user', permission: 'org:read',
    params: anyName,
    query: z.object({ version: decimalInteger(1, Number.MAX_SAFE_INTEGER).optional() }),
    status: 200,
    response: TemplateSchema,
  },
  { operationId: 'listTemplateVersions', method: 'GET', path: '/v1/templates/{name}/versions', summary: 'Every version of a template', tag: 'templates', auth: 'user', permission: 'org:read', params: anyName, status: 200, response: TemplateListSchema },
  { operationId: 'listTemplatePrebuilds', method: 'GET', path: '/v1/templates/{name}/prebuilds', summary: "A template's prebuilds on every node, newest first, with their log tails", tag: 'templates', auth: 'user', permission: 'org:read', params: anyName, status: 200, response: PrebuildListSchema },
  {
    operationId: 'putSecret',
    method: 'PUT',
    path: '/v1/secrets/{scope}/{name}',
    summary: 'Set a secret (201 when created, 200 when its value changed); the value is write-only, the answer is metadata',
    tag: 'secrets',
    auth: 'user', permission: 'org:use',
    params: SecretParamsSchema,
    body: PutSecretRequestSchema,
    status: 200,
    response: SecretMetadataSchema,
  },
  { operationId: 'listSecrets', method: 'GET', path: '/v1/secrets', summary: 'Metadata of the secrets you may see (never values)', tag: 'secrets', auth: 'user', permission: 'org:read', status: 200, response: SecretListSchema },
  { operationId: 'deleteSecret', method: 'DELETE', path: '/v1/secrets/{scope}/{name}', summary: 'Delete a secret; running boxes lose it', tag: 'secrets', auth: 'user', permission: 'org:use', params: SecretParamsSchema, status: 204 },
  { operationId: 'listNodes', method: 'GET', path: '/v1/nodes', summary: 'Nodes with capacity and allocation', tag: 'nodes', auth: 'user', permission: 'node:read', status: 200, response: NodeListSchema },
  { operationId: 'cordonNode', method: 'POST', path: '/v1/nodes/{name}/cordon', summary: 'Stop placing new boxes on a node', tag: 'nodes', auth: 'user', permission: 'node:write', params: anyName, status: 200, response: NodeSchema },
  { operationId: 'uncordonNode', method: 'POST', path: '/v1/nodes/{name}/uncordon', summary: 'Allow placing boxes on a node again', tag: 'nodes', auth: 'user', permission: 'node:write', params: anyName, status: 200, response: NodeSchema },
  { operationId: 'registerNode', method: 'POST', path: '/v1/agent/nodes', summary: 'Agent: register (or re-register) this node', tag: 'agent', auth: 'node', body: RegisterNodeRequestSchema, status: 200, response: RegisterNodeResponseSchema },
  { operationId: 'heartbeatNode', method: 'POST', path: '/v1/agent/nodes/{id}/heartbeat', summary: "Agent: renew the node's lease", tag: 'agent', auth: 'node', params: nodeId, body: HeartbeatRequestSchema, status: 200, response: z.object({ leaseExpiresAt: z.string() }) },
  { operationId: 'getDesiredSet', method: 'GET', path: '/v1/agent/nodes/{id}/desired', summary: 'Agent: the boxes this node must run (?watch=1 streams every change)', tag: 'agent', auth: 'node', params: nodeId, query: watchQuery, status: 200, response: DesiredSetSchema, sse: true },
  { operationId: 'reportStatus', method: 'POST', path: '/v1/agent/nodes/{id}/status', summary: 'Agent: report observed box phases', tag: 'agent', auth: 'node', params: nodeId, body: StatusReportRequestSchema, status: 204 },
  // ---- audit log: read-only; no route changes or deletes entries ----
  {
    operationId: 'listAudit',
    method: 'GET',
    path: '/v1/audit',
    summary: "The organization's audit log, oldest first (?order=desc: newest first); ?format=jsonl exports it as JSON Lines (application/x-ndjson)",
    tag: 'audit',
    auth: 'user', permission: 'audit:read',
    query: AuditQuerySchema,
    status: 200,
    response: AuditListSchema,
  },
  { operationId: 'verifyAudit', method: 'GET', path: '/v1/audit/verify', summary: "Check the organization's audit hash chain: names the first edited or deleted entry", tag: 'audit', auth: 'user', permission: 'audit:read', status: 200, response: AuditVerificationSchema },
  // ---- end audit log ----
] as const satisfies readonly RouteDef[];

export type OperationId = (typeof ROUTES)[number]['operationId'];

export function routeById(id: OperationId): RouteDef {
  const r = ROUTES.find((x) => x.operationId === id);
  if (!r) throw new Error(`unknown route ${id}`);
  return r;
}
