/**
 * The error for a host program that is not installed, naming the Debian package that provides it
 * (from host-packages.json at the repository root, the list the Makefile installs from), so a node
 * set up by hand learns what to install instead of reading `spawn getfattr ENOENT`.
 */
import { readFileSync } from 'node:fs';

/** A host program the agent needs is not installed. */
export class HostProgramMissingError extends Error {
  /** Error code for callers that map errors without parsing messages. */
  readonly code = 'HOST_PROGRAM_MISSING';
  constructor(
    /** The program that could not be started. */
    readonly program: string,
    /** The Debian package that provides it, when known. */
    readonly debianPackage: string | undefined,
  ) {
    super(
      debianPackage
        ? `${program} is not installed on this host: install the Debian package ${debianPackage} (\`make up\` installs it)`
        : `${program} is not installed on this host`,
    );
  }
}

let packageOf: Map<string, string> | undefined;

/** The Debian package that provides `program`, per host-packages.json. */
export function debianPackageOf(program: string): string | undefined {
  if (!packageOf) {
    packageOf = new Map();
    try {
      // Four levels up from src/network (and dist/network): the repository root.
      const manifest = JSON.parse(readFileSync(new URL('../../../../host-packages.json', import.meta.url), 'utf8')) as Record<string, Record<string, { programs?: string[] }>>;
      for (const [section, entries] of Object.entries(manifest)) {
        if (section.startsWith('$')) continue;
        for (const [pkg, e] of Object.entries(entries)) for (const p of e.programs ?? []) packageOf.set(p, pkg);
      }
    } catch {
      // An installation without the manifest still reports the program.
    }
  }
  return packageOf.get(program.split('/').pop() ?? program);
}

/** `err` as a {@link HostProgramMissingError} when it says `program` does not exist, else unchanged. */
export function explainSpawnError(program: string, err: Error): Error {
  return (err as NodeJS.ErrnoException).code === 'ENOENT' ? new HostProgramMissingError(program, debianPackageOf(program)) : err;
}
