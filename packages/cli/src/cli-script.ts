/** The path of this very `devyard` script, for commands that run the CLI again (ProxyCommand, the gateway child). */
import { existsSync, realpathSync } from 'node:fs';
import { dirname, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

export function cliScript(): string {
  const argv1 = process.argv[1];
  if (argv1 && existsSync(argv1)) return realpathSync(argv1);
  // Loaded some other way (tests): the repository's bin/devyard, from dist/.
  return resolve(dirname(fileURLToPath(import.meta.url)), '../../../bin/devyard');
}
