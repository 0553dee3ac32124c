/**
 * Versioned schema migrations, applied in name order by Kysely's Migrator. Never edit a migration
 * that has shipped: add a new one.
 */
import { sql, type Kysely, type Migration, type MigrationProvider } from 'kysely';

const m0001: Migration = {
  async up(db: Kysely<unknown>) {
    await db.schema
      .createTable('templates')
      .addColumn('name', 'text', (c) => c.notNull())
      .addColumn('version', 'integer', (c) => c.notNull())
      .addColumn('description', 'text', (c) => c.notNull())
      .addColumn('image', 'text', (c) => c.notNull())
      .addColumn('runtime', 'text', (c) => c.notNull())
      .addColumn('default_resources', 'text', (c) => c.notNull())
      .addColumn('max_resources', 'text', (c) => c.notNull())
      .addColumn('env', 'text', (c) => c.notNull())
      .addColumn('created_at', 'bigint', (c) => c.notNull())
      .addPrimaryKeyConstraint('templates_pk', ['name', 'version'])
      .execute();

    await db.schema
      .createTable('boxes')
      .addColumn('id', 'text', (c) => c.primaryKey())
      .addColumn('name', 'text', (c) => c.notNull())
      .addColumn('owner', 'text', (c) => c.notNull())
      .addColumn('template_name', 'text', (c) => c.notNull())
      .addColumn('template_version', 'integer', (c) => c.notNull())
      .addColumn('image', 'text', (c) => c.notNull())
      .addColumn('runtime', 'text', (c) => c.notNull())
      .addColumn('desired_state', 'text', (c) => c.notNull())
      .addColumn('phase', 'text', (c) => c.notNull())
      .addColumn('generation', 'integer', (c) => c.notNull())
      .addColumn('observed_generation', 'integer', (c) => c.notNull())
      .addColumn('node_id', 'text')
      .addColumn('compute_reserved', 'integer', (c) => c.notNull())
      .addColumn('resources', 'text', (c) => c.notNull())
      .addColumn('env', 'text', (c) => c.notNull())
      .addColumn('attempt', 'integer', (c) => c.notNull())
      .addColumn('last_error', 'text')
      .addColumn('next_attempt_at', 'bigint')
      .addColumn('conditions', 'text', (c) => c.notNull())
      .addColumn('ip', 'text')
      .addColumn('created_at', 'bigint', (c) => c.notNull())
      .addColumn('updated_at', 'bigint', (c) => c.notNull())
      .addColumn('deleted_at', 'bigint')
      .addColumn('version', 'integer', (c) => c.notNull())
      .execute();
    // A name is unique per owner among boxes that still exist; deleted names can be reused.
    await sql`CREATE UNIQUE INDEX boxes_owner_name_live ON boxes (owner, name) WHERE deleted_at IS NULL`.execute(db);
    await db.schema.createIndex('boxes_node').on('boxes').column('node_id').execute();

    await db.schema
      .createTable('box_events')
      .addColumn('id', 'integer', (c) => c.primaryKey().autoIncrement())
      .addColumn('box_id', 'text', (c) => c.notNull())
      .addColumn('box_name', 'text', (c) => c.notNull())
      .addColumn('owner', 'text', (c) => c.notNull())
      .addColumn('time', 'bigint', (c) => c.notNull())
      .addColumn('type', 'text', (c) => c.notNull())
      .addColumn('phase', 'text')
      .addColumn('message', 'text', (c) => c.notNull())
      .execute();
    await db.schema.createIndex('box_events_box').on('box_events').columns(['box_id', 'id']).execute();

    await db.schema
      .createTable('nodes')
      .addColumn('id', 'text', (c) => c.primaryKey())
      .addColumn('name', 'text', (c) => c.notNull().unique())
      .addColumn('arch', 'text', (c) => c.notNull())
      .addColumn('region', 'text')
      .addColumn('labels', 'text', (c) => c.notNull())
      .addColumn('runtimes', 'text', (c) => c.notNull())
      .addColumn('capacity', 'text', (c) => c.notNull())
      .addColumn('allocated', 'text', (c) => c.notNull())
      .addColumn('images', 'text', (c) => c.notNull())
      .addColumn('agent_url', 'text', (c) => c.notNull())
      .addColumn('session_key', 'text', (c) => c.notNull())
      .addColumn('lease_expires_at', 'bigint', (c) => c.notNull())
      .addColumn('cordoned', 'integer', (c) => c.notNull())
      .addColumn('registered_at', 'bigint', (c) => c.notNull())
      .addColumn('version', 'integer', (c) => c.notNull())
      .execute();

    await db.schema
      .createTable('operations')
      .addColumn('id', 'text', (c) => c.primaryKey())
      .addColumn('box_id', 'text', (c) => c.notNull())
      .addColumn('target_state', 'text', (c) => c.notNull())
      .addColumn('generation', 'integer', (c) => c.notNull())
      .addColumn('attempt', 'integer', (c) => c.notNull())
      .addColumn('state', 'text', (c) => c.notNull())
      .addColumn('error', 'text')
      .addColumn('created_at', 'bigint', (c) => c.notNull())
      .addColumn('finished_at', 'bigint')
      .execute();
    await db.schema.createIndex('operations_box').on('operations').column('box_id').execute();

    await db.schema
      .createTable('leases')
      .addColumn('name', 'text', (c) => c.primaryKey())
      .addColumn('holder', 'text', (c) => c.notNull())
      .addColumn('token', 'bigint', (c) => c.notNull())
      .addColumn('expires_at', 'bigint', (c) => c.notNull())
      .execute();

    await db.schema
      .createTable('idempotency_keys')
      .addColumn('owner', 'text', (c) => c.notNull())
      .addColumn('key', 'text', (c) => c.notNull())
      .addColumn('request_hash', 'text', (c) => c.notNull())
      .addColumn('box_id', 'text', (c) => c.notNull())
      .addColumn('created_at', 'bigint', (c) => c.notNull())
      .addPrimaryKeyConstraint('idempotency_keys_pk', ['owner', 'key'])
      .execute();

    await db.schema
      .createTable('api_tokens')
      .addColumn('id', 'text', (c) => c.primaryKey())
      .addColumn('token_hash', 'text', (c) => c.notNull().unique())
      .addColumn('name', 'text', (c) => c.notNull())
      .addColumn('kind', 'text', (c) => c.notNull())
      .addColumn('subject', 'text', (c) => c.notNull())
      .addColumn('created_at', 'bigint', (c) => c.notNull())
      .execute();
  },
};

