/**
 * The authorization matrix: every route of the route table, called as every role (organization
 * owner, admin, template admin, auditor, member, a stranger who owns another organization, and an
 * anonymous caller), against a real server and SQLite store, with the outcome written down here by
 * hand — not derived from the policy under test. A route with no row fails the test (like Coder's
 * dbauthz accounting test), so a new route cannot ship without its authorization decided.
 *
 * Outcomes: 'ok' = authorization passed (any status but 401/403/404: a 409 for a box in the wrong
 * phase still means the caller was allowed to ask), 403 = visible but not allowed, 404 = not visible.
 */
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ROUTES, type RouteDef } from '@devyard/api/routes';
import { DevyardClient } from '@devyard/sdk/devyard-client';
import { startControlPlane, type ControlPlane } from '@devyard/server/control-plane';
import { newSshKeyPair } from '@devyard/server/services/ssh-key-pairs';
import { addKeyPair, proofForPair } from './ssh-key-proof-fixture.js';
import { ApiError } from '@devyard/sdk/api-error';

const PERSONAS = ['owner', 'admin', 'template-admin', 'auditor', 'member', 'stranger'] as const;
type Persona = (typeof PERSONAS)[number];
type Outcome = 'ok' | 403 | 404;
type Row = Record<Persona, Outcome>;

/** owner, admin, template-admin, auditor, member, stranger */
const E = (...o: Outcome[]): Row => Object.fromEntries(PERSONAS.map((p, i) => [p, o[i]!])) as Row;
const ALL = E('ok', 'ok', 'ok', 'ok', 'ok', 'ok');
const BOX_READ = E('ok', 'ok', 404, 'ok', 'ok', 404);
const BOX_USE = E('ok', 'ok', 404, 403, 'ok', 404);
const ORG_USE = E('ok', 'ok', 'ok', 403, 'ok', 'ok');
const ORG_ADMIN_HERE = E('ok', 'ok', 403, 403, 403, 404);
const ORG_ADMIN_OWN = E('ok', 'ok', 403, 403, 403, 'ok');
const OPERATORS = E('ok', 'ok', 403, 403, 403, 403);
const NOT_FOR_USERS = E(403, 403, 403, 403, 403, 403);

let dir: string;
let cp: ControlPlane;
const token: Record<Persona, string> = {} as Record<Persona, string>;
const client = (p: Persona) => new DevyardClient({ url: cp.url, token: token[p] });
let owner: DevyardClient;
let seq = 0;
const uniq = (p: string) => `${p}${++seq}`;

/** A box of the member's, fresh for each call that may change it. */
async function memberBox(): Promise<string> {
  const name = uniq('mbox');
  await client('member').createBox({ name, template: 'tiny', resources: { cpu: '10m', memory: '16MiB' } });
  return name;
}

/**
 * A set-up step that `refused` may not take (it gets 403 and `fallback`); for everyone else its
 * failure fails the test with its reason, instead of showing up later as a wrong row.
 */
async function refusedOnlyTo<T, F>(refused: Persona, p: Persona, step: Promise<T>, fallback: F): Promise<T | F> {
  try {
    return await step;
  } catch (e) {
    if (p === refused && e instanceof ApiError && e.status === 403) return fallback;
    throw e;
  }
}

