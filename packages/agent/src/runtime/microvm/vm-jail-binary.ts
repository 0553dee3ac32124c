/**
 * Builds the node's QEMU jailer (host/devyard-vm-jail.c), once per source version, into the
 * host's microVM assets: the program that starts every VM's QEMU in a mount namespace of its own,
 * as an unprivileged uid, without capabilities (see the source for what it does, step by step).
 */
import { fileURLToPath } from 'node:url';
import { ensureCompiledProgram } from './compiled-program-cache.js';

/** The C source; the same relative path from src/runtime/microvm (vitest) and dist/runtime/microvm. */
const SOURCE = fileURLToPath(new URL('../../../host/devyard-vm-jail.c', import.meta.url));

/** Returns the path of the compiled jailer in cacheDir, compiling it when missing. */
export function ensureVmJail(cacheDir: string): Promise<string> {
  return ensureCompiledProgram({ source: SOURCE, cacheDir, name: 'devyard-vm-jail', what: 'the QEMU jailer' });
}