// Nullable columns, no backfill: rows from 0001 (the seeded built-ins) keep reading through their
// old columns, and a backfill would need JSON functions that differ between SQLite and PostgreSQL.
const m0002: Migration = {
  async up(db: Kysely<unknown>) {
    await db.schema.alterTable('templates').addColumn('spec', 'text').execute();
    await db.schema.alterTable('templates').addColumn('image_digest', 'text').execute();
  },
};

/** Prebuilds as nodes report them: one row per (node, prebuild). */
const m0003: Migration = {
  async up(db: Kysely<unknown>) {
    await db.schema
      .createTable('prebuilds')
      .addColumn('node_id', 'text', (c) => c.notNull())
      .addColumn('id', 'text', (c) => c.notNull())
      .addColumn('template_name', 'text', (c) => c.notNull())
      .addColumn('template_version', 'integer', (c) => c.notNull())
      .addColumn('commit_sha', 'text', (c) => c.notNull())
      .addColumn('status', 'text', (c) => c.notNull())
      .addColumn('error', 'text')
      .addColumn('log_tail', 'text', (c) => c.notNull())
      .addColumn('finished_at', 'bigint', (c) => c.notNull())
      .addPrimaryKeyConstraint('prebuilds_pk', ['node_id', 'id'])
      .execute();
    await db.schema.createIndex('prebuilds_template').on('prebuilds').columns(['template_name', 'finished_at']).execute();
  },
};

/**
 * Access: users' SSH keys (a key belongs to one user: the gateway finds the user by it),
 * each box's own SSH host key, per-port preview visibility, gateways seen and session activity, and
 * the server's own keys (access-token signing, the gateways' shared host key). Host keys and
 * activity live beside the box row so neither bumps the box's version (its ETag).
 */
