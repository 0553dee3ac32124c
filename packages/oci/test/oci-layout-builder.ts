/**
 * Writes OCI image layouts for tests, layer by layer, with tar-stream: unlike `umoci repack` this
 * can produce any entry a hostile or unusual image may contain (whiteouts, opaque markers, hard
 * links, devices, `../` names), which is exactly what the unpacker must be tested against.
 */
import { createHash } from 'node:crypto';
import { existsSync, readFileSync } from 'node:fs';
import { mkdir, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { gzipSync } from 'node:zlib';
import { pack, type Headers } from 'tar-stream';

/** One tar entry of a test layer. */
export interface LayerEntry {
  path: string;
  type?: 'file' | 'directory' | 'symlink' | 'link' | 'character-device' | 'block-device' | 'fifo';
  content?: string | Buffer;
  mode?: number;
  uid?: number;
  gid?: number;
  linkname?: string;
}

/** An uncompressed tar of the entries. */
export async function tarLayer(entries: LayerEntry[]): Promise<Buffer> {
  const p = pack();
  const chunks: Buffer[] = [];
  p.on('data', (c: Buffer) => chunks.push(c));
  const ended = new Promise<void>((resolve, reject) => {
    p.on('end', resolve);
    p.on('error', reject);
  });
  for (const e of entries) {
    const type = e.type ?? 'file';
    const header: Headers = {
      name: e.path,
      type,
      mode: e.mode ?? (type === 'directory' ? 0o755 : 0o644),
      uid: e.uid ?? 0,
      gid: e.gid ?? 0,
      mtime: new Date(1_700_000_000_000),
    };
    if (e.linkname !== undefined) header.linkname = e.linkname;
    if (type === 'character-device' || type === 'block-device') {
      header.devmajor = 1;
      header.devminor = 3;
    }
    const body = type === 'file' ? Buffer.from(e.content ?? '') : undefined;
    await new Promise<void>((resolve, reject) => {
      const cb = (err?: Error | null) => (err ? reject(err) : resolve());
      if (body) p.entry(header, body, cb);
      else p.entry(header, cb);
    });
  }
  p.finalize();
  await ended;
  return Buffer.concat(chunks);
}

const sha = (b: Buffer | string) => createHash('sha256').update(b).digest('hex');

/** Builds OCI image layouts (`oci:DIR:tag` for skopeo). */
export class OciLayoutBuilder {
  private readonly index: Array<Record<string, unknown>> = [];

  constructor(readonly dir: string) {}

  private async blob(bytes: Buffer | string, mediaType: string): Promise<{ mediaType: string; digest: string; size: number }> {
    const hex = sha(bytes);
    await mkdir(join(this.dir, 'blobs', 'sha256'), { recursive: true });
    await writeFile(join(this.dir, 'blobs', 'sha256', hex), bytes);
    return { mediaType, digest: `sha256:${hex}`, size: Buffer.byteLength(bytes) };
  }

  /** Writes a single-platform image; returns its manifest descriptor. */
  async image(
    layers: Buffer[],
    opts: { compression?: 'gzip' | 'none'; architecture?: string; env?: string[] } = {},
  ): Promise<{ mediaType: string; digest: string; size: number; platform: { os: string; architecture: string } }> {
    const architecture = opts.architecture ?? 'amd64';
    const descs = [];
    for (const tar of layers) {
      descs.push(
        opts.compression === 'none'
          ? await this.blob(tar, 'application/vnd.oci.image.layer.v1.tar')
          : await this.blob(gzipSync(tar), 'application/vnd.oci.image.layer.v1.tar+gzip'),
      );
    }
    const config = {
      architecture,
      os: 'linux',
      config: { Env: opts.env ?? ['PATH=/usr/local/bin:/usr/bin:/bin'], Cmd: ['/bin/sh'] },
      rootfs: { type: 'layers', diff_ids: layers.map((t) => `sha256:${sha(t)}`) },
    };
    const configDesc = await this.blob(JSON.stringify(config), 'application/vnd.oci.image.config.v1+json');
    const manifest = { schemaVersion: 2, mediaType: 'application/vnd.oci.image.manifest.v1+json', config: configDesc, layers: descs };
    const desc = await this.blob(JSON.stringify(manifest), manifest.mediaType);
    return { ...desc, platform: { os: 'linux', architecture } };
  }

  /** Writes an index over several platform manifests; returns its descriptor. */
  async multiPlatform(manifests: Array<{ mediaType: string; digest: string; size: number; platform: object }>) {
    const index = { schemaVersion: 2, mediaType: 'application/vnd.oci.image.index.v1+json', manifests };
    return this.blob(JSON.stringify(index), index.mediaType);
  }

  /** Names a manifest or index in the layout's top-level index.json. */
  async tag(tag: string, desc: { mediaType: string; digest: string; size: number }): Promise<void> {
    this.index.push({ ...desc, annotations: { 'org.opencontainers.image.ref.name': tag } });
    await writeFile(join(this.dir, 'oci-layout'), JSON.stringify({ imageLayoutVersion: '1.0.0' }));
    await writeFile(join(this.dir, 'index.json'), JSON.stringify({ schemaVersion: 2, manifests: this.index }));
  }
}

/**
 * The entries of a minimal root filesystem around the host's static busybox: the applets named
 * linked to it, root's passwd entry, /root and /tmp. Enough for a box to run shell hooks; `extra`
 * entries (a marker file, a motd) make images distinguishable.
 */
export function busyboxRootEntries(applets: readonly string[], extra: LayerEntry[] = []): LayerEntry[] {
  const busybox = ['/usr/bin/busybox', '/bin/busybox'].find((p) => existsSync(p));
  if (!busybox) throw new Error('busybox not found on the host: install busybox-static');
  return [
    { path: 'bin/', type: 'directory' },
    { path: 'bin/busybox', content: readFileSync(busybox), mode: 0o755 },
    ...applets.map((a) => ({ path: `bin/${a}`, type: 'symlink' as const, linkname: 'busybox' })),
    { path: 'etc/', type: 'directory' },
    { path: 'etc/passwd', content: 'root:x:0:0:root:/root:/bin/sh\n' },
    { path: 'root/', type: 'directory', mode: 0o700 },
    { path: 'tmp/', type: 'directory', mode: 0o1777 },
    ...extra,
  ];
}
