/**
 * Images pulled from OCI registries, cached on the node under `<dataDir>/oci/`:
 *   blobs/sha256/<hex>     layer blobs, content-addressed; a file appears (by rename) only once its
 *                          bytes matched the digest, so a partial or corrupt download is never used
 *   rootfs/<hex>/          one shared read-only root per platform-manifest digest, all layers applied
 *   images/<hex>.json      what gc needs: layer digests, size on disk, last use, runtime config
 *   refs/<sha256(name)>.json  reference → digest of the last pull, for list() and offline restarts
 *   tmp/                   downloads and unpacks in progress; renamed into place only when complete
 *
 * Everything is written as temp-then-rename, so two agents (or a crashed one) sharing the directory
 * never see half an object; the worst case is duplicated work. Ownership is shifted by `idShift`
 * exactly like the built-in images, because box root is host uid `idShift` in the box's user
 * namespace (see DEFAULT_ID_RANGE in the sandbox driver).
 *
 * Decompression is bounded: each layer by a multiple of its compressed size (with a floor), the
 * image by `maxUnpackedBytes`, counted on the decompressed stream, so a small download of zeros
 * cannot fill the node's disk; a refused image leaves nothing but its harmless blobs for gc.
 */
import { createHash, randomBytes } from 'node:crypto';
import { createReadStream, createWriteStream } from 'node:fs';
import {
  chmod,
  lchown,
  link,
  lstat,
  lutimes,
  mkdir,
  open,
  readdir,
  readFile,
  readlink,
  rename,
  rm,
  symlink,
  utimes,
  writeFile,
} from 'node:fs/promises';
import { join } from 'node:path';
import { Transform, type Readable } from 'node:stream';
import { finished, pipeline } from 'node:stream/promises';
import { createGunzip } from 'node:zlib';
import { Decompress as ZstdDecompress } from 'fzstd';
import { extract, type Headers } from 'tar-stream';
import { DomainError } from '@devyard/core/domain-error';
import { formatOciReference, parseOciReference, type OciReference } from '@devyard/oci/oci-reference';
import type { OciDescriptor, OciImageRuntimeConfig, RegistryClient, ResolvedImage } from '@devyard/oci/registry-client';

/** An OCI image ready to use. */
export interface OciImage {
  /** The reference as asked for, in canonical form. */
  name: string;
  /** Platform manifest digest (`sha256:…`): the image's identity and cache key. */
  digest: string;
  /** Root filesystem directory (read-only use, shared by every box of this image). */
  rootfs: string;
  /** The image's runtime defaults (Env, Cmd, WorkingDir, User). */
  config: OciImageRuntimeConfig;
}

/** Options of {@link OciImageStore}. */
export interface OciImageStoreOptions {
  /** Node data directory; the cache lives under `<dataDir>/oci`. */
  dataDir: string;
  /** Client that talks to the registries. */
  registry: RegistryClient;
  /** Offset added to every uid/gid: host id of box root (100000 with the default sandbox range). */
  idShift: number;
  /** Ids the box namespace maps (default 65536); larger image ids become nobody (65534). */
  idRangeSize?: number;
  /** Bytes the cache may use; `gc()` (run after each fresh pull too) evicts down to it. */
  diskBudgetBytes?: number;
  /**
   * Most bytes the layers of one image may decompress to, all layers together (default 20 GiB): a
   * bigger image is refused before it fills the node's disk.
   */
  maxUnpackedBytes?: number;
  /**
   * A layer may decompress to at most this many times its compressed size, or
   * {@link LAYER_EXPANSION_FLOOR_BYTES}, whichever is more (default 100): real layers compress a few
   * times, a decompression bomb (a small download of zeros) thousands of times.
   */
  maxLayerExpansion?: number;
  /** Digests of images boxes currently use: gc never removes these. */
  inUse?: () => Set<string> | Promise<Set<string>>;
  /** Structured log sink. */
  log?: (msg: string, fields?: object) => void;
}

