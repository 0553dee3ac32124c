/**
 * What the agent remembers across restarts and server outages: its node identity and credential
 * (the node's own token, given once at its first registration), the session key,
 * the last desired set it was given, and per box the operations it already tried. Written
 * atomically (temp file + rename) so a crash never leaves a torn file.
 *
 * Box secrets are never written here: the file is on disk, secrets live only in memory and on
 * tmpfs. A restarted agent gets them again with the next desired set from the server.
 */
import { mkdirSync, readFileSync, renameSync, writeFileSync } from 'node:fs';
import { dirname } from 'node:path';
import type { DesiredSet } from '@devyard/api/node-schemas';
import type { BoxSetupRecord } from './box-provisioner.js';

export interface AgentState {
  serverUrl: string;
  nodeId: string | null;
  /** The node's own token: every call after the first registration, re-registrations included. */
  credential?: string | null;
  /**
   * SHA-256 of the join token the credential was obtained with: the credential is only ever sent
   * to the installation that issued it (one join token per installation), wherever its URL moved.
   */
  credentialFor?: string | null;
  sessionKey: string | null;
  desired: DesiredSet | null;
  /** Operation ids that failed on this node; a failed operation is retried only under a new id. */
  failedOperations: Record<string, string>;
  /** One-time setup done per box (image, prebuild layers, checkout, postCreate). */
  setup: Record<string, BoxSetupRecord>;
}

export function loadAgentState(file: string, serverUrl: string): AgentState {
  try {
    const s = JSON.parse(readFileSync(file, 'utf8')) as AgentState;
    // A state file from another control plane describes boxes we must not act on; the node's
    // identity stays (its use is bound to the installation, see credentialFor).
    if (s.serverUrl === serverUrl) return { ...withoutSecrets(s), failedOperations: s.failedOperations ?? {}, setup: s.setup ?? {} };
    return { ...fresh(serverUrl), credential: s.credential ?? null, credentialFor: s.credentialFor ?? null };
  } catch {}
  return fresh(serverUrl);
}

function fresh(serverUrl: string): AgentState {
  return { serverUrl, nodeId: null, sessionKey: null, desired: null, failedOperations: {}, setup: {} };
}

export function saveAgentState(file: string, state: AgentState): void {
  mkdirSync(dirname(file), { recursive: true });
  const tmp = `${file}.${process.pid}.tmp`;
  writeFileSync(tmp, JSON.stringify(withoutSecrets(state)), { mode: 0o600 });
  renameSync(tmp, file);
}

/** The state with every box's secrets emptied (what goes to disk, and what a restarted agent knows). */
function withoutSecrets(state: AgentState): AgentState {
  if (!state.desired) return state;
  return { ...state, desired: { ...state.desired, boxes: state.desired.boxes.map((b) => ({ ...b, secrets: [] })) } };
}
