/**
 * Image references of the form `host[:port]/path/name[:tag][@sha256:<hex>]`.
 *
 * Unlike Docker there is no default registry: a reference always names its registry host, so that
 * a bare word (`tiny`, `base`) can never be mistaken for an image on some public registry and the
 * node never talks to a registry nobody configured.
 */
import { DomainError } from '@devyard/core/domain-error';

/** A parsed image reference. */
export interface OciReference {
  /** Registry host, with the port when one was given (`127.0.0.1:5000`, `ghcr.io`). */
  registry: string;
  /** Repository path inside the registry (`team/app`). */
  repository: string;
  /** Tag, when given (`1.2`); a reference with neither tag nor digest means `latest`. */
  tag?: string;
  /** Manifest digest (`sha256:<64 hex>`), when the reference is pinned. */
  digest?: string;
}

// Grammar from the distribution spec (reference/regexp.go), anchored per component.
const PATH_COMPONENT = /^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*$/;
const TAG = /^[\w][\w.-]{0,127}$/;
const DIGEST = /^sha256:[a-f0-9]{64}$/;
const HOST = /^(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?(?:\.[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)*|\[[0-9a-fA-F:]+\])(?::[0-9]{1,5})?$/;
const MAX_NAME_LENGTH = 255;

/** Tag used when a reference names neither a tag nor a digest. */
export const DEFAULT_TAG = 'latest';

function invalid(input: string, why: string): DomainError {
  return new DomainError('invalid-input', `invalid image reference "${input}": ${why}`, { field: 'image' });
}

/**
 * Whether `s` is meant as a registry reference rather than a built-in image name: it has a `/` and
 * its first component is host-like (contains `.` or `:`, or is `localhost`). It may still fail
 * {@link parseOciReference}, which then says precisely why.
 */
export function isOciReference(s: string): boolean {
  const slash = s.indexOf('/');
  if (slash <= 0) return false;
  const first = s.slice(0, slash);
  return first.includes('.') || first.includes(':') || first === 'localhost';
}

/** Parses a reference; throws `DomainError('invalid-input', …, { field: 'image' })` when malformed. */
export function parseOciReference(input: string): OciReference {
  const s = input.trim();
  if (!s) throw invalid(input, 'empty');
  if (!isOciReference(s)) {
    throw invalid(input, 'a registry host is required, e.g. registry.example.com/team/app:1.0 (there is no default registry)');
  }
  let rest = s;
  let digest: string | undefined;
  const at = rest.indexOf('@');
  if (at >= 0) {
    digest = rest.slice(at + 1);
    rest = rest.slice(0, at);
    if (!DIGEST.test(digest)) throw invalid(input, `digest must be sha256:<64 lowercase hex>, got "${digest}"`);
  }
  const slash = rest.indexOf('/');
  const registry = rest.slice(0, slash);
  let path = rest.slice(slash + 1);
  if (!HOST.test(registry)) throw invalid(input, `bad registry host "${registry}"`);
  const port = registry.match(/:(\d+)$/)?.[1];
  if (port !== undefined && (Number(port) < 1 || Number(port) > 65535)) throw invalid(input, `bad port ${port}`);
  let tag: string | undefined;
  // A colon after the last slash separates the tag (the host's port colon is already split off).
  const colon = path.lastIndexOf(':');
  if (colon >= 0) {
    tag = path.slice(colon + 1);
    path = path.slice(0, colon);
    if (!TAG.test(tag)) throw invalid(input, `bad tag "${tag}" (letters, digits, _ . -; at most 128; not starting with . or -)`);
  }
  if (!path) throw invalid(input, 'repository name is missing');
  for (const component of path.split('/')) {
    if (!PATH_COMPONENT.test(component)) {
      throw invalid(input, `bad repository path component "${component}" (lowercase letters, digits and single separators . _ __ -)`);
    }
  }
  if (registry.length + 1 + path.length > MAX_NAME_LENGTH) throw invalid(input, `name longer than ${MAX_NAME_LENGTH} characters`);
  const ref: OciReference = { registry, repository: path };
  if (tag !== undefined) ref.tag = tag;
  if (digest !== undefined) ref.digest = digest;
  return ref;
}

/** Formats a reference back to its canonical string (`host/repo[:tag][@digest]`). */
export function formatOciReference(ref: OciReference): string {
  return `${ref.registry}/${ref.repository}${ref.tag !== undefined ? `:${ref.tag}` : ''}${ref.digest !== undefined ? `@${ref.digest}` : ''}`;
}

/** What to ask the registry's manifest endpoint for: the digest when pinned, else the tag. */
export function manifestReference(ref: OciReference): string {
  return ref.digest ?? ref.tag ?? DEFAULT_TAG;
}

/**
 * Registries on loopback (and the hosts named) are reached over plain HTTP, as Docker does for
 * localhost: they are local mirrors or test registries, everything else must speak TLS.
 */
export function isLoopbackRegistry(host: string, extra: readonly string[] = []): boolean {
  const name = host.replace(/:\d+$/, '');
  return extra.includes(host) || name === 'localhost' || name.startsWith('127.') || name === '[::1]';
}
