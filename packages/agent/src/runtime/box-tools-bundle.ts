/**
 * The box tools bundle: host programs that SSH sessions need inside every box whatever its image
 * (`rsync --server` for `rsync -e ssh`, `sftp-server` for scp and SFTP clients), copied with every
 * shared library they load and the host's dynamic loader, and started through that loader with an
 * explicit library path. So they run in any image, with any libc or none (busybox-only images),
 * and never see the image's libraries.
 *
 * Layout of `<dir>` (bound read-only at {@link BOX_TOOLS_DIR} in a box):
 *   bin/<tool>        `#!/.devyard/busybox sh` wrapper: exec loader --library-path lib libexec/<tool>
 *   libexec/<tool>    the host binary
 *   lib/<soname>      its libraries and the loader
 *   .stamp            hash of the inputs (paths, sizes, mtimes): unchanged inputs, no rebuild
 */
import { execFile } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import { chmod, copyFile, mkdir, readFile, realpath, rename, rm, stat, writeFile } from 'node:fs/promises';
import { basename, dirname, join } from 'node:path';

/** Where the bundle is mounted inside a box. */
export const BOX_TOOLS_DIR = '/.devyard/tools';
/** Directory of the wrappers inside a box, appended to every box's default PATH. */
export const BOX_TOOLS_BIN = `${BOX_TOOLS_DIR}/bin`;
/** The PATH of a box's processes when the box sets none, on every runtime. */
export const BOX_DEFAULT_PATH = `/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:${BOX_TOOLS_BIN}`;
/** The shell of the wrappers: the host's static busybox, bound into every box. */
const BOX_SHELL = '/.devyard/busybox';
/** Bumped when the layout or the wrappers change, so existing bundles are rebuilt. */
const FORMAT = 1;

/** One host program of the bundle. */
export interface BoxTool {
  /** Name of the wrapper in bin/ (the command a session runs). */
  name: string;
  /** The program on the host. */
  hostPath: string;
}

/** The programs every box gets. */
export const DEFAULT_BOX_TOOLS: BoxTool[] = [
  { name: 'rsync', hostPath: '/usr/bin/rsync' },
  { name: 'sftp-server', hostPath: '/usr/lib/openssh/sftp-server' },
];

/** Options of {@link ensureBoxToolsBundle}. */
export interface BoxToolsBundleOptions {
  /** The bundle directory (replaced as a whole when rebuilt). */
  dir: string;
  /** Programs to bundle (default {@link DEFAULT_BOX_TOOLS}). */
  tools?: BoxTool[];
  /** Structured log sink. */
  log?: (msg: string, fields?: object) => void;
}

/** What {@link ensureBoxToolsBundle} found or built. */
export interface BoxToolsBundle {
  /** The bundle directory. */
  dir: string;
  /** Names of the bundled tools (those missing on the host are left out). */
  tools: string[];
  /** Whether this call (re)built the bundle. */
  rebuilt: boolean;
}

/** A host program and the files it needs. */
interface ResolvedTool {
  name: string;
  binary: string;
  /** soname (as the binary asks for it) → host file. */
  libs: Map<string, string>;
  /** The dynamic loader, or null for a static binary. */
  loader: string | null;
}

/**
 * Builds `<dir>` from the host's programs unless its stamp says the inputs are unchanged. Builds
 * next to it and renames it into place, so a crash never leaves a half bundle at `<dir>`. A tool
 * missing on the host (or with a library ldd cannot find) is logged and left out.
 */
export async function ensureBoxToolsBundle(opts: BoxToolsBundleOptions): Promise<BoxToolsBundle> {
  const log = opts.log ?? (() => {});
  const resolved: ResolvedTool[] = [];
  for (const tool of opts.tools ?? DEFAULT_BOX_TOOLS) {
    try {
      resolved.push(await resolveTool(tool));
    } catch (err) {
      log('box tools: left out', { tool: tool.name, hostPath: tool.hostPath, error: (err as Error).message });
    }
  }
  const stampValue = await stampOf(resolved);
  const names = resolved.map((t) => t.name);
  const current = await readFile(join(opts.dir, '.stamp'), 'utf8').catch(() => '');
  if (current.trim() === stampValue) return { dir: opts.dir, tools: names, rebuilt: false };

  const parent = dirname(opts.dir);
  await mkdir(parent, { recursive: true });
  const tmp = join(parent, `.${basename(opts.dir)}-build-${randomBytes(4).toString('hex')}`);
  try {
    await buildInto(tmp, resolved);
    await writeFile(join(tmp, '.stamp'), `${stampValue}\n`, { mode: 0o644 });
    // rename(2) cannot replace a non-empty directory: move the old bundle aside first.
    const old = join(parent, `.${basename(opts.dir)}-old-${randomBytes(4).toString('hex')}`);
    const hadOld = await rename(opts.dir, old).then(
      () => true,
      (err: NodeJS.ErrnoException) => {
        if (err.code === 'ENOENT') return false;
        throw err;
      },
    );
    await rename(tmp, opts.dir);
    if (hadOld) await rm(old, { recursive: true, force: true });
  } finally {
    await rm(tmp, { recursive: true, force: true });
  }
  log('box tools: bundle built', { dir: opts.dir, tools: names });
  return { dir: opts.dir, tools: names, rebuilt: true };
}

