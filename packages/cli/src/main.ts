/** The `devyard` command. Errors are printed as one readable line with a non-zero exit. */
import { Command, CommanderError } from 'commander';
import { ApiError } from '@devyard/sdk/api-error';
import { registerAccessCommands } from './commands/access-commands.js';
import { registerAuditCommands } from './commands/audit-commands.js';
import { registerBoxCommands } from './commands/box-commands.js';
import { registerClusterCommands } from './commands/cluster-commands.js';
import { registerDaemonCommands } from './commands/daemon-commands.js';
import { registerLoginCommands } from './commands/login-commands.js';
import { registerSecretCommands } from './commands/secret-commands.js';
import { registerTenancyCommands } from './commands/tenancy-commands.js';
import { CliUsageError } from './cli-config.js';
import { BoxFailedError } from './wait-for-box.js';

export function buildProgram(): Command {
  const program = new Command('devyard')
    .description('Devyard: self-hosted cloud dev boxes')
    .version('0.1.0')
    .showHelpAfterError('(run with --help for usage)')
    .configureOutput({ outputError: (str, write) => write(str) });
  registerDaemonCommands(program);
  registerBoxCommands(program);
  registerClusterCommands(program);
  registerAccessCommands(program);
  registerSecretCommands(program);
  registerTenancyCommands(program);
  registerAuditCommands(program);
  registerLoginCommands(program);
  program.exitOverride();
  return program;
}

export async function main(argv: string[]): Promise<void> {
  try {
    await buildProgram().parseAsync(argv);
  } catch (e) {
    if (e instanceof CommanderError) {
      process.exitCode = e.exitCode;
      return;
    }
    let msg: string;
    let code = 1;
    if (e instanceof ApiError) {
      msg = e.message;
      code = e.status === 0 ? 3 : e.status === 404 ? 4 : 1;
    } else if (e instanceof CliUsageError || e instanceof BoxFailedError) msg = e.message;
    else msg = (e as Error).message ?? String(e);
    process.stderr.write(`devyard: error: ${msg}\n`);
    process.exitCode = code;
  }
}