/** What a `gc()` run did. */
export interface OciGcResult {
  /** Digests of the images whose root filesystems were removed. */
  removedImages: string[];
  /** Number of blobs removed. */
  removedBlobs: number;
  /** Bytes freed. */
  freedBytes: number;
  /** Bytes the cache still uses. */
  usedBytes: number;
}

interface ImageMeta {
  digest: string;
  names: string[];
  layers: string[];
  config: OciImageRuntimeConfig;
  sizeBytes: number;
  createdAt: string;
  lastUsedAt: string;
}

const DIGEST = /^sha256:[a-f0-9]{64}$/;
const OVERFLOW_ID = 65_534;
/** Temp entries older than this are leftovers of a crashed process; gc removes them. */
const STALE_TMP_MS = 6 * 3600_000;
const PROGRESS_INTERVAL_MS = 500;
const DEFAULT_MAX_UNPACKED_BYTES = 20 * 1024 ** 3;
const DEFAULT_MAX_LAYER_EXPANSION = 100;
/** Every layer may decompress to this much, whatever its compressed size (small layers of text compress well). */
export const LAYER_EXPANSION_FLOOR_BYTES = 256 * 1024 ** 2;

const hexOf = (digest: string) => digest.slice('sha256:'.length);
const mb = (n: number) => (n / 1e6).toFixed(1);

/** Pulls, unpacks, caches and garbage-collects OCI images. */
export class OciImageStore {
  private readonly root: string;
  private readonly rangeSize: number;
  private readonly log: (msg: string, fields?: object) => void;
  /** Pulls in flight per reference, so concurrent ensures of one reference share one pull. */
  private readonly ensuring = new Map<string, Promise<OciImage>>();
  /** Builds in flight per digest (two tags of one image share a build); gc leaves them alone. */
  private readonly building = new Map<string, { layers: string[]; done: Promise<ImageMeta> }>();
  private gcRunning: Promise<OciGcResult> | undefined;

  constructor(private readonly opts: OciImageStoreOptions) {
    this.root = join(opts.dataDir, 'oci');
    this.rangeSize = opts.idRangeSize ?? 65_536;
    this.log = opts.log ?? (() => {});
  }

  /**
   * Returns the image, pulling and unpacking it first when it is not cached. A tag is re-resolved
   * each time (tags move); when the registry is unreachable the last pulled digest is used.
   */
  ensure(reference: string, onProgress?: (line: string) => void): Promise<OciImage> {
    let ref: OciReference;
    try {
      ref = parseOciReference(reference);
    } catch (err) {
      return Promise.reject(err);
    }
    const name = formatOciReference(ref);
    const inflight = this.ensuring.get(name);
    if (inflight) return inflight;
    const p = this.ensureUncached(ref, name, onProgress ?? (() => {})).finally(() => this.ensuring.delete(name));
    this.ensuring.set(name, p);
    return p;
  }

  /** References pulled onto this node whose root filesystems are present. */
  async list(): Promise<Array<{ name: string; digest: string }>> {
    const out: Array<{ name: string; digest: string }> = [];
    for (const file of await readdirOrEmpty(join(this.root, 'refs'))) {
      if (!file.endsWith('.json')) continue;
      const ref = await readJson<{ name: string; digest: string }>(join(this.root, 'refs', file));
      if (ref && (await exists(this.rootfsOf(ref.digest)))) out.push({ name: ref.name, digest: ref.digest });
    }
    return out.sort((a, b) => a.name.localeCompare(b.name));
  }

  /**
   * Removes blobs no image references and stale temp files, then, while the cache is over
   * `diskBudgetBytes`, the least recently used images (never one in use or being pulled).
   */
  gc(): Promise<OciGcResult> {
    // Two sweeps at once would double-count what they free.
    this.gcRunning ??= this.gcOnce().finally(() => (this.gcRunning = undefined));
    return this.gcRunning;
  }

  private rootfsOf(digest: string): string {
    return join(this.root, 'rootfs', hexOf(digest));
  }

  private metaPath(digest: string): string {
    return join(this.root, 'images', `${hexOf(digest)}.json`);
  }

  private refPath(name: string): string {
    return join(this.root, 'refs', `${createHash('sha256').update(name).digest('hex')}.json`);
  }

