import { describe, expect, it } from 'vitest';
import { decideBoxRuntime, mayRunIn } from '@devyard/core/box-isolation';

describe('box isolation', () => {
  it('a trusted organization gets what it asks for, else the template runtime', () => {
    expect(decideBoxRuntime(undefined, 'sandbox', true)).toBe('sandbox');
    expect(decideBoxRuntime('microvm', 'sandbox', true)).toBe('microvm');
    expect(decideBoxRuntime('sandbox', 'microvm', true)).toBe('sandbox');
  });

  it("an untrusted organization's boxes run in microVMs; asking for the sandbox is refused", () => {
    expect(decideBoxRuntime(undefined, 'sandbox', false)).toBe('microvm');
    expect(decideBoxRuntime(undefined, 'microvm', false)).toBe('microvm');
    expect(decideBoxRuntime('microvm', 'sandbox', false)).toBe('microvm');
    expect(() => decideBoxRuntime('sandbox', 'sandbox', false)).toThrow(expect.objectContaining({ code: 'forbidden' }));
  });

  it('a sandbox box of an organization that is no longer trusted does not start again', () => {
    expect(mayRunIn('sandbox', false)).toBe(false);
    expect(mayRunIn('microvm', false)).toBe(true);
    expect(mayRunIn('sandbox', true)).toBe(true);
  });
});