/** What each route needs to be called: path, body. Box routes address the member's box. */
type Call = { path: string; body?: unknown };
const SETUP: Record<string, (p: Persona) => Promise<Call>> = {
  healthz: async () => ({ path: '/healthz' }),
  oidcLogin: async () => ({ path: '/v1/auth/oidc/login' }),
  oidcCallback: async () => ({ path: '/v1/auth/oidc/callback?code=x&state=y' }),
  redeemOidcLogin: async () => ({ path: '/v1/auth/oidc/token', body: { code: 'x', verifier: 'v'.repeat(43) } }),
  openapi: async () => ({ path: '/v1/openapi.json' }),
  createBox: async () => ({ path: '/v1/boxes', body: { name: uniq('new'), template: 'tiny', resources: { cpu: '10m', memory: '16MiB' } } }),
  listBoxes: async () => ({ path: '/v1/boxes' }),
  getBox: async () => ({ path: `/v1/boxes/${await memberBox()}?owner=member` }),
  startBox: async () => ({ path: `/v1/boxes/${await memberBox()}/start?owner=member` }),
  stopBox: async () => ({ path: `/v1/boxes/${await memberBox()}/stop?owner=member` }),
  pauseBox: async () => ({ path: `/v1/boxes/${await memberBox()}/pause?owner=member` }),
  resumeBox: async () => ({ path: `/v1/boxes/${await memberBox()}/resume?owner=member` }),
  deleteBox: async () => ({ path: `/v1/boxes/${await memberBox()}?owner=member` }),
  // The member's box runs on sandbox: callers allowed to fork it get 409 (not a microvm box), the rest 403/404.
  forkBox: async () => ({ path: `/v1/boxes/${await memberBox()}/fork?owner=member`, body: { name: uniq('fork') } }),
  // Also on sandbox, so not movable: callers allowed to move it get 409, the rest 403/404.
  moveBox: async () => ({ path: `/v1/boxes/${await memberBox()}/move?owner=member`, body: {} }),
  listBoxEvents: async () => ({ path: `/v1/boxes/${await memberBox()}/events?owner=member` }),
  createExecSession: async () => ({ path: `/v1/boxes/${await memberBox()}/exec-sessions?owner=member`, body: {} }),
  getBoxConnection: async () => ({ path: `/v1/boxes/${await memberBox()}/connection?owner=member` }),
  listBoxPorts: async () => ({ path: `/v1/boxes/${await memberBox()}/ports?owner=member` }),
  setBoxPort: async () => ({ path: `/v1/boxes/${await memberBox()}/ports/8080?owner=member`, body: { visibility: 'org' } }),
  resetBoxPort: async () => ({ path: `/v1/boxes/${await memberBox()}/ports/8080?owner=member` }),
  listSshKeys: async () => ({ path: '/v1/users/me/keys' }),
  createSshKeyChallenge: async () => ({ path: '/v1/users/me/keys/challenge' }),
  // A registration with its proof (auditors may not ask for a challenge: theirs is refused first).
  addSshKey: async (p) => {
    const pair = newSshKeyPair();
    const proof = await refusedOnlyTo('auditor', p, proofForPair(client(p), pair), { challenge: 'none', signature: 'none' });
    return { path: '/v1/users/me/keys', body: { publicKey: pair.publicKey, ...proof } };
  },
  removeSshKey: async (p) => {
    // Each persona removes a key of its own (auditors cannot add one: their removal is refused first).
    const key = await refusedOnlyTo('auditor', p, addKeyPair(client(p), newSshKeyPair()), { id: 'key_none' });
    return { path: `/v1/users/me/keys/${key.id}` };
  },
  createAccessToken: async () => ({ path: '/v1/access-tokens', body: {} }),
  syncGateway: async () => ({ path: '/v1/gateway/sync', body: { gatewayId: 'g', endpoint: { url: 'http://x', sshHost: 'x', sshPort: 1, previewDomain: null }, activity: [] } }),
  wakeBox: async () => ({ path: '/v1/gateway/boxes/b_x/wake', body: { subject: 'member' } }),
  redeemSignIn: async () => ({ path: '/v1/gateway/sign-ins', body: { token: 'dya_x.y' } }),
  getMe: async () => ({ path: '/v1/users/me' }),
  listTokens: async () => ({ path: '/v1/tokens' }),
  createToken: async () => ({ path: '/v1/tokens', body: { name: 'matrix' } }),
  revokeToken: async (p) => ({ path: `/v1/tokens/${(await client(p).createToken({ name: 'to-revoke' })).info.id}` }),
  listOrgs: async () => ({ path: '/v1/orgs' }),
  createOrg: async () => ({ path: '/v1/orgs', body: { name: uniq('org') } }),
  setOrgTrust: async () => ({ path: '/v1/orgs/elsewhere/trust', body: { trusted: false } }),
  listMembers: async () => ({ path: '/v1/org/members' }),
  setMember: async () => ({ path: `/v1/org/members/${(await owner.createServiceAccount(uniq('sa'), 'member')).info.user}`, body: { role: 'auditor' } }),
  removeMember: async () => ({ path: `/v1/org/members/${(await owner.createServiceAccount(uniq('sa'), 'member')).info.user}` }),
  listInvitations: async () => ({ path: '/v1/org/invitations' }),
  createInvitation: async () => ({ path: '/v1/org/invitations', body: { role: 'member' } }),
  revokeInvitation: async () => ({ path: `/v1/org/invitations/${(await owner.createInvitation('member')).invitation.id}` }),
  acceptInvitation: async () => ({ path: '/v1/invitations/accept', body: { token: (await owner.createInvitation('member')).token } }),
  createServiceAccount: async () => ({ path: '/v1/org/service-accounts', body: { name: uniq('bot'), role: 'member' } }),
  listTeams: async () => ({ path: '/v1/teams' }),
  createTeam: async () => ({ path: '/v1/teams', body: { name: uniq('team') } }),
  deleteTeam: async () => {
    const t = uniq('team');
    await owner.createTeam(t);
    return { path: `/v1/teams/${t}` };
  },
  setTeamMember: async () => {
    const t = uniq('team');
    await owner.createTeam(t);
    return { path: `/v1/teams/${t}/members/member`, body: { role: 'member' } };
  },
  removeTeamMember: async () => {
    const t = uniq('team');
    await owner.createTeam(t);
    await owner.setTeamMember(t, 'member', 'member');
    return { path: `/v1/teams/${t}/members/member` };
  },
  listBoxShares: async () => ({ path: `/v1/boxes/${await memberBox()}/shares?owner=member` }),
  setBoxShare: async () => {
    const t = uniq('team');
    await owner.createTeam(t);
    return { path: `/v1/boxes/${await memberBox()}/shares/${t}?owner=member`, body: { access: 'connect' } };
  },
  removeBoxShare: async () => {
    const t = uniq('team');
    await owner.createTeam(t);
    const box = await memberBox();
    await owner.setBoxShare(box, t, 'connect', 'member');
    return { path: `/v1/boxes/${box}/shares/${t}?owner=member` };
  },
  listQuotas: async () => ({ path: '/v1/quotas' }),
  setQuota: async () => ({ path: '/v1/quotas/org', body: { boxes: 1000 } }),
  deleteQuota: async () => ({ path: '/v1/quotas/org' }),
  watchEvents: async () => ({ path: '/v1/events' }),
  createTemplate: async () => ({ path: '/v1/templates', body: { name: uniq('tpl'), image: 'tiny' } }),
  listTemplates: async () => ({ path: '/v1/templates' }),
  getTemplate: async () => ({ path: '/v1/templates/tiny' }),
  listTemplateVersions: async () => ({ path: '/v1/templates/tiny/versions' }),
  listTemplatePrebuilds: async () => ({ path: '/v1/templates/tiny/prebuilds' }),
  putSecret: async () => ({ path: `/v1/secrets/user/${uniq('MATRIX_').toUpperCase()}`, body: { value: 'x' } }),
  listSecrets: async () => ({ path: '/v1/secrets' }),
  deleteSecret: async (p) => {
    const name = uniq('DEL_').toUpperCase();
    await refusedOnlyTo('auditor', p, client(p).request('PUT', `/v1/secrets/user/${name}`, { body: { value: 'x' } }), undefined);
    return { path: `/v1/secrets/user/${name}` };
  },
  listNodes: async () => ({ path: '/v1/nodes' }),
  cordonNode: async () => ({ path: '/v1/nodes/matrix-node/cordon' }),
  uncordonNode: async () => ({ path: '/v1/nodes/matrix-node/uncordon' }),
  registerNode: async () => ({ path: '/v1/agent/nodes', body: {} }),
  heartbeatNode: async () => ({ path: '/v1/agent/nodes/n_x/heartbeat', body: {} }),
  getDesiredSet: async () => ({ path: '/v1/agent/nodes/n_x/desired' }),
  reportStatus: async () => ({ path: '/v1/agent/nodes/n_x/status', body: { reports: [] } }),
  listAudit: async () => ({ path: '/v1/audit' }),
  verifyAudit: async () => ({ path: '/v1/audit/verify' }),
};