const m0004: Migration = {
  async up(db: Kysely<unknown>) {
    await db.schema
      .createTable('ssh_keys')
      .addColumn('id', 'text', (c) => c.primaryKey())
      .addColumn('subject', 'text', (c) => c.notNull())
      .addColumn('name', 'text', (c) => c.notNull())
      .addColumn('public_key', 'text', (c) => c.notNull())
      .addColumn('fingerprint', 'text', (c) => c.notNull().unique())
      .addColumn('created_at', 'bigint', (c) => c.notNull())
      .execute();
    await db.schema.createIndex('ssh_keys_subject').on('ssh_keys').column('subject').execute();
    await db.schema
      .createTable('box_host_keys')
      .addColumn('box_id', 'text', (c) => c.primaryKey())
      .addColumn('private_key', 'text', (c) => c.notNull())
      .addColumn('public_key', 'text', (c) => c.notNull())
      .execute();
    await db.schema
      .createTable('box_ports')
      .addColumn('box_id', 'text', (c) => c.notNull())
      .addColumn('port', 'integer', (c) => c.notNull())
      .addColumn('visibility', 'text', (c) => c.notNull())
      .addColumn('updated_at', 'bigint', (c) => c.notNull())
      .addPrimaryKeyConstraint('box_ports_pk', ['box_id', 'port'])
      .execute();
    await db.schema
      .createTable('box_activity')
      .addColumn('box_id', 'text', (c) => c.primaryKey())
      .addColumn('last_active_at', 'bigint', (c) => c.notNull())
      .addColumn('sessions', 'integer', (c) => c.notNull())
      .addColumn('gateway_id', 'text', (c) => c.notNull())
      .addColumn('reported_at', 'bigint', (c) => c.notNull())
      .execute();
    await db.schema
      .createTable('gateways')
      .addColumn('id', 'text', (c) => c.primaryKey())
      .addColumn('endpoint', 'text', (c) => c.notNull())
      .addColumn('last_seen_at', 'bigint', (c) => c.notNull())
      .execute();
    await db.schema
      .createTable('server_keys')
      .addColumn('name', 'text', (c) => c.primaryKey())
      .addColumn('private_key', 'text', (c) => c.notNull())
      .addColumn('public_key', 'text', (c) => c.notNull())
      .addColumn('created_at', 'bigint', (c) => c.notNull())
      .execute();
  },
};

// ---- audit log ----
/**
 * The audit log: one hash chain per organization, keyed (org_id, seq) so that two writers racing
 * for the same next seq cannot both succeed (the loser retries on the new head). `audit_heads`
 * keeps the newest (seq, hash) per org, written in the same transaction as the entry, so deleting
 * the newest entries is detected too (see server/src/audit/audit-log.ts).
 */
const m0006: Migration = {
  async up(db: Kysely<unknown>) {
    await db.schema
      .createTable('audit_log')
      .addColumn('org_id', 'text', (c) => c.notNull())
      .addColumn('seq', 'integer', (c) => c.notNull())
      .addColumn('time', 'bigint', (c) => c.notNull())
      .addColumn('actor', 'text', (c) => c.notNull())
      .addColumn('action', 'text', (c) => c.notNull())
      .addColumn('target', 'text')
      .addColumn('request_id', 'text')
      .addColumn('source', 'text')
      .addColumn('result', 'text', (c) => c.notNull())
      .addColumn('detail', 'text')
      .addColumn('prev_hash', 'text', (c) => c.notNull())
      .addColumn('hash', 'text', (c) => c.notNull())
      .addPrimaryKeyConstraint('audit_log_pk', ['org_id', 'seq'])
      .execute();
    await db.schema.createIndex('audit_log_time').on('audit_log').columns(['org_id', 'time']).execute();
    await db.schema
      .createTable('audit_heads')
      .addColumn('org_id', 'text', (c) => c.primaryKey())
      .addColumn('seq', 'integer', (c) => c.notNull())
      .addColumn('hash', 'text', (c) => c.notNull())
      .execute();
  },
};
// ---- end audit log ----

/**
 * Tenancy: users (local or from an OIDC issuer), organizations with member roles, teams,
 * boxes shared with teams, API tokens with owner, organization, expiry, scopes and revocation, and
 * quotas. Every box and template belongs to an organization; what existed before lands in the
 * default one, and the bootstrap admin becomes its owner.
 */
