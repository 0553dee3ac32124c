/**
 * C programs the node builds from this package's sources with gcc, once per source version: the
 * output is named after the source's hash, so nodes (and agent versions) sharing one cache
 * directory never run each other's builds, and a changed source is rebuilt by the next caller.
 * Static binaries: they run in any initramfs, and inside a jail that holds no libraries.
 */
import { createHash, randomBytes } from 'node:crypto';
import { access, mkdir, readFile, rename, rm } from 'node:fs/promises';
import { join } from 'node:path';
import { runHostCommandRaw } from '../../network/host-command-runner.js';

/** Compiles in flight, by output path: concurrent callers share one gcc run. */
const building = new Map<string, Promise<string>>();

/** What to build. */
export interface CompiledProgram {
  /** The C source file. */
  source: string;
  /** Cache directory; the binary is `<cacheDir>/<name>-<source hash>`. */
  cacheDir: string;
  /** Binary name prefix. */
  name: string;
  /** What the program is, for error messages. */
  what: string;
}

async function exists(path: string): Promise<boolean> {
  try {
    await access(path);
    return true;
  } catch {
    return false;
  }
}

async function compile(source: string, out: string, what: string): Promise<string> {
  const tmp = `${out}.tmp-${process.pid}-${randomBytes(4).toString('hex')}`;
  try {
    const r = await runHostCommandRaw(['gcc', '-static', '-O2', '-Wall', '-Wextra', '-o', tmp, source]);
    if (r.code !== 0) throw new Error(r.stderr.trim() || `gcc exited ${r.code}`);
    // Rename last, so another process never runs a half-written binary.
    await rename(tmp, out);
    return out;
  } catch (err) {
    await rm(tmp, { force: true });
    throw new Error(`compiling ${what} failed: ${(err as Error).message}`);
  }
}

/** Returns the path of the compiled program, compiling it when missing. */
export async function ensureCompiledProgram(p: CompiledProgram): Promise<string> {
  const hash = createHash('sha256').update(await readFile(p.source)).digest('hex').slice(0, 16);
  const out = join(p.cacheDir, `${p.name}-${hash}`);
  const inFlight = building.get(out);
  if (inFlight) return inFlight;
  if (await exists(out)) return out;
  // Re-check after the await above: another caller may have started the compile meanwhile.
  const again = building.get(out);
  if (again) return again;
  const job = mkdir(p.cacheDir, { recursive: true })
    .then(() => compile(p.source, out, p.what))
    .finally(() => building.delete(out));
  building.set(out, job);
  return job;
}