/** The decision for every route and role, written by hand. */
const EXPECTED: Record<string, Row> = {
  healthz: ALL,
  openapi: ALL,
  // Sign-in needs no token; without a configured provider both answer 404 for everyone alike.
  oidcLogin: E(404, 404, 404, 404, 404, 404),
  oidcCallback: E(404, 404, 404, 404, 404, 404),
  redeemOidcLogin: E(404, 404, 404, 404, 404, 404),
  createBox: ORG_USE,
  listBoxes: ALL,
  getBox: BOX_READ,
  startBox: BOX_USE,
  stopBox: BOX_USE,
  pauseBox: BOX_USE,
  resumeBox: BOX_USE,
  deleteBox: BOX_USE,
  forkBox: BOX_USE,
  moveBox: BOX_USE,
  listBoxEvents: BOX_READ,
  createExecSession: BOX_USE,
  getBoxConnection: BOX_USE,
  listBoxPorts: E('ok', 'ok', 404, 403, 'ok', 404),
  setBoxPort: BOX_USE,
  resetBoxPort: BOX_USE,
  listSshKeys: ALL,
  createSshKeyChallenge: ORG_USE,
  addSshKey: ORG_USE,
  removeSshKey: ORG_USE,
  createAccessToken: ORG_USE,
  syncGateway: NOT_FOR_USERS,
  wakeBox: NOT_FOR_USERS,
  redeemSignIn: NOT_FOR_USERS,
  getMe: ALL,
  listTokens: ALL,
  createToken: ALL,
  revokeToken: ALL,
  listOrgs: ALL,
  // Organizations and their allotments are the operators' (admins of the default organization).
  createOrg: OPERATORS,
  setOrgTrust: OPERATORS,
  listMembers: ALL,
  setMember: ORG_ADMIN_HERE,
  removeMember: ORG_ADMIN_HERE,
  createServiceAccount: ORG_ADMIN_OWN,
  listInvitations: ORG_ADMIN_OWN,
  createInvitation: ORG_ADMIN_OWN,
  revokeInvitation: ORG_ADMIN_HERE,
  // Members of the organization are told they are members already (409); the stranger joins.
  acceptInvitation: ALL,
  listTeams: ALL,
  createTeam: ORG_ADMIN_OWN,
  deleteTeam: ORG_ADMIN_HERE,
  setTeamMember: ORG_ADMIN_HERE,
  removeTeamMember: ORG_ADMIN_HERE,
  listBoxShares: BOX_READ,
  setBoxShare: BOX_USE,
  removeBoxShare: BOX_USE,
  listQuotas: ALL,
  setQuota: OPERATORS,
  deleteQuota: OPERATORS,
  watchEvents: ALL,
  createTemplate: E('ok', 'ok', 'ok', 403, 403, 'ok'),
  listTemplates: ALL,
  getTemplate: ALL,
  listTemplateVersions: ALL,
  listTemplatePrebuilds: ALL,
  putSecret: ORG_USE,
  listSecrets: ALL,
  deleteSecret: ORG_USE,
  listNodes: OPERATORS,
  cordonNode: OPERATORS,
  uncordonNode: OPERATORS,
  registerNode: NOT_FOR_USERS,
  heartbeatNode: NOT_FOR_USERS,
  getDesiredSet: NOT_FOR_USERS,
  reportStatus: NOT_FOR_USERS,
  listAudit: E('ok', 'ok', 403, 'ok', 403, 'ok'),
  verifyAudit: E('ok', 'ok', 403, 'ok', 403, 'ok'),
};

