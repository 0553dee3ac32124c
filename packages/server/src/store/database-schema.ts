/**
 * Table types for Kysely. Times are epoch milliseconds, JSON columns are text: both map one-to-one
 * onto SQLite and PostgreSQL, so a PostgreSQL dialect is a new `createDatabase` and nothing else.
 */
import type { Generated } from 'kysely';

export interface TemplateTable {
  name: string;
  version: number;
  description: string;
  image: string;
  runtime: string;
  default_resources: string;
  max_resources: string;
  env: string;
  created_at: number;
  /** The whole validated spec as JSON; null on rows written before migration 0002. */
  spec: string | null;
  /** `sha256:…` the image was pinned to at publish time; null for built-in and unpinned images. */
  image_digest: string | null;
  org_id: Generated<string>;
}

export interface BoxTable {
  id: string;
  name: string;
  owner: string;
  org_id: string;
  template_name: string;
  template_version: number;
  image: string;
  runtime: string;
  desired_state: string;
  phase: string;
  generation: number;
  observed_generation: number;
  node_id: string | null;
  compute_reserved: number;
  resources: string;
  env: string;
  attempt: number;
  last_error: string | null;
  next_attempt_at: number | null;
  conditions: string;
  ip: string | null;
  created_at: number;
  updated_at: number;
  deleted_at: number | null;
  version: number;
  /** Source box id of a fork (migration 0009); null for created boxes. */
  fork_of: string | null;
  /** While a move is in flight: the node the box's snapshot is fetched from (migration 0010). */
  move_from_node_id: string | null;
  /** After a move: the old node that must still delete its copy of the box (migration 0010). */
  cleanup_node_id: string | null;
}

export interface BoxEventTable {
  id: Generated<number>;
  box_id: string;
  box_name: string;
  owner: string;
  time: number;
  type: string;
  phase: string | null;
  message: string;
}

export interface NodeTable {
  id: string;
  name: string;
  arch: string;
  region: string | null;
  labels: string;
  runtimes: string;
  capacity: string;
  allocated: string;
  images: string;
  agent_url: string;
  session_key: string;
  lease_expires_at: number;
  cordoned: number;
  registered_at: number;
  version: number;
}

export interface OperationTable {
  id: string;
  box_id: string;
  target_state: string;
  generation: number;
  attempt: number;
  state: string;
  error: string | null;
  created_at: number;
  finished_at: number | null;
}

export interface LeaseTable {
  name: string;
  holder: string;
  token: number;
  expires_at: number;
}

export interface IdempotencyKeyTable {
  owner: string;
  key: string;
  request_hash: string;
  box_id: string;
  created_at: number;
}

export interface ApiTokenTable {
  id: string;
  token_hash: string;
  name: string;
  kind: string;
  subject: string;
  created_at: number;
  /** The user the token speaks for (null for node and gateway tokens). */
  user_id?: string | null;
  /** The organization the token acts in. */
  org_id?: string | null;
  /** JSON array of scopes (`read`, `write`); null = everything the user's role allows. */
  scopes?: string | null;
  expires_at?: number | null;
  revoked_at?: number | null;
  last_used_at?: number | null;
}

export interface UserTable {
  id: string;
  name: string;
  email: string | null;
  /** `user` or `service` (a service account). */
  kind: string;
  oidc_issuer: string | null;
  oidc_subject: string | null;
  created_at: number;
  disabled_at: number | null;
}

export interface OrgTable {
  id: string;
  name: string;
  created_at: number;
  /** 1 when an operator trusts the organization's code to share the node's kernel (sandbox runtime). */
  trusted: Generated<number>;
}

export interface OrgMemberTable {
  org_id: string;
  user_id: string;
  role: string;
  created_at: number;
}

export interface TeamTable {
  id: string;
  org_id: string;
  name: string;
  created_at: number;
}

export interface TeamMemberTable {
  team_id: string;
  user_id: string;
  role: string;
}

export interface BoxShareTable {
  box_id: string;
  team_id: string;
  access: string;
}

