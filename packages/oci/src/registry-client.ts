/**
 * A pull-only client of the OCI distribution API v2 on Node's fetch.
 *
 * Manifests and configs are small and verified here against their digests; layer blobs are
 * streamed to the caller, who verifies them while writing (they can be gigabytes).
 */
import { createHash } from 'node:crypto';
import { Readable } from 'node:stream';
import { DomainError } from '@devyard/core/domain-error';
import { formatOciReference, manifestReference, type OciReference } from './oci-reference.js';

/** Media types this client understands. */
export const MEDIA_TYPES = {
  ociManifest: 'application/vnd.oci.image.manifest.v1+json',
  ociIndex: 'application/vnd.oci.image.index.v1+json',
  dockerManifest: 'application/vnd.docker.distribution.manifest.v2+json',
  dockerManifestList: 'application/vnd.docker.distribution.manifest.list.v2+json',
} as const;

const ACCEPT = [MEDIA_TYPES.ociManifest, MEDIA_TYPES.ociIndex, MEDIA_TYPES.dockerManifest, MEDIA_TYPES.dockerManifestList].join(', ');

/** Manifests bigger than this are refused: real ones are a few KB, and the body is buffered. */
const MAX_MANIFEST_BYTES = 4 * 1024 * 1024;

/** A content descriptor (OCI image spec). */
export interface OciDescriptor {
  /** Media type of the referenced content. */
  mediaType: string;
  /** Content digest (`sha256:…`). */
  digest: string;
  /** Size in bytes. */
  size: number;
  /** Platform, on entries of an index. */
  platform?: { architecture: string; os: string; variant?: string };
  /** Alternative download locations (foreign layers). */
  urls?: string[];
  /** Free-form annotations. */
  annotations?: Record<string, string>;
}

/** A single-platform image manifest. */
export interface OciManifest {
  /** Always 2. */
  schemaVersion: number;
  /** Manifest media type (OCI or Docker v2 schema 2). */
  mediaType?: string;
  /** The image config blob. */
  config: OciDescriptor;
  /** Filesystem layers, lowest first. */
  layers: OciDescriptor[];
}

/** The runtime part of an image config (what a box would inherit). */
export interface OciImageRuntimeConfig {
  /** User to run as (`uid[:gid]` or a name). */
  User?: string;
  /** Environment as `KEY=value`. */
  Env?: string[];
  /** Entrypoint argv. */
  Entrypoint?: string[] | null;
  /** Default command argv. */
  Cmd?: string[] | null;
  /** Working directory. */
  WorkingDir?: string;
  /** Labels. */
  Labels?: Record<string, string> | null;
}

/** An image config blob. */
export interface OciImageConfig {
  /** CPU architecture (`amd64`). */
  architecture: string;
  /** Operating system (`linux`). */
  os: string;
  /** Runtime defaults. */
  config?: OciImageRuntimeConfig;
  /** Uncompressed layer digests, in layer order. */
  rootfs: { type: string; diff_ids: string[] };
}

/** A resolved single-platform image. */
export interface ResolvedImage {
  /** The reference as asked for. */
  reference: OciReference;
  /** Digest of the platform manifest: the image's identity. */
  digest: string;
  /** Digest of the index the manifest was selected from, when the reference named one. */
  indexDigest?: string;
  /** The platform manifest. */
  manifest: OciManifest;
  /** The parsed config blob. */
  config: OciImageConfig;
}

/** A blob being downloaded. */
export interface BlobDownload {
  /** Size announced by the registry (Content-Length), when it gave one. */
  size?: number;
  /** The bytes, unverified: the caller checks them against the digest. */
  stream: Readable;
}

/** Credentials for one registry host. */
export interface RegistryCredentials {
  /** User name (for token services: often a fixed word like `oauth2accesstoken`). */
  username: string;
  /** Password or access token. */
  password: string;
}

/** Options of {@link RegistryClient}. */
export interface RegistryClientOptions {
  /** Credentials for a registry host (`host[:port]`); undefined means anonymous. */
  credentials?: (registry: string) => RegistryCredentials | undefined | Promise<RegistryCredentials | undefined>;
  /** Whether to talk plain `http://` to this host (e.g. a loopback test registry); https otherwise. */
  insecure?: (registry: string) => boolean;
  /** Time allowed for a response's headers, and for any pause while a body streams (default 30 s). */
  timeoutMs?: number;
  /** Platform picked from manifest lists and indexes (default linux/amd64). */
  platform?: { os: string; architecture: string; variant?: string };
  /** fetch implementation (default the global one); tests wrap it to count requests. */
  fetch?: typeof fetch;
}

