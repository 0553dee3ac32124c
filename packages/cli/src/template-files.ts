/**
 * Reads what `devyard templates push` is given: a template in YAML or JSON, a devcontainer.json, or
 * a folder holding one. Everything is validated here, so a bad file fails before anything is sent.
 */
import { existsSync, readFileSync, statSync } from 'node:fs';
import { basename, dirname, join, resolve } from 'node:path';
import { parse as parseYaml } from 'yaml';
import { importDevcontainer } from '@devyard/api/devcontainer-import';
import { CreateTemplateRequestSchema, type CreateTemplateRequest } from '@devyard/api/template-schemas';
import { CliUsageError } from './cli-config.js';

export interface LoadedTemplate {
  /** The request to publish, already valid against CreateTemplateRequestSchema. */
  request: CreateTemplateRequest;
  /** What the source said that the template does not carry over (devcontainer imports only). */
  warnings: string[];
  /** The file actually read, which differs from the argument when that was a folder. */
  file: string;
  /** How the file was read. */
  format: 'yaml' | 'json' | 'devcontainer';
}

const DEVCONTAINER_CANDIDATES = ['.devcontainer/devcontainer.json', '.devcontainer.json', 'devcontainer.json'];

function read(file: string): string {
  try {
    return readFileSync(file, 'utf8');
  } catch (e) {
    throw new CliUsageError(`cannot read ${file}: ${(e as NodeJS.ErrnoException).code ?? (e as Error).message}`);
  }
}

export function loadTemplateFile(path: string, opts: { name?: string } = {}): LoadedTemplate {
  let file = path;
  if (existsSync(path) && statSync(path).isDirectory()) {
    const found = DEVCONTAINER_CANDIDATES.map((c) => join(path, c)).find((c) => existsSync(c));
    if (!found) throw new CliUsageError(`${path}: no .devcontainer/devcontainer.json or .devcontainer.json in this folder`);
    file = found;
  }
  const text = read(file);
  const base = basename(file);
  if (base === 'devcontainer.json' || base === '.devcontainer.json') {
    const dir = dirname(resolve(file));
    // The project folder names the template when the devcontainer has no name of its own.
    const inside = dir.lastIndexOf('/.devcontainer');
    const project = basename(inside >= 0 ? dir.slice(0, inside) || '/' : dir);
    const r = importDevcontainer(text, {
      file,
      name: opts.name,
      fallbackName: project,
      readRelative: (p) => {
        try {
          return readFileSync(resolve(dir, p), 'utf8');
        } catch {
          return undefined;
        }
      },
    });
    return { ...r, file, format: 'devcontainer' };
  }

  let raw: unknown;
  const yaml = /\.ya?ml$/i.test(file);
  if (!yaml && !/\.json$/i.test(file)) throw new CliUsageError(`${file}: expected a .yaml, .yml or .json template, or a devcontainer.json`);
  try {
    raw = yaml ? parseYaml(text) : JSON.parse(text);
  } catch (e) {
    throw new CliUsageError(`${file}: not valid ${yaml ? 'YAML' : 'JSON'}: ${(e as Error).message.split('\n')[0]}`);
  }
  if (typeof raw !== 'object' || raw === null || Array.isArray(raw)) throw new CliUsageError(`${file}: a template must be a mapping of fields`);
  if (opts.name !== undefined) raw = { ...raw, name: opts.name };
  const parsed = CreateTemplateRequestSchema.safeParse(raw);
  if (!parsed.success) {
    const i = parsed.error.issues[0]!;
    throw new CliUsageError(`${file}: ${i.path.map(String).join('.') || '(top level)'}: ${i.message}`);
  }
  return { request: parsed.data, warnings: [], file, format: yaml ? 'yaml' : 'json' };
}