async function call(route: RouteDef, c: Call, bearer: string | null): Promise<number> {
  const ac = new AbortController();
  const res = await fetch(cp.url + c.path, {
    method: route.method,
    headers: { ...(bearer ? { authorization: `Bearer ${bearer}` } : {}), ...(c.body !== undefined ? { 'content-type': 'application/json' } : {}) },
    body: c.body !== undefined ? JSON.stringify(c.body) : undefined,
    signal: ac.signal,
  });
  // Watches stream forever: the status line is the answer.
  ac.abort();
  return res.status;
}

const outcome = (status: number): Outcome | number => (status === 401 || status === 403 || status === 404 ? (status as 403 | 404) : status >= 500 ? status : 'ok');

beforeAll(async () => {
  dir = mkdtempSync(join(tmpdir(), 'devyard-authz-'));
  cp = await startControlPlane({ dataDir: dir });
  token.owner = cp.tokens.adminToken;
  owner = client('owner');
  for (const role of ['admin', 'template-admin', 'auditor', 'member'] as const) token[role] = (await owner.createServiceAccount(role === 'admin' ? 'second-admin' : role, role)).token;
  // The stranger owns another organization and is no member of this one.
  await owner.createOrg('elsewhere');
  const inElsewhere = new DevyardClient({ url: cp.url, token: (await owner.createToken({ name: 'elsewhere', org: 'elsewhere' })).token });
  token.stranger = (await inElsewhere.createServiceAccount('stranger', 'owner')).token;
  const node = new DevyardClient({ url: cp.url, token: cp.tokens.nodeToken });
  await node.registerNode({ name: 'matrix-node', arch: 'x86_64', region: null, labels: {}, runtimes: ['sandbox'], capacity: { cpuMillis: 64000, memoryBytes: 256 * 1024 ** 3, diskBytes: 1024 ** 4 }, images: ['tiny'], agentUrl: 'http://127.0.0.1:1' });
});

