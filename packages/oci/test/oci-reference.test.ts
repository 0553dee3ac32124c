import { describe, expect, it } from 'vitest';
import { DomainError } from '@devyard/core/domain-error';
import { formatOciReference, isOciReference, manifestReference, parseOciReference } from '@devyard/oci/oci-reference';

const HEX = 'a'.repeat(64);

describe('oci references', () => {
  it('parses host, port, nested path, tag and digest', () => {
    expect(parseOciReference('127.0.0.1:5000/team/app:1.2')).toEqual({ registry: '127.0.0.1:5000', repository: 'team/app', tag: '1.2' });
    expect(parseOciReference(`ghcr.io/org/sub/app@sha256:${HEX}`)).toEqual({ registry: 'ghcr.io', repository: 'org/sub/app', digest: `sha256:${HEX}` });
    expect(parseOciReference(`localhost/app:v1@sha256:${HEX}`)).toEqual({ registry: 'localhost', repository: 'app', tag: 'v1', digest: `sha256:${HEX}` });
    expect(parseOciReference('registry.example.com/a_b__c-d.e')).toEqual({ registry: 'registry.example.com', repository: 'a_b__c-d.e' });
  });

  it('formats back to the same string', () => {
    for (const s of ['127.0.0.1:5000/app:1', `ghcr.io/o/app@sha256:${HEX}`, `localhost:80/x/y:z@sha256:${HEX}`, 'r.io/app']) {
      expect(formatOciReference(parseOciReference(s))).toBe(s);
    }
  });

  it('asks the registry for the digest when pinned, the tag otherwise, latest by default', () => {
    expect(manifestReference(parseOciReference(`r.io/a:1@sha256:${HEX}`))).toBe(`sha256:${HEX}`);
    expect(manifestReference(parseOciReference('r.io/a:1'))).toBe('1');
    expect(manifestReference(parseOciReference('r.io/a'))).toBe('latest');
  });

  it('tells built-in names from registry references', () => {
    for (const s of ['tiny', 'base', 'ubuntu:22.04', 'library/ubuntu', '']) expect(isOciReference(s)).toBe(false);
    for (const s of ['127.0.0.1:5000/app', 'ghcr.io/a/b:1', 'localhost/app']) expect(isOciReference(s)).toBe(true);
  });

  it.each([
    ['tiny', /registry host is required/],
    ['ubuntu:22.04', /registry host is required/],
    ['r.io/App:1', /bad repository path component "App"/],
    ['r.io/app:-x', /bad tag/],
    ['r.io/app@sha256:abc', /digest must be sha256/],
    ['r.io/app@md5:' + HEX, /digest must be sha256/],
    ['r.io:99999/app', /bad port/],
    ['r.io/', /repository name is missing/],
    ['r.io/a//b', /bad repository path component ""/],
    ['r.io/../etc', /bad repository path component/],
  ])('rejects %s with a clear invalid-input error', (input, message) => {
    let err: unknown;
    try {
      parseOciReference(input);
    } catch (e) {
      err = e;
    }
    expect(err).toBeInstanceOf(DomainError);
    expect((err as DomainError).code).toBe('invalid-input');
    expect((err as DomainError).details).toEqual({ field: 'image' });
    expect((err as DomainError).message).toMatch(message);
  });
});