const m0005: Migration = {
  async up(db: Kysely<unknown>) {
    await db.schema
      .createTable('users')
      .addColumn('id', 'text', (c) => c.primaryKey())
      .addColumn('name', 'text', (c) => c.notNull().unique())
      .addColumn('email', 'text')
      .addColumn('kind', 'text', (c) => c.notNull())
      .addColumn('oidc_issuer', 'text')
      .addColumn('oidc_subject', 'text')
      .addColumn('created_at', 'bigint', (c) => c.notNull())
      .addColumn('disabled_at', 'bigint')
      .execute();
    await db.schema.createIndex('users_oidc').on('users').columns(['oidc_issuer', 'oidc_subject']).unique().execute();
    await db.schema
      .createTable('orgs')
      .addColumn('id', 'text', (c) => c.primaryKey())
      .addColumn('name', 'text', (c) => c.notNull().unique())
      .addColumn('created_at', 'bigint', (c) => c.notNull())
      .execute();
    await db.schema
      .createTable('org_members')
      .addColumn('org_id', 'text', (c) => c.notNull())
      .addColumn('user_id', 'text', (c) => c.notNull())
      .addColumn('role', 'text', (c) => c.notNull())
      .addColumn('created_at', 'bigint', (c) => c.notNull())
      .addPrimaryKeyConstraint('org_members_pk', ['org_id', 'user_id'])
      .execute();
    await db.schema
      .createTable('teams')
      .addColumn('id', 'text', (c) => c.primaryKey())
      .addColumn('org_id', 'text', (c) => c.notNull())
      .addColumn('name', 'text', (c) => c.notNull())
      .addColumn('created_at', 'bigint', (c) => c.notNull())
      .addUniqueConstraint('teams_org_name', ['org_id', 'name'])
      .execute();
    await db.schema
      .createTable('team_members')
      .addColumn('team_id', 'text', (c) => c.notNull())
      .addColumn('user_id', 'text', (c) => c.notNull())
      .addColumn('role', 'text', (c) => c.notNull())
      .addPrimaryKeyConstraint('team_members_pk', ['team_id', 'user_id'])
      .execute();
    await db.schema
      .createTable('box_shares')
      .addColumn('box_id', 'text', (c) => c.notNull())
      .addColumn('team_id', 'text', (c) => c.notNull())
      .addColumn('access', 'text', (c) => c.notNull())
      .addPrimaryKeyConstraint('box_shares_pk', ['box_id', 'team_id'])
      .execute();
    await db.schema
      .createTable('quotas')
      .addColumn('org_id', 'text', (c) => c.notNull())
      .addColumn('scope_type', 'text', (c) => c.notNull())
      .addColumn('scope_id', 'text', (c) => c.notNull())
      .addColumn('limits', 'text', (c) => c.notNull())
      .addColumn('updated_at', 'bigint', (c) => c.notNull())
      .addPrimaryKeyConstraint('quotas_pk', ['org_id', 'scope_type', 'scope_id'])
      .execute();
    for (const col of ['user_id', 'org_id', 'scopes']) await db.schema.alterTable('api_tokens').addColumn(col, 'text').execute();
    for (const col of ['expires_at', 'revoked_at', 'last_used_at']) await db.schema.alterTable('api_tokens').addColumn(col, 'bigint').execute();
    await db.schema.alterTable('boxes').addColumn('org_id', 'text', (c) => c.notNull().defaultTo('org_default')).execute();
    await db.schema.alterTable('templates').addColumn('org_id', 'text', (c) => c.notNull().defaultTo('org_default')).execute();
    const now = Date.now();
    await sql`insert into orgs (id, name, created_at) values ('org_default', 'default', ${now})`.execute(db);
    await sql`insert into users (id, name, email, kind, created_at) values ('u_admin', 'admin', null, 'user', ${now})`.execute(db);
    await sql`insert into org_members (org_id, user_id, role, created_at) values ('org_default', 'u_admin', 'owner', ${now})`.execute(db);
    await sql`update api_tokens set user_id = 'u_admin', org_id = 'org_default' where kind = 'user' and subject = 'admin'`.execute(db);
  },
};

// ---- secrets ----
/**
 * Secrets: values encrypted under a per-secret data key (AES-256-GCM), the data key wrapped by a
 * key-encryption key that lives outside the database (see server/src/secrets/secret-envelope.ts).
 * Binary columns are base64 text, like every other column that is not a plain value.
 */
const m0007: Migration = {
  async up(db: Kysely<unknown>) {
    await db.schema
      .createTable('secrets')
      .addColumn('id', 'text', (c) => c.primaryKey())
      .addColumn('org_id', 'text', (c) => c.notNull())
      .addColumn('scope_type', 'text', (c) => c.notNull())
      .addColumn('scope_id', 'text', (c) => c.notNull())
      .addColumn('name', 'text', (c) => c.notNull())
      .addColumn('ciphertext', 'text', (c) => c.notNull())
      .addColumn('iv', 'text', (c) => c.notNull())
      .addColumn('wrapped_dek', 'text', (c) => c.notNull())
      .addColumn('kek_id', 'text', (c) => c.notNull())
      .addColumn('version', 'integer', (c) => c.notNull())
      .addColumn('created_by', 'text', (c) => c.notNull())
      .addColumn('created_at', 'bigint', (c) => c.notNull())
      .addColumn('updated_at', 'bigint', (c) => c.notNull())
      .addUniqueConstraint('secrets_scope_name', ['org_id', 'scope_type', 'scope_id', 'name'])
      .execute();
    await db.schema.createIndex('secrets_kek').on('secrets').column('kek_id').execute();
  },
};
// ---- end secrets ----

