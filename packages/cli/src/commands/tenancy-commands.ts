/**
 * Identity and tenancy commands: `whoami`, `tokens`, `orgs`, `members`, `service-accounts`,
 * `teams`, `share` and `quota`.
 */
import type { Command } from 'commander';
import type { OrgRole } from '@devyard/core/rbac-policy';
import { ORG_ROLES } from '@devyard/core/rbac-policy';
import { parseDuration } from '@devyard/api/duration-format';
import { CliUsageError, clientFromEnv } from '../cli-config.js';
import { age, printJson, table } from '../output-format.js';

const role = (v: string): OrgRole => {
  if (!(ORG_ROLES as readonly string[]).includes(v)) throw new CliUsageError(`role must be one of ${ORG_ROLES.join(', ')}`);
  return v as OrgRole;
};
const out = (s: string) => void process.stdout.write(`${s}\n`);
const ttl = (v: string | undefined) => {
  if (v === undefined) return undefined;
  const ms = parseDuration(v);
  if (ms === undefined) throw new CliUsageError(`not a duration: ${v} (e.g. 12h, 30d)`);
  return Math.round(ms / 1000);
};

/** Bytes and millicores as people read them in the quota table. */
function quotaValue(resource: string, n: number): string {
  if (resource === 'memoryBytes' || resource === 'diskBytes') return `${(n / 1024 ** 3).toFixed(n % 1024 ** 3 === 0 ? 0 : 2)}GiB`;
  if (resource === 'cpuMillis') return `${n / 1000} CPU`;
  return String(n);
}