afterAll(async () => {
  await cp?.close();
  if (dir) rmSync(dir, { recursive: true, force: true });
});

describe('authorization matrix', () => {
  it('has a decision for every route in the route table', () => {
    const ids = (ROUTES as readonly RouteDef[]).map((r) => r.operationId);
    expect(ids.filter((id) => !EXPECTED[id] || !SETUP[id])).toEqual([]);
    expect(Object.keys(EXPECTED).filter((id) => !ids.includes(id))).toEqual([]);
  });

  for (const route of ROUTES as readonly RouteDef[]) {
    it(`${route.operationId} (${route.method} ${route.path})`, async () => {
      const want = EXPECTED[route.operationId];
      const setup = SETUP[route.operationId];
      if (!want || !setup) throw new Error(`no authorization decision for ${route.operationId}`);
      const got: Record<string, Outcome | number> = {};
      for (const p of PERSONAS) got[p] = outcome(await call(route, await setup(p), token[p]));
      expect(got).toEqual(want);
      // Without a token: only the open routes answer.
      const anonymous = await call(route, await setup('owner'), null);
      if (route.auth === 'none') expect(outcome(anonymous)).toBe(want.owner);
      else expect(anonymous).toBe(401);
    });
  }

  it('refuses writes with a read-only token and accepts its reads', async () => {
    const ro = new DevyardClient({ url: cp.url, token: (await owner.createToken({ name: 'ro', scopes: ['read'] })).token });
    expect((await ro.listBoxes()).length).toBeGreaterThanOrEqual(0);
    await expect(ro.createBox({ name: 'nope', template: 'tiny' })).rejects.toMatchObject({ status: 403 });
    await expect(ro.createToken({ name: 'escalate', scopes: ['write'] })).rejects.toMatchObject({ status: 403 });
  });
});