/** Invitations to join an organization with a role: single use, expiring, stored hashed. */
const m0008: Migration = {
  async up(db: Kysely<unknown>) {
    await db.schema
      .createTable('invitations')
      .addColumn('id', 'text', (c) => c.primaryKey())
      .addColumn('org_id', 'text', (c) => c.notNull())
      .addColumn('token_hash', 'text', (c) => c.notNull().unique())
      .addColumn('role', 'text', (c) => c.notNull())
      .addColumn('created_by', 'text', (c) => c.notNull())
      .addColumn('created_at', 'bigint', (c) => c.notNull())
      .addColumn('expires_at', 'bigint', (c) => c.notNull())
      .addColumn('accepted_by', 'text')
      .addColumn('accepted_at', 'bigint')
      .addColumn('revoked_at', 'bigint')
      .execute();
  },
};

/**
 * Forks (microvm): the id of the box a box was cloned from, which its node agent clones it from.
 * Nullable, no backfill: every box before this one was created, not forked.
 */
const m0009: Migration = {
  async up(db: Kysely<unknown>) {
    await db.schema.alterTable('boxes').addColumn('fork_of', 'text').execute();
  },
};

/**
 * Moves of paused microvm boxes between nodes: the node the snapshot is fetched from while a move
 * is in flight, and the node that must still delete its copy afterwards. Nullable, no backfill: no
 * box was moving before this migration.
 */
const m0010: Migration = {
  async up(db: Kysely<unknown>) {
    await db.schema.alterTable('boxes').addColumn('move_from_node_id', 'text').execute();
    await db.schema.alterTable('boxes').addColumn('cleanup_node_id', 'text').execute();
    // Every desired set of a node looks up the boxes it holds for a move or must still delete.
    await db.schema.createIndex('boxes_move_from_node').on('boxes').column('move_from_node_id').execute();
    await db.schema.createIndex('boxes_cleanup_node').on('boxes').column('cleanup_node_id').execute();
  },
};

/**
 * Browser sign-in links redeemed so far, by token id, kept until the link would have expired
 * anyway: a link works once, through whichever gateway the browser reaches first.
 */
const m0011: Migration = {
  async up(db: Kysely<unknown>) {
    await db.schema
      .createTable('redeemed_sign_ins')
      .addColumn('jti', 'text', (c) => c.primaryKey())
      .addColumn('subject', 'text', (c) => c.notNull())
      .addColumn('redeemed_at', 'bigint', (c) => c.notNull())
      .addColumn('expires_at', 'bigint', (c) => c.notNull())
      .execute();
    await db.schema.createIndex('redeemed_sign_ins_expiry').on('redeemed_sign_ins').column('expires_at').execute();
  },
};

/**
 * Whether an organization's code is trusted to share the node's kernel (the sandbox runtime).
 * Organizations are not, unless an operator says so; the default one is the operator's own.
 */
const m0012: Migration = {
  async up(db: Kysely<unknown>) {
    await db.schema.alterTable('orgs').addColumn('trusted', 'integer', (c) => c.notNull().defaultTo(0)).execute();
    await sql`update orgs set trusted = 1 where id = 'org_default'`.execute(db);
  },
};

/** Box lists read one organization's live boxes a page at a time, oldest first. */
const m0013: Migration = {
  async up(db: Kysely<unknown>) {
    await sql`CREATE INDEX boxes_org_live ON boxes (org_id, created_at, id) WHERE deleted_at IS NULL`.execute(db);
  },
};

export const migrationProvider: MigrationProvider = {
  async getMigrations() {
    return { '0001_initial': m0001, '0002_template_spec': m0002, '0003_prebuilds': m0003, '0004_access': m0004, '0005_tenancy': m0005, '0006_audit_log': m0006, '0007_secrets': m0007, '0008_invitations': m0008, '0009_box_fork_of': m0009, '0010_box_move': m0010, '0011_redeemed_sign_ins': m0011, '0012_org_trust': m0012, '0013_boxes_org_live': m0013 };
  },
};