  private async ensureUncached(ref: OciReference, name: string, progress: (line: string) => void): Promise<OciImage> {
    for (const d of ['blobs/sha256', 'rootfs', 'images', 'refs', 'tmp']) await mkdir(join(this.root, d), { recursive: true });
    const known = await readJson<{ name: string; digest: string }>(this.refPath(name));
    // A digest-pinned reference never changes meaning: no need to ask the registry again.
    if (ref.digest && known) {
      const hit = await this.useCached(known.digest, name);
      if (hit) return hit;
    }
    let resolved: ResolvedImage;
    try {
      resolved = await this.opts.registry.resolve(ref);
    } catch (err) {
      if (err instanceof DomainError && err.code === 'unavailable' && known) {
        const hit = await this.useCached(known.digest, name);
        if (hit) {
          progress(`pull ${name}: registry unreachable, using cached ${known.digest}`);
          this.log('oci: registry unreachable, using cached image', { name, digest: known.digest, error: err.message });
          return hit;
        }
      }
      throw err;
    }
    const digest = resolved.digest;
    let hit = await this.useCached(digest, name);
    if (!hit) {
      let build = this.building.get(digest);
      if (!build) {
        const layers = resolved.manifest.layers.map((l) => l.digest);
        build = { layers, done: this.pullAndUnpack(ref, name, resolved, progress) };
        this.building.set(digest, build);
        try {
          await build.done;
          if (this.opts.diskBudgetBytes !== undefined) {
            // Still registered as building, so the image just pulled is safe from this sweep.
            await this.gc().catch((err: Error) => this.log('oci: gc failed', { error: err.message }));
          }
        } finally {
          this.building.delete(digest);
        }
      } else {
        await build.done;
      }
      hit = await this.useCached(digest, name);
      if (!hit) throw new DomainError('internal', `image ${name}: ${digest} vanished right after it was unpacked`, { digest });
    }
    return hit;
  }

  /** The cached image, with its last use and reference record refreshed; undefined when absent. */
  private async useCached(digest: string, name: string): Promise<OciImage | undefined> {
    if (!DIGEST.test(digest)) return undefined;
    const rootfs = this.rootfsOf(digest);
    const meta = await readJson<ImageMeta>(this.metaPath(digest));
    if (!meta || !(await exists(rootfs))) return undefined;
    meta.lastUsedAt = new Date().toISOString();
    if (!meta.names.includes(name)) meta.names.push(name);
    await this.writeJson(this.metaPath(digest), meta);
    await this.writeJson(this.refPath(name), { name, digest });
    return { name, digest, rootfs, config: meta.config };
  }

  private async writeJson(path: string, value: unknown): Promise<void> {
    const tmp = `${path}.${randomBytes(4).toString('hex')}.tmp`;
    await writeFile(tmp, JSON.stringify(value));
    await rename(tmp, path);
  }