/** Options of one request. */
export interface RequestOptions {
  /** Aborts the request (and a blob's stream) when signalled. */
  signal?: AbortSignal;
}

interface Challenge {
  scheme: string;
  params: Record<string, string>;
}

/**
 * Pulls manifests, configs and blobs. Auth per registry: anonymous, Basic, or Bearer tokens from
 * the realm named in the registry's `WWW-Authenticate` challenge; tokens are cached per scope.
 */
export class RegistryClient {
  private readonly timeoutMs: number;
  private readonly platform: { os: string; architecture: string; variant?: string };
  private readonly fetchFn: typeof fetch;
  /** Authorization header to send first, per `registry repository`, learnt from the last challenge. */
  private readonly authHeaders = new Map<string, { value: string; expiresAt: number }>();

  constructor(private readonly opts: RegistryClientOptions = {}) {
    this.timeoutMs = opts.timeoutMs ?? 30_000;
    this.platform = opts.platform ?? { os: 'linux', architecture: 'amd64' };
    this.fetchFn = opts.fetch ?? fetch;
  }

  /**
   * Resolves a reference to a single-platform manifest and its config, following a manifest
   * list / OCI index to the configured platform. Everything returned is digest-verified.
   */
  async resolve(ref: OciReference, options: RequestOptions = {}): Promise<ResolvedImage> {
    const name = formatOciReference(ref);
    const first = await this.getManifest(ref, manifestReference(ref), options);
    let manifestDoc = first;
    let indexDigest: string | undefined;
    if (isIndex(first.mediaType, first.body)) {
      indexDigest = first.digest;
      const entry = this.pickPlatform(name, first.body);
      manifestDoc = await this.getManifest(ref, entry.digest, options);
      if (isIndex(manifestDoc.mediaType, manifestDoc.body)) {
        throw new DomainError('invalid-input', `image ${name}: nested indexes are not supported`, { field: 'image' });
      }
    }
    const manifest = manifestDoc.body as Partial<OciManifest>;
    if (manifest.schemaVersion !== 2 || !manifest.config || !Array.isArray(manifest.layers)) {
      throw new DomainError('invalid-input', `image ${name}: unsupported manifest (${manifestDoc.mediaType || 'unknown type'}); only OCI and Docker schema 2 images are supported`, { field: 'image' });
    }
    const configBytes = await this.readSmallBlob(ref, manifest.config, options);
    let config: OciImageConfig;
    try {
      config = JSON.parse(configBytes.toString('utf8')) as OciImageConfig;
    } catch {
      throw new DomainError('invalid-input', `image ${name}: config blob is not JSON`, { field: 'image' });
    }
    if (config.os && config.os !== this.platform.os) {
      throw new DomainError('invalid-input', `image ${name} is for ${config.os}/${config.architecture}, not ${this.platform.os}/${this.platform.architecture}`, { field: 'image' });
    }
    const resolved: ResolvedImage = { reference: ref, digest: manifestDoc.digest, manifest: manifest as OciManifest, config };
    if (indexDigest !== undefined) resolved.indexDigest = indexDigest;
    return resolved;
  }

  /** Starts downloading a blob; the stream is not verified (the caller hashes it while writing). */
  async fetchBlob(ref: OciReference, digest: string, options: RequestOptions = {}): Promise<BlobDownload> {
    const res = await this.request(ref, `blobs/${digest}`, {}, options);
    if (res.response.status === 404) {
      await res.response.body?.cancel().catch(() => {});
      res.done();
      throw new DomainError('invalid-input', `image ${formatOciReference(ref)}: blob ${digest} not found in the registry`, { field: 'image', digest });
    }
    await this.expectOk(ref, res.response, `blob ${digest}`, res.done);
    const length = Number(res.response.headers.get('content-length'));
    const stream = Readable.from(this.bodyChunks(res.response, res.controller, res.done, `${formatOciReference(ref)} blob ${digest}`, options.signal), {
      objectMode: false,
    });
    const download: BlobDownload = { stream };
    if (Number.isFinite(length) && length >= 0 && res.response.headers.has('content-length')) download.size = length;
    return download;
  }

