/**
 * Builds the microVM guest agent (guest/devyard-guest-agent.c) on the node, once per source
 * version: the binary is static so it runs in any initramfs, and naming it after the source hash
 * lets nodes with different agent versions share one cache directory.
 */
import { fileURLToPath } from 'node:url';
import { ensureCompiledProgram } from './compiled-program-cache.js';

/** The C source; the same relative path from src/runtime/microvm (vitest) and dist/runtime/microvm. */
const SOURCE = fileURLToPath(new URL('../../../guest/devyard-guest-agent.c', import.meta.url));

/** Returns the path of the compiled guest agent in cacheDir, compiling it when missing. */
export function ensureGuestAgent(cacheDir: string): Promise<string> {
  return ensureCompiledProgram({ source: SOURCE, cacheDir, name: 'guest-agent', what: 'the guest agent' });
}