  private async pullAndUnpack(ref: OciReference, name: string, resolved: ResolvedImage, progress: (line: string) => void): Promise<ImageMeta> {
    const t0 = Date.now();
    const { manifest, config } = resolved;
    const layers = manifest.layers;
    const diffIds = config.rootfs?.diff_ids ?? [];
    if (diffIds.length !== layers.length) {
      throw new DomainError('invalid-input', `image ${name}: config lists ${diffIds.length} layer diff ids for ${layers.length} layers`, { field: 'image' });
    }
    for (const [i, layer] of layers.entries()) {
      // Digests become file names: anything but sha256 hex could walk out of the cache.
      if (!DIGEST.test(layer.digest) || !DIGEST.test(diffIds[i] ?? '')) {
        throw new DomainError('invalid-input', `image ${name}: layer ${i + 1} has an unsupported digest ${layer.digest}`, { field: 'image' });
      }
      if (layer.mediaType.endsWith('+encrypted')) {
        throw new DomainError('invalid-input', `image ${name}: encrypted layers are not supported`, { field: 'image' });
      }
    }
    for (const [i, layer] of layers.entries()) await this.fetchLayer(ref, name, layer, i + 1, layers.length, progress);

    const tmpRoot = join(this.root, 'tmp', `rootfs-${hexOf(resolved.digest)}-${randomBytes(6).toString('hex')}`);
    try {
      await mkdir(tmpRoot, { mode: 0o755 });
      await lchown(tmpRoot, this.opts.idShift, this.opts.idShift);
      const ctx: UnpackContext = { root: tmpRoot, name, dirTimes: new Map(), skipped: 0, remappedIds: 0, layerPaths: new Set(), layer: 0, unpackedBytes: 0 };
      for (const [i, layer] of layers.entries()) {
        progress(`unpack ${name}: layer ${i + 1}/${layers.length}`);
        ctx.layer = i + 1;
        ctx.layerPaths = new Set();
        const blob = join(this.root, 'blobs', 'sha256', hexOf(layer.digest));
        try {
          await this.applyLayer(ctx, blob, diffIds[i]!, layer.size);
        } catch (err) {
          // A refused bomb is not kept for the next pull to unpack again.
          if (err instanceof DomainError && err.details.reason === 'decompression-bomb') await rm(blob, { force: true });
          throw err;
        }
      }
      // Directory times last: creating children bumps the parent's mtime.
      const dirs = [...ctx.dirTimes].sort((a, b) => b[0].length - a[0].length);
      for (const [dir, mtime] of dirs) await utimes(dir, mtime, mtime).catch(() => {});
      const meta: ImageMeta = {
        digest: resolved.digest,
        names: [name],
        layers: layers.map((l) => l.digest),
        config: config.config ?? {},
        sizeBytes: await diskUsage(tmpRoot),
        createdAt: new Date().toISOString(),
        lastUsedAt: new Date().toISOString(),
      };
      // Meta before rootfs: an existing rootfs always has its meta, so gc can account for it.
      await this.writeJson(this.metaPath(resolved.digest), meta);
      try {
        await rename(tmpRoot, this.rootfsOf(resolved.digest));
      } catch (err) {
        const code = (err as NodeJS.ErrnoException).code;
        // Another process finished the same image first; its tree is identical.
        if (code !== 'ENOTEMPTY' && code !== 'EEXIST') throw err;
        await rm(tmpRoot, { recursive: true, force: true });
      }
      if (ctx.skipped > 0) progress(`unpack ${name}: skipped ${ctx.skipped} device nodes/fifos (boxes cannot create them)`);
      this.log('oci: image ready', { name, digest: resolved.digest, layers: layers.length, bytes: meta.sizeBytes, skipped: ctx.skipped, remappedIds: ctx.remappedIds, ms: Date.now() - t0 });
      progress(`pulled ${name} ${resolved.digest}`);
      return meta;
    } catch (err) {
      await rm(tmpRoot, { recursive: true, force: true });
      throw err;
    }
  }

  private async fetchLayer(ref: OciReference, name: string, layer: OciDescriptor, index: number, count: number, progress: (line: string) => void): Promise<void> {
    const final = join(this.root, 'blobs', 'sha256', hexOf(layer.digest));
    if (await exists(final)) {
      progress(`pull ${name}: layer ${index}/${count} cached`);
      return;
    }
    const tmp = join(this.root, 'tmp', `blob-${hexOf(layer.digest)}-${randomBytes(6).toString('hex')}`);
    const hash = createHash('sha256');
    let received = 0;
    let lastReport = 0;
    const report = () => progress(`pull ${name}: layer ${index}/${count} ${mb(received)}/${mb(layer.size)} MB`);
    try {
      const download = await this.opts.registry.fetchBlob(ref, layer.digest);
      const meter = new Transform({
        transform(chunk: Buffer, _enc, cb) {
          received += chunk.length;
          // Stop a registry that sends more than the manifest promised instead of filling the disk.
          if (received > layer.size) {
            cb(new DomainError('invalid-input', `image ${name}: layer ${index}/${count} is larger than its manifest size ${layer.size}; the download was discarded`, { field: 'image', digest: layer.digest }));
            return;
          }
          hash.update(chunk);
          const now = Date.now();
          if (now - lastReport >= PROGRESS_INTERVAL_MS && received < layer.size) {
            lastReport = now;
            report();
          }
          cb(null, chunk);
        },
      });
      await pipeline(download.stream, meter, createWriteStream(tmp, { flags: 'wx', mode: 0o600 }));
      report();
      const actual = `sha256:${hash.digest('hex')}`;
      if (actual !== layer.digest || received !== layer.size) {
        throw new DomainError(
          'invalid-input',
          `image ${name}: layer ${index}/${count} digest mismatch (expected ${layer.digest} of ${layer.size} bytes, got ${actual} of ${received}); the download was discarded`,
          { field: 'image', expected: layer.digest, actual },
        );
      }
      // Durable before visible: after a power loss a renamed but unflushed blob could read as zeros.
      const fh = await open(tmp, 'r');
      try {
        await fh.sync();
      } finally {
        await fh.close();
      }
      await rename(tmp, final);
    } catch (err) {
      await rm(tmp, { force: true });
      throw err;
    }
  }