  private pickPlatform(name: string, index: unknown): OciDescriptor {
    const manifests = (index as { manifests?: OciDescriptor[] }).manifests ?? [];
    const want = this.platform;
    const candidates = manifests.filter((m) => m.platform?.os === want.os && m.platform.architecture === want.architecture);
    const exact = candidates.find((m) => want.variant === undefined || m.platform?.variant === want.variant);
    const entry = exact ?? candidates[0];
    if (!entry) {
      const have = manifests.map((m) => (m.platform ? `${m.platform.os}/${m.platform.architecture}` : 'unknown')).join(', ');
      throw new DomainError('invalid-input', `image ${name} has no ${want.os}/${want.architecture} variant (has: ${have || 'none'})`, { field: 'image' });
    }
    return entry;
  }

  private async getManifest(ref: OciReference, reference: string, options: RequestOptions): Promise<{ digest: string; mediaType: string; body: unknown }> {
    const name = formatOciReference(ref);
    const res = await this.request(ref, `manifests/${reference}`, { accept: ACCEPT }, options);
    if (res.response.status === 404) {
      const detail = await registryErrorText(res.response);
      res.done();
      throw new DomainError('invalid-input', `image ${name} not found in ${ref.registry}${detail ? ` (${detail})` : ''}`, { field: 'image' });
    }
    await this.expectOk(ref, res.response, 'manifest', res.done);
    const bytes = await this.readLimited(res, MAX_MANIFEST_BYTES, `${name} manifest`, options.signal);
    const digest = sha256(bytes);
    // A pinned reference is only as good as this check: the registry is not trusted.
    if (reference.startsWith('sha256:') && digest !== reference) {
      throw new DomainError('invalid-input', `image ${name}: manifest digest mismatch (expected ${reference}, got ${digest})`, { field: 'image' });
    }
    let body: unknown;
    try {
      body = JSON.parse(bytes.toString('utf8'));
    } catch {
      throw new DomainError('invalid-input', `image ${name}: manifest is not JSON`, { field: 'image' });
    }
    const mediaType = ((body as { mediaType?: string }).mediaType ?? res.response.headers.get('content-type') ?? '').split(';')[0]!.trim();
    return { digest, mediaType, body };
  }

  private async readSmallBlob(ref: OciReference, desc: OciDescriptor, options: RequestOptions): Promise<Buffer> {
    const name = formatOciReference(ref);
    if (desc.size > MAX_MANIFEST_BYTES) throw new DomainError('invalid-input', `image ${name}: config blob too large (${desc.size} bytes)`, { field: 'image' });
    const download = await this.fetchBlob(ref, desc.digest, options);
    const chunks: Buffer[] = [];
    let total = 0;
    for await (const chunk of download.stream) {
      total += (chunk as Buffer).length;
      if (total > MAX_MANIFEST_BYTES) {
        download.stream.destroy();
        throw new DomainError('invalid-input', `image ${name}: config blob larger than announced`, { field: 'image' });
      }
      chunks.push(chunk as Buffer);
    }
    const bytes = Buffer.concat(chunks);
    const digest = sha256(bytes);
    if (digest !== desc.digest) {
      throw new DomainError('invalid-input', `image ${name}: config digest mismatch (expected ${desc.digest}, got ${digest})`, { field: 'image' });
    }
    return bytes;
  }

  private baseUrl(registry: string): string {
    // Docker Hub's API lives on a different host than its reference name.
    const host = registry === 'docker.io' ? 'registry-1.docker.io' : registry;
    return `${this.opts.insecure?.(registry) ? 'http' : 'https'}://${host}/v2/`;
  }

  /**
   * Sends a GET, answering at most one auth challenge. The returned `done` clears the timers; the
   * caller calls it once the body is consumed.
   */
  private async request(
    ref: OciReference,
    path: string,
    headers: Record<string, string>,
    options: RequestOptions,
  ): Promise<{ response: Response; controller: AbortController; done: () => void }> {
    const url = `${this.baseUrl(ref.registry)}${ref.repository}/${path}`;
    const key = `${ref.registry} ${ref.repository}`;
    const cached = this.authHeaders.get(key);
    const auth = cached && cached.expiresAt > Date.now() ? cached.value : undefined;
    let res = await this.send(ref.registry, url, auth ? { ...headers, authorization: auth } : headers, options);
    if (res.response.status !== 401) return res;
    const challenges = parseWwwAuthenticate(res.response.headers.get('www-authenticate') ?? '');
    await res.response.body?.cancel().catch(() => {});
    res.done();
    const fresh = await this.authorize(ref, challenges, options);
    res = await this.send(ref.registry, url, { ...headers, authorization: fresh.value }, options);
    if (res.response.status === 401) {
      await res.response.body?.cancel().catch(() => {});
      res.done();
      this.authHeaders.delete(key);
      throw new DomainError('forbidden', `registry ${ref.registry} rejected the credentials for ${ref.repository}`, { field: 'image', registry: ref.registry });
    }
    this.authHeaders.set(key, fresh);
    return res;
  }

