import { describe, expect, it } from 'vitest';
import { orgPolicyFromFlags, parseOrgQuota } from '@devyard/cli/commands/org-policy-flags';

describe('--org-creation and --default-org-quota', () => {
  it('reads a quota the way people write one', () => {
    expect(parseOrgQuota('boxes=20, running=10,cpu=32,memory=64GiB,storage=500GiB,gpu=0')).toEqual({
      boxes: 20,
      runningBoxes: 10,
      cpuMillis: 32_000,
      memoryBytes: 64 * 1024 ** 3,
      diskBytes: 500 * 1024 ** 3,
      gpu: 0,
    });
    expect(parseOrgQuota('cpu=500m')).toEqual({ cpuMillis: 500 });
  });

  it('refuses what it cannot read, naming it', () => {
    expect(() => parseOrgQuota('boxes=many')).toThrow(/boxes must be a whole number/);
    expect(() => parseOrgQuota('disk=1GiB')).toThrow(/"disk=1GiB" is not one of boxes=…/);
    expect(() => parseOrgQuota('memory=lots')).toThrow(/not a size/);
    expect(() => parseOrgQuota('')).toThrow(/at least one limit/);
    expect(() => orgPolicyFromFlags({ orgCreation: 'everyone' })).toThrow(/operators or anyone/);
  });

  it('passes nothing when no flag is given (the server keeps its defaults)', () => {
    expect(orgPolicyFromFlags({})).toEqual({});
    expect(orgPolicyFromFlags({ orgCreation: 'anyone' })).toEqual({ orgs: { creation: 'anyone' } });
  });
});
