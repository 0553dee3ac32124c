/**
 * Builds the idmapped-mount helper (host/devyard-idmap-mount.c) on the node, once per source
 * version, like the microVM guest agent: static, named after the source hash, renamed into place
 * only when complete so a concurrent start never runs half a binary.
 */
import { createHash, randomBytes } from 'node:crypto';
import { access, mkdir, readFile, rename, rm } from 'node:fs/promises';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { runHostCommandRaw } from '../../network/host-command-runner.js';

/** The C source; the same relative path from src/runtime/sandbox (vitest) and dist/runtime/sandbox. */
const SOURCE = fileURLToPath(new URL('../../../host/devyard-idmap-mount.c', import.meta.url));

/** Compiles in flight, by output path: concurrent callers share one gcc run. */
const building = new Map<string, Promise<string>>();

async function compile(out: string): Promise<string> {
  const tmp = `${out}.tmp-${process.pid}-${randomBytes(4).toString('hex')}`;
  try {
    const r = await runHostCommandRaw(['gcc', '-static', '-O2', '-Wall', '-Wextra', '-o', tmp, SOURCE]);
    if (r.code !== 0) throw new Error(r.stderr.trim() || `gcc exited ${r.code}`);
    await rename(tmp, out);
    return out;
  } catch (err) {
    await rm(tmp, { force: true });
    throw new Error(`compiling the idmapped-mount helper failed: ${(err as Error).message}`);
  }
}

/** Path of the compiled helper in cacheDir, compiling it when missing. */
export async function ensureIdmapMountHelper(cacheDir: string): Promise<string> {
  const hash = createHash('sha256').update(await readFile(SOURCE)).digest('hex').slice(0, 16);
  const out = join(cacheDir, `devyard-idmap-mount-${hash}`);
  const inFlight = building.get(out);
  if (inFlight) return inFlight;
  try {
    await access(out);
    return out;
  } catch {}
  const again = building.get(out);
  if (again) return again;
  const job = mkdir(cacheDir, { recursive: true, mode: 0o755 })
    .then(() => compile(out))
    .finally(() => building.delete(out));
  building.set(out, job);
  return job;
}