  private async authorize(ref: OciReference, challenges: Challenge[], options: RequestOptions): Promise<{ value: string; expiresAt: number }> {
    const creds = await this.opts.credentials?.(ref.registry);
    const bearer = challenges.find((c) => c.scheme === 'bearer');
    if (bearer) {
      const realm = bearer.params.realm;
      if (!realm) throw new DomainError('unavailable', `registry ${ref.registry} sent a Bearer challenge without a realm`, { registry: ref.registry });
      const tokenUrl = new URL(realm);
      if (bearer.params.service) tokenUrl.searchParams.set('service', bearer.params.service);
      // The challenge's scope is for the request that failed; ask for pull on this repository anyway
      // so one token serves manifests and blobs alike.
      tokenUrl.searchParams.set('scope', bearer.params.scope ?? `repository:${ref.repository}:pull`);
      const headers: Record<string, string> = {};
      if (creds) headers.authorization = basic(creds);
      const res = await this.send(ref.registry, tokenUrl.toString(), headers, options);
      try {
        if (res.response.status === 401 || res.response.status === 403) {
          throw new DomainError('forbidden', `registry ${ref.registry}: token service refused ${creds ? 'the credentials' : 'anonymous access'} for ${ref.repository}`, { field: 'image', registry: ref.registry });
        }
        if (!res.response.ok) {
          throw new DomainError('unavailable', `registry ${ref.registry}: token service answered HTTP ${res.response.status}`, { registry: ref.registry });
        }
        const body = (await res.response.json()) as { token?: string; access_token?: string; expires_in?: number };
        const token = body.token ?? body.access_token;
        if (!token) throw new DomainError('unavailable', `registry ${ref.registry}: token service returned no token`, { registry: ref.registry });
        // Renew a little early; the spec's default lifetime is 60 s.
        const lifetimeS = Math.max(10, (body.expires_in ?? 60) - 5);
        return { value: `Bearer ${token}`, expiresAt: Date.now() + lifetimeS * 1000 };
      } catch (err) {
        if (err instanceof DomainError) throw err;
        throw this.transportError(ref.registry, tokenUrl.toString(), err);
      } finally {
        res.done();
      }
    }
    if (challenges.some((c) => c.scheme === 'basic')) {
      if (!creds) throw new DomainError('forbidden', `registry ${ref.registry} requires credentials for ${ref.repository}`, { field: 'image', registry: ref.registry });
      return { value: basic(creds), expiresAt: Number.POSITIVE_INFINITY };
    }
    throw new DomainError('unavailable', `registry ${ref.registry} asked for an unsupported authentication scheme`, { registry: ref.registry });
  }

  private async send(
    registry: string,
    url: string,
    headers: Record<string, string>,
    options: RequestOptions,
  ): Promise<{ response: Response; controller: AbortController; done: () => void }> {
    const controller = new AbortController();
    const onAbort = () => controller.abort(options.signal?.reason);
    options.signal?.addEventListener('abort', onAbort, { once: true });
    if (options.signal?.aborted) controller.abort(options.signal.reason);
    const timer = setTimeout(() => controller.abort(new TimeoutMarker()), this.timeoutMs);
    const done = () => {
      clearTimeout(timer);
      options.signal?.removeEventListener('abort', onAbort);
    };
    try {
      const response = await this.fetchFn(url, { headers, signal: controller.signal, redirect: 'follow' });
      clearTimeout(timer);
      return { response, controller, done };
    } catch (err) {
      done();
      if (controller.signal.reason instanceof TimeoutMarker) {
        throw new DomainError('unavailable', `registry ${registry} did not answer within ${this.timeoutMs} ms (GET ${url})`, { registry });
      }
      throw this.transportError(registry, url, err);
    }
  }

  private transportError(registry: string, url: string, err: unknown): Error {
    if (err instanceof DomainError) return err;
    if ((err as Error).name === 'AbortError') return err as Error;
    const cause = (err as { cause?: { code?: string; message?: string } }).cause;
    return new DomainError('unavailable', `cannot reach registry ${registry} (GET ${url}): ${cause?.code ?? cause?.message ?? (err as Error).message}`, { registry });
  }

