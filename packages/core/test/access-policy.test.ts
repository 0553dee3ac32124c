import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { boxHostAlias, gatewayAccess, mayConnect, mayOpenPort, parsePreviewHost, previewHost } from '@devyard/core/access-policy';

describe('access policy', () => {
  const box = { owner: 'alice', orgId: 'o1', shares: [{ teamId: 't1', access: 'connect' as const }] };

  it('derives gateway access from membership, ownership and shares', () => {
    expect(gatewayAccess({ role: 'member', teamIds: [] }, 'alice', box)).toBe('manage');
    expect(gatewayAccess({ role: 'member', teamIds: ['t1'] }, 'bob', box)).toBe('connect');
    expect(gatewayAccess({ role: 'member', teamIds: [] }, 'bob', box)).toBe('none');
    expect(gatewayAccess(undefined, 'alice', box)).toBe('none');
    expect(gatewayAccess({ role: 'admin', teamIds: [] }, 'carol', box)).toBe('manage');
  });

  it('opens a private port to those who may connect, an org port to every member', () => {
    expect(mayOpenPort('connect', true, 'private')).toBe(true);
    expect(mayOpenPort('none', true, 'private')).toBe(false);
    expect(mayOpenPort('none', true, 'org')).toBe(true);
    expect(mayOpenPort('none', false, 'org')).toBe(false);
    expect(mayConnect('read')).toBe(false);
  });

  it('names a box devyard.<box> for SSH', () => {
    expect(boxHostAlias('web')).toBe('devyard.web');
  });
});

describe('preview hosts', () => {
  it('parses <port>--<box>.<domain> with or without a listen port, case-insensitively', () => {
    expect(parsePreviewHost('8080--web.localhost:7100', 'localhost')).toEqual({ port: 8080, box: 'web' });
    expect(parsePreviewHost('3000--my-box.Dev.Example.com', 'dev.example.com')).toEqual({ port: 3000, box: 'my-box' });
  });

  it('refuses other hosts, bad ports and lookalike domains', () => {
    for (const h of ['localhost:7100', 'web.localhost', '0--web.localhost', '70000--web.localhost', '8080--web.evil.com', '8080--web.localhost.evil.com', '8080--.localhost', 'x8080--web.localhost', '8080--web--x.y.localhost']) {
      expect(parsePreviewHost(h, 'localhost'), h).toBeNull();
    }
  });

  it('round-trips every port and box name', () => {
    fc.assert(
      fc.property(fc.integer({ min: 1, max: 65535 }), fc.stringMatching(/^[a-z][a-z0-9-]{0,30}[a-z0-9]$/), (port, name) => {
        expect(parsePreviewHost(previewHost(port, name, 'localhost'), 'localhost')).toEqual({ port, box: name });
      }),
    );
  });
});
