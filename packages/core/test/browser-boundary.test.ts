import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { scopeCovers, terminalPath } from '@devyard/core/access-policy';
import { domainMatches, previewCookieAllowed, previewDomainConflict, signInRedirect, siteOf } from '@devyard/core/browser-boundary';

describe('sites', () => {
  it('files hosts under their registrable domain, as browsers do', () => {
    expect(siteOf('gw.example.com')).toBe('example.com');
    expect(siteOf('8080--web.preview.example.co.uk:443')).toBe('example.co.uk');
    // Private suffixes count: two GitHub Pages sites are two sites.
    expect(siteOf('a.github.io')).toBe('a.github.io');
    // An unknown top-level name is a suffix of its own (Chromium: `localhost` and `a.localhost` are cross-site).
    expect(siteOf('localhost')).toBe('localhost');
    expect(siteOf('8080--web.localhost:7100')).toBe('8080--web.localhost');
    expect(siteOf('gw.devyard.test')).toBe('devyard.test');
    // An IP address is its own site.
    expect(siteOf('127.0.0.1:7100')).toBe('127.0.0.1');
    expect(siteOf('[::1]:7100')).toBe('::1');
  });

  it('matches domains the way a cookie Domain attribute does', () => {
    expect(domainMatches('a.b.example.com', 'example.com')).toBe(true);
    expect(domainMatches('example.com', '.Example.com')).toBe(true);
    expect(domainMatches('badexample.com', 'example.com')).toBe(false);
  });
});

describe('preview domains', () => {
  it('may serve previews only from another site than the gateway', () => {
    expect(previewDomainConflict('127.0.0.1', 'localhost')).toBeNull();
    expect(previewDomainConflict('[::1]', 'localhost')).toBeNull();
    expect(previewDomainConflict('devyard.example.com', 'example-boxes.com')).toBeNull();
    expect(previewDomainConflict('devyard.example.com', 'preview.example-boxes.com')).toBeNull();
    expect(previewDomainConflict('gw.devyard.test', 'preview.devyard-preview.test')).toBeNull();
    expect(previewDomainConflict('devyard.example.com', 'boxes.example.com')?.reason).toBe('same-site');
    expect(previewDomainConflict('devyard.example.com', 'example.com')?.reason).toBe('nested');
    expect(previewDomainConflict('example.com', 'preview.example.com')?.reason).toBe('nested');
    expect(previewDomainConflict('gw.example.co.uk', 'p.example.co.uk')?.reason).toBe('same-site');
    // Browsers call these cross-site, but a cookie for one could name the other: refused.
    expect(previewDomainConflict('localhost', 'localhost')?.reason).toBe('nested');
    expect(previewDomainConflict('localhost', 'previews.localhost')?.reason).toBe('nested');
    expect(previewDomainConflict('127.0.0.1', '127.0.0.1')?.reason).toBe('not-a-domain');
    expect(previewDomainConflict('127.0.0.1', 'bad_domain')?.reason).toBe('not-a-domain');
    expect(previewDomainConflict('127.0.0.1', '')?.reason).toBe('not-a-domain');
  });
});

describe('sign-in redirects', () => {
  const origin = 'https://devyard.example.com';

  it('keep paths of the origin, query and fragment included', () => {
    expect(signInRedirect('/boxes/web/terminal', origin)).toBe('/boxes/web/terminal');
    expect(signInRedirect('/a/../b?x=1#y', origin)).toBe('/b?x=1#y');
    expect(signInRedirect('/', origin)).toBe('/');
  });

  it('fall back to / for anything that could leave the origin', () => {
    for (const next of [null, '', 'boxes', '//evil.example', '/\\evil.example', '/%5Cevil', '/%5cevil', 'https:evil.example', 'https://evil.example/', 'javascript:alert(1)', '/\t/evil.example', '\t//evil.example', '/\n/evil.example', ' //evil.example', '/\\/evil', '/x\u0000', '/ x']) {
      expect([next, signInRedirect(next, origin)]).toEqual([next, '/']);
    }
  });

  it('never name another origin, whatever the input (property)', () => {
    fc.assert(
      fc.property(fc.string({ unit: 'binary', maxLength: 40 }), (next) => {
        const to = new URL(signInRedirect(next, origin), origin);
        return to.origin === origin;
      }),
      { numRuns: 5000 },
    );
    fc.assert(
      fc.property(fc.stringMatching(/^[/\\\t\n %5cCa-z:.]{0,20}$/), (next) => new URL(signInRedirect(next, origin), origin).origin === origin),
      { numRuns: 5000 },
    );
  });
});

describe('cookies of previewed apps', () => {
  const host = '8080--web.preview.example-boxes.com';
  const ours = ['devyard_session'];

  it("pass when they are the app's own, on its own host", () => {
    expect(previewCookieAllowed({ name: 'sid', value: '1' }, host, ours)).toBe(true);
    expect(previewCookieAllowed({ name: 'sid', value: '1', domain: host }, host, ours)).toBe(true);
    expect(previewCookieAllowed({ name: 'sid', value: '1', domain: `.${host.toUpperCase()}` }, host, ours)).toBe(true);
    expect(previewCookieAllowed({ name: 'sid', value: '1', domain: '' }, host, ours)).toBe(true);
  });

  it('are dropped when they are ours, in any spelling, or reach beyond the preview host', () => {
    for (const name of ['devyard_session', 'DEVYARD_SESSION', '__Host-devyard_session', '__secure-Devyard_Session']) {
      expect([name, previewCookieAllowed({ name, value: 'x' }, host, ours)]).toEqual([name, false]);
    }
    // A nameless cookie is sent back as its value: `devyard_session=x`.
    expect(previewCookieAllowed({ name: '', value: 'devyard_session=x' }, host, ours)).toBe(false);
    expect(previewCookieAllowed({ name: 'sid', value: '1', domain: 'preview.example-boxes.com' }, host, ours)).toBe(false);
    expect(previewCookieAllowed({ name: 'sid', value: '1', domain: 'example-boxes.com' }, host, ours)).toBe(false);
    expect(previewCookieAllowed({ name: 'sid', value: '1', domain: 'devyard.example.com' }, host, ours)).toBe(false);
  });
});

describe('browser scopes', () => {
  it('open only what they were issued for', () => {
    const term = { kind: 'terminal', box: 'web' } as const;
    const prev = { kind: 'preview', box: 'web', port: 8080 } as const;
    expect(scopeCovers(term, term)).toBe(true);
    expect(scopeCovers(term, { kind: 'terminal', box: 'api' })).toBe(false);
    expect(scopeCovers(term, prev)).toBe(false);
    expect(scopeCovers(prev, prev)).toBe(true);
    expect(scopeCovers(prev, { ...prev, port: 8081 })).toBe(false);
    expect(scopeCovers(prev, { ...prev, box: 'api' })).toBe(false);
    expect(scopeCovers(prev, term)).toBe(false);
    expect(terminalPath('web')).toBe('/boxes/web/terminal');
  });
});