  private async expectOk(ref: OciReference, res: Response, what: string, done: () => void): Promise<void> {
    if (res.ok) return;
    const detail = await registryErrorText(res);
    done();
    const name = formatOciReference(ref);
    if (res.status === 403) throw new DomainError('forbidden', `registry ${ref.registry} denied access to ${name}${detail ? ` (${detail})` : ''}`, { field: 'image', registry: ref.registry });
    if (res.status === 429 || res.status >= 500) throw new DomainError('unavailable', `registry ${ref.registry} answered HTTP ${res.status} for ${what} of ${name}${detail ? ` (${detail})` : ''}`, { registry: ref.registry });
    throw new DomainError('invalid-input', `registry ${ref.registry} answered HTTP ${res.status} for ${what} of ${name}${detail ? ` (${detail})` : ''}`, { field: 'image' });
  }

  /** Body chunks with a stall timeout: a registry that stops sending mid-blob fails, not hangs. */
  private async *bodyChunks(res: Response, controller: AbortController, done: () => void, what: string, signal?: AbortSignal): AsyncGenerator<Buffer> {
    if (!res.body) {
      done();
      return;
    }
    const reader = res.body.getReader();
    try {
      for (;;) {
        const timer = setTimeout(() => controller.abort(new TimeoutMarker()), this.timeoutMs);
        let chunk: ReadableStreamReadResult<Uint8Array>;
        try {
          chunk = await reader.read();
        } catch (err) {
          if (controller.signal.reason instanceof TimeoutMarker) {
            throw new DomainError('unavailable', `download of ${what} stalled for ${this.timeoutMs} ms`, {});
          }
          if (signal?.aborted) throw err;
          throw new DomainError('unavailable', `download of ${what} failed: ${(err as Error).message}`, {});
        } finally {
          clearTimeout(timer);
        }
        if (chunk.done) return;
        yield Buffer.from(chunk.value.buffer, chunk.value.byteOffset, chunk.value.byteLength);
      }
    } finally {
      done();
      // Releases the connection when the consumer stops early (an error, a destroyed stream).
      reader.cancel().catch(() => {});
    }
  }

  private async readLimited(
    res: { response: Response; controller: AbortController; done: () => void },
    limit: number,
    what: string,
    signal?: AbortSignal,
  ): Promise<Buffer> {
    const chunks: Buffer[] = [];
    let total = 0;
    for await (const chunk of this.bodyChunks(res.response, res.controller, res.done, what, signal)) {
      total += chunk.length;
      if (total > limit) throw new DomainError('invalid-input', `${what} is larger than ${limit} bytes`, { field: 'image' });
      chunks.push(chunk);
    }
    return Buffer.concat(chunks);
  }
}

/** Abort reason telling our own timeouts from the caller's aborts. */
class TimeoutMarker extends Error {
  constructor() {
    super('timeout');
  }
}

function sha256(bytes: Buffer): string {
  return `sha256:${createHash('sha256').update(bytes).digest('hex')}`;
}

function basic(creds: RegistryCredentials): string {
  return `Basic ${Buffer.from(`${creds.username}:${creds.password}`).toString('base64')}`;
}

function isIndex(mediaType: string, body: unknown): boolean {
  if (mediaType === MEDIA_TYPES.ociIndex || mediaType === MEDIA_TYPES.dockerManifestList) return true;
  // An OCI index may omit mediaType; its `manifests` array gives it away.
  return !mediaType && Array.isArray((body as { manifests?: unknown }).manifests);
}

/** Parses `WWW-Authenticate` into challenges (`Bearer realm="…",service="…",scope="…"`). */
export function parseWwwAuthenticate(header: string): Challenge[] {
  const out: Challenge[] = [];
  // scheme, then comma-separated key=value or key="quoted, value" pairs, then maybe the next scheme.
  const re = /\s*([A-Za-z][\w-]*)(?:\s+|$)|\s*([\w-]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^,\s]*))\s*,?/y;
  let current: Challenge | undefined;
  let pos = 0;
  while (pos < header.length) {
    re.lastIndex = pos;
    const m = re.exec(header);
    if (!m || re.lastIndex === pos) break;
    pos = re.lastIndex;
    if (m[1] !== undefined) {
      current = { scheme: m[1].toLowerCase(), params: {} };
      out.push(current);
    } else if (current && m[2] !== undefined) {
      current.params[m[2].toLowerCase()] = m[3] !== undefined ? m[3].replace(/\\(.)/g, '$1') : (m[4] ?? '');
    }
  }
  return out;
}

async function registryErrorText(res: Response): Promise<string> {
  try {
    const text = await res.text();
    const body = JSON.parse(text) as { errors?: Array<{ code?: string; message?: string }> };
    return (body.errors ?? []).map((e) => [e.code, e.message].filter(Boolean).join(': ')).join('; ');
  } catch {
    return '';
  }
}