export interface QuotaTable {
  org_id: string;
  scope_type: string;
  scope_id: string;
  /** JSON QuotaLimits. */
  limits: string;
  updated_at: number;
}

export interface PrebuildTable {
  node_id: string;
  id: string;
  template_name: string;
  template_version: number;
  commit_sha: string;
  status: string;
  error: string | null;
  log_tail: string;
  finished_at: number;
}

export interface SshKeyTable {
  id: string;
  subject: string;
  name: string;
  public_key: string;
  fingerprint: string;
  created_at: number;
}

export interface BoxHostKeyTable {
  box_id: string;
  private_key: string;
  public_key: string;
}

export interface BoxPortTable {
  box_id: string;
  port: number;
  visibility: string;
  updated_at: number;
}

export interface BoxActivityTable {
  box_id: string;
  last_active_at: number;
  sessions: number;
  gateway_id: string;
  reported_at: number;
}

export interface GatewayTable {
  id: string;
  /** GatewayEndpoint as JSON. */
  endpoint: string;
  last_seen_at: number;
}

export interface RedeemedSignInTable {
  /** Token id of the sign-in link. */
  jti: string;
  subject: string;
  redeemed_at: number;
  /** When the link would have expired: the row is useless after. */
  expires_at: number;
}

export interface ServerKeyTable {
  name: string;
  private_key: string;
  public_key: string;
  created_at: number;
}

// ---- audit log (migration 0006) ----
export interface AuditLogTable {
  org_id: string;
  /** 1, 2, 3… per org, no gaps: a gap is a deleted entry. */
  seq: number;
  time: number;
  actor: string;
  action: string;
  target: string | null;
  request_id: string | null;
  source: string | null;
  /** ok | denied | error */
  result: string;
  /** Canonical JSON, or null. */
  detail: string | null;
  prev_hash: string;
  hash: string;
}

/** The newest (seq, hash) of each org's chain, written with every append. */
export interface AuditHeadTable {
  org_id: string;
  seq: number;
  hash: string;
}
// ---- end audit log ----

// ---- secrets (migration 0007) ----
export interface SecretTable {
  id: string;
  org_id: string;
  /** org | team | user | template */
  scope_type: string;
  /** The org id, team name, user name or template name. */
  scope_id: string;
  name: string;
  /** base64: AES-256-GCM ciphertext of the value + tag. */
  ciphertext: string;
  /** base64: the value's 12-byte IV. */
  iv: string;
  /** base64: the data key, wrapped by the KEK `kek_id`. */
  wrapped_dek: string;
  kek_id: string;
  version: number;
  created_by: string;
  created_at: number;
  updated_at: number;
}
// ---- end secrets ----

export interface InvitationTable {
  id: string;
  org_id: string;
  token_hash: string;
  role: string;
  created_by: string;
  created_at: number;
  expires_at: number;
  accepted_by: string | null;
  accepted_at: number | null;
  revoked_at: number | null;
}

export interface Database {
  invitations: InvitationTable;
  secrets: SecretTable;
  users: UserTable;
  orgs: OrgTable;
  org_members: OrgMemberTable;
  teams: TeamTable;
  team_members: TeamMemberTable;
  box_shares: BoxShareTable;
  quotas: QuotaTable;
  audit_log: AuditLogTable;
  audit_heads: AuditHeadTable;
  ssh_keys: SshKeyTable;
  box_host_keys: BoxHostKeyTable;
  box_ports: BoxPortTable;
  box_activity: BoxActivityTable;
  gateways: GatewayTable;
  server_keys: ServerKeyTable;
  redeemed_sign_ins: RedeemedSignInTable;
  prebuilds: PrebuildTable;
  templates: TemplateTable;
  boxes: BoxTable;
  box_events: BoxEventTable;
  nodes: NodeTable;
  operations: OperationTable;
  leases: LeaseTable;
  idempotency_keys: IdempotencyKeyTable;
  api_tokens: ApiTokenTable;
}