  private async applyLayer(ctx: UnpackContext, blobPath: string, diffId: string, compressedBytes: number): Promise<void> {
    const decompress = await decompressorFor(blobPath);
    const diffHash = createHash('sha256');
    const imageLimit = this.opts.maxUnpackedBytes ?? DEFAULT_MAX_UNPACKED_BYTES;
    const layerLimit = Math.max(compressedBytes * (this.opts.maxLayerExpansion ?? DEFAULT_MAX_LAYER_EXPANSION), LAYER_EXPANSION_FLOOR_BYTES);
    let layerBytes = 0;
    const tee = new Transform({
      transform(chunk: Buffer, _enc, cb) {
        layerBytes += chunk.length;
        ctx.unpackedBytes += chunk.length;
        // Counted on the decompressed stream, before the tar parser writes anything of the chunk.
        if (layerBytes > layerLimit || ctx.unpackedBytes > imageLimit) {
          const what =
            layerBytes > layerLimit
              ? `layer ${ctx.layer} decompresses to more than ${layerLimit} bytes (${compressedBytes} compressed)`
              : `its layers decompress to more than the image size limit of ${imageLimit} bytes (at layer ${ctx.layer})`;
          cb(new DomainError('invalid-input', `image ${ctx.name}: ${what}; refused as a decompression bomb, nothing of it was kept`, { field: 'image', reason: 'decompression-bomb', limit: layerBytes > layerLimit ? layerLimit : imageLimit }));
          return;
        }
        diffHash.update(chunk);
        cb(null, chunk);
      },
    });
    const ex = extract();
    ex.on('entry', (header, stream, next) => {
      this.applyEntry(ctx, header, stream).then(
        () => next(),
        (err: unknown) => {
          stream.resume();
          ex.destroy(err as Error);
        },
      );
    });
    const source = createReadStream(blobPath);
    try {
      if (decompress) await pipeline(source, decompress, tee, ex);
      else await pipeline(source, tee, ex);
    } catch (err) {
      if (err instanceof DomainError) throw err;
      throw new DomainError('invalid-input', `image ${ctx.name}: layer ${ctx.layer} is not a valid (compressed) tar: ${(err as Error).message}`, { field: 'image' });
    }
    const actual = `sha256:${diffHash.digest('hex')}`;
    if (actual !== diffId) {
      throw new DomainError('invalid-input', `image ${ctx.name}: layer ${ctx.layer} content does not match the config's diff id (expected ${diffId}, got ${actual})`, { field: 'image' });
    }
  }

