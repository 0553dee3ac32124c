/**
 * Builds the microVM guest agent (guest/devyard-guest-agent.c) on the node, once per source
 * version: the binary is static so it runs in any initramfs, and naming it after the source hash
 * lets nodes with different agent versions share one cache directory.
 */
import { createHash, randomBytes } from 'node:crypto';
import { access, mkdir, readFile, rename, rm } from 'node:fs/promises';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { runHostCommandRaw } from '../../network/host-command-runner.js';

/** The C source; the same relative path from src/runtime/microvm (vitest) and dist/runtime/microvm. */
const SOURCE = fileURLToPath(new URL('../../../guest/devyard-guest-agent.c', import.meta.url));

/** Compiles in flight, by output path: concurrent callers share one gcc run. */
const building = new Map<string, Promise<string>>();

async function exists(path: string): Promise<boolean> {
  try {
    await access(path);
    return true;
  } catch {
    return false;
  }
}

async function compile(out: string): Promise<string> {
  const tmp = `${out}.tmp-${process.pid}-${randomBytes(4).toString('hex')}`;
  try {
    const r = await runHostCommandRaw(['gcc', '-static', '-O2', '-Wall', '-Wextra', '-o', tmp, SOURCE]);
    if (r.code !== 0) throw new Error(r.stderr.trim() || `gcc exited ${r.code}`);
    // Rename last, so another process never runs a half-written binary.
    await rename(tmp, out);
    return out;
  } catch (err) {
    await rm(tmp, { force: true });
    throw new Error(`compiling the guest agent failed: ${(err as Error).message}`);
  }
}

/** Returns the path of the compiled guest agent in cacheDir, compiling it when missing. */
export async function ensureGuestAgent(cacheDir: string): Promise<string> {
  const source = await readFile(SOURCE);
  const hash = createHash('sha256').update(source).digest('hex').slice(0, 16);
  const out = join(cacheDir, `guest-agent-${hash}`);
  const inFlight = building.get(out);
  if (inFlight) return inFlight;
  if (await exists(out)) return out;
  // Re-check after the await above: another caller may have started the compile meanwhile.
  const again = building.get(out);
  if (again) return again;
  const job = mkdir(cacheDir, { recursive: true })
    .then(() => compile(out))
    .finally(() => building.delete(out));
  building.set(out, job);
  return job;
}
