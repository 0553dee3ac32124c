/** The agent's state file across a server URL change: the boxes it described are dropped, the node's identity is kept. */
import { mkdtempSync, rmSync, statSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { loadAgentState, saveAgentState } from '@devyard/agent/agent-state-file';

const dir = mkdtempSync(join(tmpdir(), 'dy-state-'));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

describe('agent state file', () => {
  it('keeps the node credential (bound to its installation) when the server URL changes, and nothing of the boxes', () => {
    const file = join(dir, 'agent-state.json');
    const set = { nodeId: 'n_1', generation: 1, boxes: [], prebuilds: [] } as never;
    saveAgentState(file, { serverUrl: 'http://127.0.0.1:1', nodeId: 'n_1', sessionKey: 'k', credential: 'dy_n_x', credentialFor: 'h', desired: set, failedOperations: { b: 'op' }, setup: {} });
    expect(statSync(file).mode & 0o777).toBe(0o600);
    expect(loadAgentState(file, 'http://127.0.0.1:1')).toMatchObject({ nodeId: 'n_1', credential: 'dy_n_x', credentialFor: 'h', failedOperations: { b: 'op' } });
    expect(loadAgentState(file, 'http://127.0.0.1:2')).toEqual({ serverUrl: 'http://127.0.0.1:2', nodeId: null, sessionKey: null, desired: null, failedOperations: {}, setup: {}, credential: 'dy_n_x', credentialFor: 'h' });
  });
});