  private async applyEntry(ctx: UnpackContext, header: Headers, stream: Readable): Promise<void> {
    const type = header.type ?? 'file';
    const isFile = type === 'file' || type === 'contiguous-file';
    if (!isFile) await drain(stream);
    const parts = entryParts(ctx, header.name);
    if (parts.length === 0) {
      // `./` itself: only its metadata can apply, to the root directory.
      if (type === 'directory') await this.setMeta(ctx, ctx.root, header, true);
      else if (isFile) await drain(stream);
      return;
    }
    const base = parts[parts.length - 1]!;
    if (base === '.wh..wh..opq') {
      // Opaque: hide what lower layers put in this directory, not what this layer already added.
      const dir = await this.resolveParent(ctx, parts.slice(0, -1), false);
      if (dir) {
        for (const child of await readdirOrEmpty(dir)) {
          const victim = join(dir, child);
          if (!ctx.layerPaths.has(victim)) await rm(victim, { recursive: true, force: true });
        }
      }
      if (isFile) await drain(stream);
      return;
    }
    if (base.startsWith('.wh.')) {
      const hidden = base.slice('.wh.'.length);
      if (!hidden || hidden === '.' || hidden === '..') throw escapeError(ctx, header.name);
      const dir = await this.resolveParent(ctx, parts.slice(0, -1), false);
      if (dir && !ctx.layerPaths.has(join(dir, hidden))) await rm(join(dir, hidden), { recursive: true, force: true });
      if (isFile) await drain(stream);
      return;
    }
    const parent = (await this.resolveParent(ctx, parts.slice(0, -1), true))!;
    const target = join(parent, base);
    ctx.layerPaths.add(target);
    const existing = await lstat(target).catch(() => undefined);
    if (type === 'directory') {
      if (existing && !existing.isDirectory()) await rm(target, { recursive: true, force: true });
      if (!existing || !existing.isDirectory()) await mkdir(target, { mode: 0o700 });
      await this.setMeta(ctx, target, header, true);
      return;
    }
    if (existing) await rm(target, { recursive: true, force: true });
    switch (type) {
      case 'file':
      case 'contiguous-file':
        // 0600 until setMeta: nobody sees the file with its final mode before its final owner.
        await pipeline(stream, createWriteStream(target, { flags: 'wx', mode: 0o600 }));
        await this.setMeta(ctx, target, header, false);
        return;
      case 'symlink':
        // Stored verbatim: it is only ever followed inside the box's root (resolveParent
        // re-interprets it relative to the image root when unpacking).
        await symlink(header.linkname ?? '', target);
        await lchown(target, this.mapId(ctx, header.uid), this.mapId(ctx, header.gid));
        if (header.mtime) await lutimes(target, header.mtime, header.mtime);
        return;
      case 'link': {
        const linkParts = entryParts(ctx, header.linkname ?? '');
        if (linkParts.length === 0) throw escapeError(ctx, header.linkname ?? '');
        const linkParent = await this.resolveParent(ctx, linkParts.slice(0, -1), false);
        const source = linkParent && join(linkParent, linkParts[linkParts.length - 1]!);
        const st = source ? await lstat(source).catch(() => undefined) : undefined;
        if (!source || !st || st.isDirectory()) {
          throw new DomainError('invalid-input', `image ${ctx.name}: layer ${ctx.layer} hard link ${header.name} → ${header.linkname} has no file to link to`, { field: 'image' });
        }
        // link(2) does not follow a symlink source, and the source is inside the root.
        await link(source, target);
        return;
      }
      default:
        // Devices and fifos cannot be created inside a user namespace anyway; boxes get /dev from the runtime.
        ctx.skipped++;
        return;
    }
  }

  private async setMeta(ctx: UnpackContext, path: string, header: Headers, isDir: boolean): Promise<void> {
    await lchown(path, this.mapId(ctx, header.uid), this.mapId(ctx, header.gid));
    // After chown: chown clears setuid/setgid, which must survive (sudo, ping, …).
    await chmod(path, (header.mode ?? (isDir ? 0o755 : 0o644)) & 0o7777);
    const mtime = header.mtime ?? new Date(0);
    if (isDir) ctx.dirTimes.set(path, mtime);
    else await utimes(path, mtime, mtime);
  }

  private mapId(ctx: UnpackContext, id: number | undefined): number {
    const n = id ?? 0;
    if (n >= 0 && n < this.rangeSize) return n + this.opts.idShift;
    ctx.remappedIds++;
    return OVERFLOW_ID + this.opts.idShift;
  }