async function resolveTool(tool: BoxTool): Promise<ResolvedTool> {
  if (!/^[a-z0-9][a-z0-9._-]*$/.test(tool.name)) throw new Error(`invalid tool name: ${tool.name}`);
  const binary = await realpath(tool.hostPath);
  if (!(await stat(binary)).isFile()) throw new Error(`${tool.hostPath} is not a file`);
  const { code, stdout, stderr } = await capture('ldd', [binary]);
  const libs = new Map<string, string>();
  let loader: string | null = null;
  if (code !== 0) {
    if (/not a dynamic executable|statically linked/.test(stdout + stderr)) return { name: tool.name, binary, libs, loader };
    throw new Error(`ldd ${binary} failed: ${(stderr || stdout).trim()}`);
  }
  for (const line of stdout.split('\n')) {
    const t = line.trim();
    if (!t || t.startsWith('linux-vdso') || t.startsWith('linux-gate')) continue;
    if (/statically linked/.test(t)) continue;
    const arrow = /^(\S+)\s+=>\s+(.*?)\s*(\(0x[0-9a-f]+\))?$/.exec(t);
    if (arrow) {
      const [, soname, target] = arrow;
      if (!target || target === 'not found') throw new Error(`${binary}: library ${soname} not found`);
      // An absolute soname is the loader as some ldd versions print it.
      if (soname!.startsWith('/')) loader = target;
      else libs.set(soname!, target);
      continue;
    }
    const bare = /^(\/\S+)\s+\(0x[0-9a-f]+\)$/.exec(t);
    if (bare) loader = bare[1]!;
  }
  if (!loader) throw new Error(`${binary}: ldd named no dynamic loader`);
  return { name: tool.name, binary, libs, loader };
}

/** Hash of everything the bundle is made of: a changed host package changes a path, size or mtime. */
async function stampOf(tools: ResolvedTool[]): Promise<string> {
  const h = createHash('sha256').update(`format ${FORMAT}\n`);
  for (const t of tools) {
    const files: Array<[string, string]> = [['binary', t.binary], ...(t.loader ? [['loader', t.loader] as [string, string]] : []), ...t.libs];
    h.update(`tool ${t.name}\n`);
    for (const [label, path] of files) {
      const st = await stat(path);
      h.update(`${label} ${path} ${st.size} ${st.mtimeMs} ${st.ino}\n`);
    }
  }
  return h.digest('hex');
}

async function buildInto(dir: string, tools: ResolvedTool[]): Promise<void> {
  // crun binds the bundle from inside the box's user namespace, where these files are "other's".
  for (const sub of ['', 'bin', 'lib', 'libexec']) {
    await mkdir(join(dir, sub), { recursive: true });
    await chmod(join(dir, sub), 0o755);
  }
  const copied = new Set<string>();
  const put = async (src: string, dest: string) => {
    if (copied.has(dest)) return;
    copied.add(dest);
    await copyFile(src, dest);
    await chmod(dest, 0o755);
  };
  for (const t of tools) {
    await put(t.binary, join(dir, 'libexec', t.name));
    for (const [soname, path] of t.libs) await put(path, join(dir, 'lib', soname));
    const target = `${BOX_TOOLS_DIR}/libexec/${t.name}`;
    let exec: string;
    if (t.loader) {
      const loaderName = basename(t.loader);
      await put(t.loader, join(dir, 'lib', loaderName));
      exec = `exec ${BOX_TOOLS_DIR}/lib/${loaderName} --library-path ${BOX_TOOLS_DIR}/lib ${target} "$@"`;
    } else {
      exec = `exec ${target} "$@"`;
    }
    const wrapper = join(dir, 'bin', t.name);
    await writeFile(wrapper, `#!${BOX_SHELL} sh\n# Devyard box tool: the host's ${t.name} with its own libraries.\n${exec}\n`);
    await chmod(wrapper, 0o755);
  }
}

function capture(cmd: string, args: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  return new Promise((resolve, reject) => {
    execFile(cmd, args, { encoding: 'utf8' }, (err, stdout, stderr) => {
      if (err && typeof err.code !== 'number') return reject(err);
      resolve({ code: err ? (err.code as unknown as number) : 0, stdout, stderr });
    });
  });
}