export function registerTenancyCommands(program: Command): void {
  program
    .command('whoami')
    .description('who the configured token speaks for: user, organization, role, teams')
    .option('--json', 'print JSON')
    .action(async (o) => {
      const me = await clientFromEnv().getMe();
      if (o.json) return printJson(me);
      out(`${me.user} (${me.kind}) — ${me.role} of ${me.org}${me.teams.length ? `; teams: ${me.teams.map((t) => `${t.name} (${t.role})`).join(', ')}` : ''}`);
      if (me.token) out(`token ${me.token.id}${me.token.scopes ? `, scopes ${me.token.scopes.join(',')}` : ''}${me.token.expiresAt ? `, expires ${me.token.expiresAt}` : ''}`);
    });

  const tokens = program.command('tokens').description('personal API tokens (stored hashed, shown once)');
  tokens
    .command('list', { isDefault: true })
    .option('--json', 'print JSON')
    .action(async (o) => {
      const list = await clientFromEnv().listTokens();
      if (o.json) return printJson(list);
      out(table(['ID', 'NAME', 'SCOPES', 'CREATED', 'EXPIRES', 'LAST USED', 'STATE'], list.map((t) => [t.id, t.name, t.scopes?.join(',') ?? 'all', age(t.createdAt), t.expiresAt ?? 'never', t.lastUsedAt ? age(t.lastUsedAt) : '-', t.revoked ? 'revoked' : t.expiresAt && Date.parse(t.expiresAt) < Date.now() ? 'expired' : 'active'])));
    });
  tokens
    .command('create')
    .argument('<name>', 'what the token is for')
    .option('--expires-in <duration>', 'lifetime, e.g. 12h, 30d (default 30d, at most 365d)')
    .option('--read-only', 'scope read: GET routes only')
    .option('--org <org>', 'organization the token acts in (default: the current one)')
    .option('--json', 'print JSON')
    .action(async (name: string, o) => {
      const r = await clientFromEnv().createToken({ name, ttlSeconds: ttl(o.expiresIn), scopes: o.readOnly ? ['read'] : undefined, org: o.org });
      if (o.json) return printJson(r);
      out(r.token);
      process.stderr.write(`token ${r.info.id} "${name}"${r.info.expiresAt ? `, expires ${r.info.expiresAt}` : ''}: shown once, store it now\n`);
    });
  tokens
    .command('revoke')
    .argument('<id>')
    .action(async (id: string) => {
      await clientFromEnv().revokeToken(id);
      out(`revoked ${id}`);
    });

  const orgs = program.command('orgs').description('organizations you belong to');
  orgs
    .command('list', { isDefault: true })
    .option('--json', 'print JSON')
    .action(async (o) => {
      const list = await clientFromEnv().listOrgs();
      if (o.json) return printJson(list);
      out(table(['NAME', 'ROLE', 'BOXES RUN IN', 'AGE'], list.map((x) => [x.name, x.role, x.trusted ? 'sandbox or microVM (trusted)' : 'microVMs', age(x.createdAt)])));
    });
  for (const [verb, trusted] of [['trust', true], ['untrust', false]] as const) {
    orgs
      .command(verb)
      .description(trusted ? "operators: trust the organization's code to share the node's kernel (its boxes may use the sandbox)" : 'operators: its boxes run in microVMs again (sandbox boxes of it do not start again)')
      .argument('<name>')
      .action(async (name: string) => {
        await clientFromEnv().setOrgTrust(name, trusted);
        out(trusted ? `organization ${name} is trusted: its boxes may run in the sandbox` : `organization ${name} is not trusted: its new boxes run in microVMs`);
      });
  }
  orgs
    .command('create')
    .argument('<name>')
    .action(async (name: string) => {
      await clientFromEnv().createOrg(name);
      out(`created organization ${name}; act in it with a token from \`devyard tokens create NAME --org ${name}\``);
    });

  const members = program.command('members').description("your organization's members and roles");
  members
    .command('list', { isDefault: true })
    .option('--json', 'print JSON')
    .action(async (o) => {
      const list = await clientFromEnv().listMembers();
      if (o.json) return printJson(list);
      out(table(['USER', 'KIND', 'ROLE', 'SINCE'], list.map((m) => [m.user, m.kind, m.role, age(m.since)])));
    });
  members
    .command('set-role')
    .argument('<user>')
    .argument('<role>', ORG_ROLES.join('|'))
    .action(async (user: string, r: string) => {
      await clientFromEnv().setMember(user, role(r));
      out(`${user} is now ${r}`);
    });
  members
    .command('remove')
    .argument('<user>')
    .action(async (user: string) => {
      await clientFromEnv().removeMember(user);
      out(`removed ${user}`);
    });

  members
    .command('invite')
    .description('invite someone with a role: prints a single-use token for `devyard join`')
    .requiredOption('--role <role>', ORG_ROLES.join('|'))
    .option('--expires-in <duration>', 'default 7d, at most 30d')
    .action(async (o) => {
      const r = await clientFromEnv().createInvitation(role(o.role), ttl(o.expiresIn));
      out(r.token);
      process.stderr.write(`invitation ${r.invitation.id} (${r.invitation.role}), expires ${r.invitation.expiresAt}; they run: devyard join <token>\n`);
    });
  members
    .command('invitations')
    .option('--json', 'print JSON')
    .action(async (o) => {
      const list = await clientFromEnv().listInvitations();
      if (o.json) return printJson(list);
      out(table(['ID', 'ROLE', 'BY', 'CREATED', 'EXPIRES', 'STATE'], list.map((i) => [i.id, i.role, i.createdBy, age(i.createdAt), i.expiresAt, i.state])));
    });
  members
    .command('revoke-invitation')
    .argument('<id>')
    .action(async (id: string) => (await clientFromEnv().revokeInvitation(id), out(`revoked ${id}`)));
  program
    .command('join')
    .description('join an organization with an invitation token')
    .argument('<token>')
    .action(async (token: string) => {
      const r = await clientFromEnv().acceptInvitation(token);
      out(`joined ${r.org} as ${r.role}; act in it with a token from \`devyard tokens create NAME --org ${r.org}\``);
    });

  program
    .command('service-account')
    .description('create a service account with a role; prints its first token (shown once)')
    .argument('<name>')
    .requiredOption('--role <role>', ORG_ROLES.join('|'))
    .option('--expires-in <duration>', 'token lifetime (default 365d)')
    .action(async (name: string, o) => {
      const r = await clientFromEnv().createServiceAccount(name, role(o.role), ttl(o.expiresIn));
      out(r.token);
      process.stderr.write(`service account ${name} (${o.role}); token ${r.info.id} shown once\n`);
    });

  const teams = program.command('teams').description('teams of your organization');
  teams
    .command('list', { isDefault: true })
    .option('--json', 'print JSON')
    .action(async (o) => {
      const list = await clientFromEnv().listTeams();
      if (o.json) return printJson(list);
      out(table(['TEAM', 'MEMBERS'], list.map((t) => [t.name, t.members.map((m) => `${m.user}${m.role === 'admin' ? ' (admin)' : ''}`).join(', ')])));
    });
  teams.command('create').argument('<team>').action(async (t: string) => (await clientFromEnv().createTeam(t), out(`created team ${t}`)));
  teams.command('delete').argument('<team>').action(async (t: string) => (await clientFromEnv().deleteTeam(t), out(`deleted team ${t}`)));
  teams
    .command('add')
    .argument('<team>')
    .argument('<user>')
    .option('--admin', 'as team admin')
    .action(async (t: string, u: string, o) => (await clientFromEnv().setTeamMember(t, u, o.admin ? 'admin' : 'member'), out(`${u} is in ${t}`)));
  teams.command('remove').argument('<team>').argument('<user>').action(async (t: string, u: string) => (await clientFromEnv().removeTeamMember(t, u), out(`${u} left ${t}`)));

  program
    .command('share')
    .description('share a box with a team (connect: shells, files, ports; manage: also lifecycle and delete), or stop with --remove')
    .argument('<box>')
    .argument('<team>')
    .option('--manage', 'let the team operate and delete the box too')
    .option('--remove', 'stop sharing')
    .option('--owner <user>', "another user's box (org admins)")
    .action(async (box: string, team: string, o) => {
      const c = clientFromEnv();
      if (o.remove) return void (await c.removeBoxShare(box, team, o.owner), out(`${box} is no longer shared with ${team}`));
      const s = await c.setBoxShare(box, team, o.manage ? 'manage' : 'connect', o.owner);
      out(`${box} is shared with ${s.team} (${s.access})`);
    });

  const quota = program.command('quota').description("quotas that apply to you, with current use (admins: team and user quotas; operators: organizations' quotas)");
  quota
    .command('show', { isDefault: true })
    .option('--org <org>', "operators: every quota of another organization")
    .option('--json', 'print JSON')
    .action(async (o) => {
      const list = await clientFromEnv().listQuotas(o.org);
      if (o.json) return printJson(list);
      if (list.length === 0) return out('no quotas apply to you');
      const rows: string[][] = [];
      for (const q of list) for (const [r, limit] of Object.entries(q.limits)) rows.push([q.scope, r, quotaValue(r, q.usage[r] ?? 0), quotaValue(r, limit as number)]);
      out(table(['SCOPE', 'RESOURCE', 'USED', 'LIMIT'], rows));
    });
  quota
    .command('set')
    .argument('<scope>', 'org, team:<team> or user:<user>')
    .option('--boxes <n>')
    .option('--running <n>', 'running (or paused) boxes')
    .option('--cpu <cores>', 'vCPU of running boxes')
    .option('--memory <GiB>', 'memory of running boxes, GiB')
    .option('--gpu <n>')
    .option('--storage <GiB>', 'disk of all boxes, GiB')
    .option('--org <org>', 'operators: set it in another organization')
    .action(async (scope: string, o) => {
      const num = (v: string | undefined, f = 1) => {
        if (v === undefined) return undefined;
        const n = Number(v);
        if (!Number.isFinite(n) || n < 0) throw new CliUsageError(`not a number: ${v}`);
        return Math.round(n * f);
      };
      const limits = Object.fromEntries(
        Object.entries({ boxes: num(o.boxes), runningBoxes: num(o.running), cpuMillis: num(o.cpu, 1000), memoryBytes: num(o.memory, 1024 ** 3), gpu: num(o.gpu), diskBytes: num(o.storage, 1024 ** 3) }).filter(([, v]) => v !== undefined),
      );
      if (Object.keys(limits).length === 0) throw new CliUsageError('give at least one limit (--boxes, --running, --cpu, --memory, --gpu, --storage)');
      await clientFromEnv().setQuota(scope, limits, o.org);
      out(`quota of ${scope}${o.org ? ` in ${o.org}` : ''} set`);
    });
  quota
    .command('remove')
    .argument('<scope>')
    .option('--org <org>', 'operators: remove it in another organization')
    .action(async (scope: string, o) => (await clientFromEnv().deleteQuota(scope, o.org), out(`quota of ${scope}${o.org ? ` in ${o.org}` : ''} removed`)));
}