  /**
   * The host path of a directory given by image-relative parts, resolving symlinks as the box
   * would see them (absolute targets and `..` stay within the image root), so no entry can be
   * written through a symlink to outside the root. Creates missing directories when `create`.
   */
  private async resolveParent(ctx: UnpackContext, parts: string[], create: boolean): Promise<string | undefined> {
    const resolved: string[] = [];
    const queue = [...parts];
    let hops = 0;
    while (queue.length > 0) {
      const part = queue.shift()!;
      if (part === '' || part === '.') continue;
      if (part === '..') {
        resolved.pop();
        continue;
      }
      const path = join(ctx.root, ...resolved, part);
      const st = await lstat(path).catch(() => undefined);
      if (!st) {
        if (!create) return undefined;
        await mkdir(path, { mode: 0o755 });
        await lchown(path, this.opts.idShift, this.opts.idShift);
        resolved.push(part);
        continue;
      }
      if (st.isSymbolicLink()) {
        if (++hops > 40) throw new DomainError('invalid-input', `image ${ctx.name}: layer ${ctx.layer}: too many symlinks under /${parts.join('/')}`, { field: 'image' });
        const target = await readlink(path);
        if (target.startsWith('/')) resolved.length = 0;
        queue.unshift(...target.split('/'));
        continue;
      }
      if (!st.isDirectory()) {
        throw new DomainError('invalid-input', `image ${ctx.name}: layer ${ctx.layer}: /${[...resolved, part].join('/')} is not a directory but has entries under it`, { field: 'image' });
      }
      resolved.push(part);
    }
    return join(ctx.root, ...resolved);
  }

  private async gcOnce(): Promise<OciGcResult> {
    const result: OciGcResult = { removedImages: [], removedBlobs: 0, freedBytes: 0, usedBytes: 0 };
    const now = Date.now();
    for (const entry of await readdirOrEmpty(join(this.root, 'tmp'))) {
      const path = join(this.root, 'tmp', entry);
      const st = await lstat(path).catch(() => undefined);
      if (st && now - st.mtimeMs > STALE_TMP_MS) await rm(path, { recursive: true, force: true });
    }
    const images: ImageMeta[] = [];
    for (const hex of await readdirOrEmpty(join(this.root, 'rootfs'))) {
      const digest = `sha256:${hex}`;
      const meta = await readJson<ImageMeta>(this.metaPath(digest));
      // A rootfs without meta (a crash between the two writes cannot cause that, but a hand edit
      // can) still counts; it references no blobs and sorts as least recently used.
      images.push(meta ?? { digest, names: [], layers: [], config: {}, sizeBytes: await diskUsage(this.rootfsOf(digest)), createdAt: '', lastUsedAt: '' });
    }
    const blobs = new Map<string, number>();
    for (const hex of await readdirOrEmpty(join(this.root, 'blobs', 'sha256'))) {
      const st = await lstat(join(this.root, 'blobs', 'sha256', hex)).catch(() => undefined);
      if (st) blobs.set(`sha256:${hex}`, st.blocks * 512);
    }
    let used = images.reduce((n, m) => n + m.sizeBytes, 0) + [...blobs.values()].reduce((n, s) => n + s, 0);
    const live = new Set(images);
    const sweepBlobs = async () => {
      const referenced = new Set<string>();
      for (const m of live) for (const l of m.layers) referenced.add(l);
      for (const b of this.building.values()) for (const l of b.layers) referenced.add(l);
      for (const [digest, size] of blobs) {
        if (referenced.has(digest)) continue;
        await rm(join(this.root, 'blobs', 'sha256', hexOf(digest)), { force: true });
        blobs.delete(digest);
        used -= size;
        result.freedBytes += size;
        result.removedBlobs++;
      }
    };
    await sweepBlobs();
    const budget = this.opts.diskBudgetBytes;
    if (budget !== undefined && used > budget) {
      const inUse = new Set([...((await this.opts.inUse?.()) ?? []), ...this.building.keys()]);
      const lru = [...live].sort((a, b) => a.lastUsedAt.localeCompare(b.lastUsedAt));
      for (const meta of lru) {
        if (used <= budget) break;
        if (inUse.has(meta.digest)) continue;
        // Renamed away first, so no reader ever finds a half-deleted root under its digest.
        const trash = join(this.root, 'tmp', `trash-${hexOf(meta.digest)}-${randomBytes(6).toString('hex')}`);
        try {
          await rename(this.rootfsOf(meta.digest), trash);
        } catch {
          continue;
        }
        await rm(this.metaPath(meta.digest), { force: true });
        for (const n of meta.names) {
          const ref = await readJson<{ digest: string }>(this.refPath(n));
          if (ref?.digest === meta.digest) await rm(this.refPath(n), { force: true });
        }
        await rm(trash, { recursive: true, force: true });
        live.delete(meta);
        used -= meta.sizeBytes;
        result.freedBytes += meta.sizeBytes;
        result.removedImages.push(meta.digest);
        await sweepBlobs();
      }
      if (used > budget) this.log('oci: cache over budget, everything left is in use', { used, budget });
    }
    result.usedBytes = used;
    if (result.removedImages.length || result.removedBlobs) this.log('oci: gc', { ...result });
    return result;
  }
}

