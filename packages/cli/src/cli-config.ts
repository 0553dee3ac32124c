/**
 * Where the CLI finds the server: DEVYARD_URL / DEVYARD_TOKEN, else the config file `devyard up`
 * wrote (DEVYARD_CONFIG, default ~/.config/devyard/config.json).
 */
import { mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { homedir } from 'node:os';
import { dirname, join } from 'node:path';
import { DevyardClient } from '@devyard/sdk/devyard-client';

export interface CliConfig {
  url: string;
  token: string;
}

export function configPath(): string {
  return process.env.DEVYARD_CONFIG ?? join(process.env.XDG_CONFIG_HOME ?? join(homedir(), '.config'), 'devyard', 'config.json');
}

export function readConfig(): Partial<CliConfig> {
  try {
    return JSON.parse(readFileSync(configPath(), 'utf8')) as Partial<CliConfig>;
  } catch {
    return {};
  }
}

export function writeConfig(cfg: CliConfig): string {
  const file = configPath();
  mkdirSync(dirname(file), { recursive: true });
  writeFileSync(file, `${JSON.stringify(cfg, null, 2)}\n`, { mode: 0o600 });
  return file;
}

export class CliUsageError extends Error {}

export function clientFromEnv(): DevyardClient {
  const file = readConfig();
  const url = process.env.DEVYARD_URL ?? file.url;
  const token = process.env.DEVYARD_TOKEN ?? file.token;
  if (!url) throw new CliUsageError('no Devyard server configured: run `devyard up`, or set DEVYARD_URL and DEVYARD_TOKEN');
  return new DevyardClient({ url, token });
}
