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
}

export interface BoxTable {
  id: string;
  name: string;
  owner: string;
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

export interface ServerKeyTable {
  name: string;
  private_key: string;
  public_key: string;
  created_at: number;
}

export interface Database {
  ssh_keys: SshKeyTable;
  box_host_keys: BoxHostKeyTable;
  box_ports: BoxPortTable;
  box_activity: BoxActivityTable;
  gateways: GatewayTable;
  server_keys: ServerKeyTable;
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