interface UnpackContext {
  root: string;
  name: string;
  layer: number;
  /** Host paths this layer wrote: whiteouts apply only to lower layers. */
  layerPaths: Set<string>;
  dirTimes: Map<string, Date>;
  skipped: number;
  remappedIds: number;
  /** Decompressed bytes of every layer so far. */
  unpackedBytes: number;
}

/** Image-relative components of an entry name; leading `/` is ignored, `..` is refused. */
function entryParts(ctx: UnpackContext, name: string): string[] {
  const parts = name.split('/').filter((p) => p !== '' && p !== '.');
  if (parts.includes('..')) throw escapeError(ctx, name);
  return parts;
}

function escapeError(ctx: UnpackContext, name: string): DomainError {
  return new DomainError('invalid-input', `image ${ctx.name}: layer ${ctx.layer} entry "${name}" points outside the root filesystem`, { field: 'image' });
}

/** gzip and zstd are recognised by magic bytes: registries mislabel media types often enough. */
async function decompressorFor(path: string): Promise<Transform | undefined> {
  const fh = await open(path, 'r');
  const magic = Buffer.alloc(4);
  try {
    await fh.read(magic, 0, 4, 0);
  } finally {
    await fh.close();
  }
  if (magic[0] === 0x1f && magic[1] === 0x8b) return createGunzip();
  if (magic.readUInt32LE(0) === 0xfd2fb528) return zstdDecompressor();
  return undefined;
}

/** Node 20's zlib has no zstd; fzstd is pure JS and streams. */
function zstdDecompressor(): Transform {
  const out = new Transform({
    transform(chunk: Buffer, _enc, cb) {
      try {
        decoder.push(new Uint8Array(chunk.buffer, chunk.byteOffset, chunk.byteLength));
        cb();
      } catch (err) {
        cb(err as Error);
      }
    },
    flush(cb) {
      try {
        decoder.push(new Uint8Array(0), true);
        cb();
      } catch (err) {
        cb(err as Error);
      }
    },
  });
  // fzstd may hand out views of its window buffer: copy before it is reused.
  const decoder = new ZstdDecompress((data) => out.push(Buffer.from(data)));
  return out;
}

async function drain(stream: Readable): Promise<void> {
  stream.resume();
  await finished(stream);
}

async function exists(path: string): Promise<boolean> {
  return lstat(path).then(
    () => true,
    () => false,
  );
}

async function readdirOrEmpty(path: string): Promise<string[]> {
  return readdir(path).catch(() => []);
}

async function readJson<T>(path: string): Promise<T | undefined> {
  try {
    return JSON.parse(await readFile(path, 'utf8')) as T;
  } catch {
    return undefined;
  }
}

/** Bytes on disk of a tree, counting each hard-linked inode once. */
async function diskUsage(root: string): Promise<number> {
  const seen = new Set<number>();
  let total = 0;
  const walk = async (path: string): Promise<void> => {
    const st = await lstat(path);
    if (st.nlink > 1 && !st.isDirectory()) {
      if (seen.has(st.ino)) return;
      seen.add(st.ino);
    }
    total += st.blocks * 512;
    if (st.isDirectory()) for (const name of await readdir(path)) await walk(join(path, name));
  };
  await walk(root);
  return total;
}

