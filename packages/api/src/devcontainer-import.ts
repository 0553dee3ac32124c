/**
 * Converts a devcontainer.json (and a simple Dockerfile it points at) into a template request. Pure:
 * the caller reads files. What a template cannot express becomes a warning, never a silent drop,
 * because a box that quietly lacks a Feature or a mount fails much later and far from the cause.
 */
import { parse as parseJsonc, printParseErrorCode, type ParseError } from 'jsonc-parser';
import { z } from 'zod';
import { CreateTemplateRequestSchema, isBuiltinImage, parseOciReference, type CreateTemplateInput, type CreateTemplateRequest } from './template-schemas.js';

export interface DevcontainerImportOptions {
  /** The devcontainer.json path as the user named it; errors and warnings quote it. */
  file: string;
  /** Reads a file named relative to the devcontainer.json's folder (its Dockerfile); undefined when it does not exist. */
  readRelative?: (path: string) => string | undefined;
  /** Template name chosen by the user; wins over the devcontainer's `name`. */
  name?: string;
  /** Name to slugify when neither `name` nor the devcontainer's `name` gives one, e.g. the project folder. */
  fallbackName?: string;
}

export interface DevcontainerImport {
  /** The template request, valid against CreateTemplateRequestSchema. */
  request: CreateTemplateRequest;
  /** What the devcontainer.json or its Dockerfile said that the template does not carry over. */
  warnings: string[];
}

/** The devcontainer.json cannot become a template; the message names the file and the problem. */
export class DevcontainerImportError extends Error {
  override readonly name = 'DevcontainerImportError';
}

const ShellOrExec = z.union([z.string(), z.array(z.string())]);
const Command = z.union([ShellOrExec, z.record(z.string(), ShellOrExec)]);

/** Only the fields we read are typed; the rest pass through so they can be reported. */
const DevcontainerSchema = z.looseObject({
  name: z.string().optional(),
  image: z.string().optional(),
  dockerFile: z.string().optional(),
  build: z
    .looseObject({
      dockerfile: z.string().optional(),
      args: z.record(z.string(), z.string()).optional(),
    })
    .optional(),
  containerEnv: z.record(z.string(), z.string()).optional(),
  remoteEnv: z.record(z.string(), z.string().nullable()).optional(),
  remoteUser: z.string().optional(),
  containerUser: z.string().optional(),
  forwardPorts: z.array(z.union([z.number().int(), z.string()])).optional(),
  portsAttributes: z.record(z.string(), z.looseObject({ label: z.string().optional() })).optional(),
  onCreateCommand: Command.optional(),
  updateContentCommand: Command.optional(),
  postCreateCommand: Command.optional(),
  postStartCommand: Command.optional(),
  hostRequirements: z
    .looseObject({
      cpus: z.number().positive().optional(),
      memory: z.string().optional(),
      storage: z.string().optional(),
      gpu: z.union([z.boolean(), z.literal('optional'), z.record(z.string(), z.unknown())]).optional(),
    })
    .optional(),
});
type Devcontainer = z.infer<typeof DevcontainerSchema>;

/** Keys read below; `$schema` is editor metadata and means nothing to a box. */
const HANDLED = new Set([
  '$schema', 'name', 'image', 'dockerFile', 'build', 'context', 'containerEnv', 'remoteEnv', 'remoteUser', 'containerUser', 'forwardPorts', 'portsAttributes',
  'onCreateCommand', 'updateContentCommand', 'postCreateCommand', 'postStartCommand', 'hostRequirements',
]);

const HINTS: Record<string, string> = {
  features: 'Dev Container Features are not supported; install what they provide with build.packages or build.run',
  customizations: 'editor settings and extensions are not part of a template',
  postAttachCommand: 'there is no attach step; use postStartCommand if it must run on every start',
  initializeCommand: 'it runs on the local machine, which a template never touches',
  dockerComposeFile: 'Docker Compose setups are not supported',
};

/** Where a template field came from, so validation errors point at the devcontainer.json key. */
const SOURCE_OF: Array<[string, string]> = [
  ['hooks.onCreate', 'onCreateCommand'],
  ['hooks.updateContent', 'updateContentCommand'],
  ['hooks.postCreate', 'postCreateCommand'],
  ['hooks.postStart', 'postStartCommand'],
  ['build', 'build.dockerfile'],
  ['env', 'containerEnv/remoteEnv'],
  ['user', 'remoteUser'],
  ['ports', 'forwardPorts'],
  ['defaultResources', 'hostRequirements'],
];

export function importDevcontainer(text: string, opts: DevcontainerImportOptions): DevcontainerImport {
  const file = opts.file;
  const fail = (msg: string): never => {
    throw new DevcontainerImportError(`${file}: ${msg}`);
  };
  const errors: ParseError[] = [];
  const raw: unknown = parseJsonc(text, errors, { allowTrailingComma: true, disallowComments: false });
  if (errors.length > 0) {
    const e = errors[0]!;
    const { line, column } = position(text, e.offset);
    fail(`not valid JSON with comments at line ${line}, column ${column}: ${printParseErrorCode(e.error)}`);
  }
  if (typeof raw !== 'object' || raw === null || Array.isArray(raw)) fail('must contain a JSON object');
  const parsed = DevcontainerSchema.safeParse(raw);
  if (!parsed.success) {
    const i = parsed.error.issues[0]!;
    fail(`${i.path.map(String).join('.') || '(top level)'}: ${i.message}`);
  }
  const dc = parsed.data!;
  const warnings: string[] = [];
  const warn = (msg: string) => warnings.push(msg);

  for (const key of Object.keys(dc)) {
    if (!HANDLED.has(key)) warn(`"${key}" is not supported and was ignored${HINTS[key] ? `: ${HINTS[key]}` : ''}`);
  }

  const req: CreateTemplateInput & Record<string, unknown> = { name: templateName(dc, opts, fail) };
  req.description = `${dc.name ?? req.name} (imported from devcontainer.json)`.slice(0, 500);

  const dockerfile = dc.build?.dockerfile ?? dc.dockerFile;
  if (dc.image !== undefined && dockerfile !== undefined) fail('has both image and build.dockerfile; a template starts from one of them');
  if (dc.image !== undefined) req.image = normalizeImage(dc.image, 'image', warn);
  else if (dockerfile !== undefined) {
    const content = opts.readRelative?.(dockerfile);
    if (content === undefined) fail(`build.dockerfile: cannot read "${dockerfile}"`);
    req.build = convertDockerfile(content!, dockerfile, dc.build?.args ?? {}, warn, fail);
    if (dc.build) for (const k of Object.keys(dc.build)) if (k !== 'dockerfile' && k !== 'args' && k !== 'context') warn(`"build.${k}" is not supported and was ignored`);
  } else fail('names neither an image nor a build.dockerfile; a template needs one');

  const env = convertEnv(dc, warn);
  if (Object.keys(env).length > 0) req.env = env;

  const user = dc.remoteUser ?? dc.containerUser;
  if (user !== undefined) {
    if (user.includes('${')) warn(`remoteUser "${user}" uses a variable, which is not supported; ignored`);
    else req.user = user;
  }
  if (dc.remoteUser !== undefined && dc.containerUser !== undefined && dc.containerUser !== dc.remoteUser) {
    warn(`containerUser "${dc.containerUser}" differs from remoteUser; a template has one user, "${dc.remoteUser}" is used`);
  }

  const ports = convertPorts(dc, warn);
  if (ports.length > 0) req.ports = ports;

  const hooks: Record<string, unknown> = {};
  for (const [from, to] of [
    ['onCreateCommand', 'onCreate'],
    ['updateContentCommand', 'updateContent'],
    ['postCreateCommand', 'postCreate'],
    ['postStartCommand', 'postStart'],
  ] as const) {
    if (dc[from] !== undefined) hooks[to] = dc[from];
  }
  if (Object.keys(hooks).length > 0) req.hooks = hooks;

  const resources = convertHostRequirements(dc, warn);
  if (resources) req.defaultResources = resources;

  const valid = CreateTemplateRequestSchema.safeParse(req);
  if (!valid.success) {
    const i = valid.error.issues[0]!;
    const path = i.path.map(String).join('.');
    const source = SOURCE_OF.find(([prefix]) => path === prefix || path.startsWith(`${prefix}.`))?.[1] ?? (path || '(top level)');
    fail(`${source}: ${i.message}`);
  }
  return { request: valid.data!, warnings };
}

function position(text: string, offset: number): { line: number; column: number } {
  const before = text.slice(0, offset).split('\n');
  return { line: before.length, column: before[before.length - 1]!.length + 1 };
}

/** DNS-label form of a display name ("My App (Node 20)" → "my-app-node-20"). */
export function slugifyTemplateName(name: string): string | undefined {
  const slug = name
    .normalize('NFKD')
    .replace(/[\u0300-\u036f]/g, '')
    .toLowerCase()
    .replace(/[^a-z0-9]+/g, '-')
    .replace(/^[^a-z]+/, '')
    .slice(0, 40)
    .replace(/-+$/, '');
  return slug === '' ? undefined : slug;
}

function templateName(dc: Devcontainer, opts: DevcontainerImportOptions, fail: (m: string) => never): string {
  if (opts.name !== undefined) return opts.name;
  const name = (dc.name !== undefined ? slugifyTemplateName(dc.name) : undefined) ?? (opts.fallbackName !== undefined ? slugifyTemplateName(opts.fallbackName) : undefined);
  return name ?? fail('has no usable "name"; pass --name');
}

/**
 * devcontainer.json files usually name Docker Hub images without a host ("node:20"). Templates
 * require the host, so spell out what Docker would have pulled, and say so.
 */
function normalizeImage(image: string, where: string, warn: (m: string) => void): string {
  if (isBuiltinImage(image) || parseOciReference(image) !== undefined) return image;
  const first = image.split('/')[0]!;
  if (first.includes('.') || (first.includes(':') && image.includes('/')) || first === 'localhost') return image;
  const expanded = `docker.io/${image.includes('/') ? '' : 'library/'}${image}`;
  if (parseOciReference(expanded) === undefined) return image;
  warn(`${where} "${image}" has no registry host; using "${expanded}" (Docker Hub)`);
  return expanded;
}

function convertEnv(dc: Devcontainer, warn: (m: string) => void): Record<string, string> {
  const env: Record<string, string> = {};
  // remoteEnv applies to the processes users run, so it wins over containerEnv, as in the spec.
  for (const [source, vars] of [['containerEnv', dc.containerEnv ?? {}], ['remoteEnv', dc.remoteEnv ?? {}]] as const) {
    for (const [k, v] of Object.entries(vars)) {
      if (v === null) warn(`${source}.${k} is null (unset); ignored`);
      else if (v.includes('${')) warn(`${source}.${k} uses a variable ("${v}"), which is not supported; ignored`);
      else if (!/^[A-Za-z_][A-Za-z0-9_]*$/.test(k)) warn(`${source}: "${k}" is not a valid environment variable name; ignored`);
      else env[k] = v;
    }
  }
  return env;
}

function convertPorts(dc: Devcontainer, warn: (m: string) => void): Array<number | { port: number; label?: string }> {
  const out: Array<number | { port: number; label?: string }> = [];
  const attrs = dc.portsAttributes ?? {};
  const used = new Set<string>();
  for (const p of dc.forwardPorts ?? []) {
    const port = typeof p === 'number' ? p : /^\d+$/.test(p) ? Number(p) : undefined;
    if (port === undefined) {
      warn(`forwardPorts: "${p}" forwards another container's port, which is not supported; ignored`);
      continue;
    }
    if (out.some((o) => (typeof o === 'number' ? o : o.port) === port)) continue;
    const a = attrs[String(port)];
    used.add(String(port));
    const { label, ...rest } = a ?? {};
    if (Object.keys(rest).length > 0) warn(`portsAttributes.${port}: ${Object.keys(rest).join(', ')} not supported; only label is kept`);
    out.push(label !== undefined ? { port, label } : port);
  }
  for (const key of Object.keys(attrs)) if (!used.has(key)) warn(`portsAttributes."${key}" does not match a forwarded port; ignored`);
  return out;
}

function convertHostRequirements(dc: Devcontainer, warn: (m: string) => void): CreateTemplateInput['defaultResources'] {
  const h = dc.hostRequirements;
  if (!h) return undefined;
  const r: NonNullable<CreateTemplateInput['defaultResources']> = {};
  if (h.cpus !== undefined) r.cpu = h.cpus;
  if (h.memory !== undefined) r.memory = h.memory;
  if (h.storage !== undefined) r.disk = h.storage;
  if (h.gpu === true) r.gpu = 1;
  else if (h.gpu === 'optional') warn('hostRequirements.gpu "optional" is not supported; the template asks for no GPU');
  else if (typeof h.gpu === 'object') {
    r.gpu = 1;
    warn('hostRequirements.gpu: cores and memory requirements are not supported; the template asks for one GPU');
  }
  for (const k of Object.keys(h)) if (!['cpus', 'memory', 'storage', 'gpu'].includes(k)) warn(`"hostRequirements.${k}" is not supported and was ignored`);
  // hostRequirements are minimums; as defaults they give every box at least that much.
  return Object.keys(r).length > 0 ? r : undefined;
}

interface Recipe {
  from: string;
  packages?: string[];
  run?: string[];
}

/**
 * Reads the subset of Dockerfile syntax that maps onto a build recipe: ARG (to expand FROM), one
 * FROM, and RUN. apt-get installs become `packages`, other RUN lines `run`; everything else (COPY,
 * ENV, USER, …) would change the image in ways a recipe cannot repeat, so it is reported.
 */
export function convertDockerfile(
  text: string,
  path: string,
  buildArgs: Record<string, string>,
  warn: (m: string) => void,
  fail: (m: string) => never,
): Recipe {
  const args: Record<string, string> = {};
  let stage: { from: string; packages: string[]; run: string[] } | undefined;
  for (const { line, text: instr } of logicalLines(text)) {
    const m = /^(\S+)(?:\s+([\s\S]*))?$/.exec(instr)!;
    const op = m[1]!.toUpperCase();
    let rest = (m[2] ?? '').trim();
    const at = `${path} line ${line}`;
    if (op === 'ARG' && !stage) {
      const a = /^([A-Za-z_][A-Za-z0-9_]*)(?:=(.*))?$/.exec(rest);
      if (a) args[a[1]!] = buildArgs[a[1]!] ?? unquote(a[2] ?? '');
      else warn(`${at}: cannot read "ARG ${rest}"; ignored`);
    } else if (op === 'FROM') {
      while (rest.startsWith('--')) {
        const flag = /^(--\S+)\s*/.exec(rest)!;
        warn(`${at}: FROM ${flag[1]} is not supported; ignored`);
        rest = rest.slice(flag[0].length);
      }
      const image = rest.split(/\s+/)[0]!;
      const expanded = image.replace(/\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}|\$([A-Za-z_][A-Za-z0-9_]*)/g, (all, a: string, def: string | undefined, b: string) => {
        const v = args[a ?? b] ?? buildArgs[a ?? b] ?? def;
        return v === undefined || v === '' ? all : v;
      });
      if (expanded.includes('$')) fail(`${at}: FROM ${image} uses a build argument with no value`);
      if (stage) warn(`${at}: multi-stage build; the stages before this FROM (from ${stage.from}) are dropped`);
      stage = { from: normalizeImage(expanded, `${at}: FROM`, warn), packages: [], run: [] };
    } else if (op === 'RUN' && stage) {
      while (rest.startsWith('--')) {
        const flag = /^(--\S+)\s*/.exec(rest)!;
        warn(`${at}: RUN ${flag[1]} is not supported; ignored`);
        rest = rest.slice(flag[0].length);
      }
      if (rest.startsWith('<<')) {
        warn(`${at}: RUN with a heredoc is not supported; ignored`);
        continue;
      }
      const cmd = rest.startsWith('[') ? execFormToShell(rest) : rest;
      if (cmd === undefined || cmd === '') {
        warn(`${at}: cannot read "RUN ${rest}"; ignored`);
        continue;
      }
      const pkgs = aptInstallOnly(cmd);
      if (pkgs) stage.packages.push(...pkgs);
      else stage.run.push(cmd);
    } else if (op === 'RUN' || op === 'ARG') {
      warn(`${at}: ${op} before FROM is not supported; ignored`);
    } else {
      warn(`${at}: ${op} is not supported in a build recipe; ignored`);
    }
  }
  if (!stage) fail(`${path}: no FROM line, so nothing usable remains`);
  const recipe: Recipe = { from: stage!.from };
  if (stage!.packages.length > 0) recipe.packages = [...new Set(stage!.packages)];
  if (stage!.run.length > 0) recipe.run = stage!.run;
  return recipe;
}

/** Joins backslash continuations and drops comments, keeping the first physical line's number. */
function logicalLines(text: string): Array<{ line: number; text: string }> {
  const out: Array<{ line: number; text: string }> = [];
  let current: { line: number; text: string } | undefined;
  text.split(/\r?\n/).forEach((physical, i) => {
    const trimmed = physical.trim();
    if (trimmed.startsWith('#') || (trimmed === '' && !current)) return;
    const continued = /\\\s*$/.test(physical);
    const part = continued ? physical.replace(/\\\s*$/, '') : physical;
    if (current) current.text += ` ${part.trim()}`;
    else current = { line: i + 1, text: part.trim() };
    if (!continued) {
      if (current.text !== '') out.push({ line: current.line, text: current.text.replace(/\s+/g, ' ').trim() });
      current = undefined;
    }
  });
  if (current && current.text.trim() !== '') out.push({ line: current.line, text: current.text.trim() });
  return out;
}

function unquote(s: string): string {
  return /^(["']).*\1$/.test(s) ? s.slice(1, -1) : s;
}

function execFormToShell(json: string): string | undefined {
  try {
    const argv: unknown = JSON.parse(json);
    if (!Array.isArray(argv) || argv.length === 0 || !argv.every((a) => typeof a === 'string')) return undefined;
    return argv.map((a: string) => (/^[A-Za-z0-9_./:=@+-]+$/.test(a) ? a : `'${a.replaceAll("'", `'\\''`)}'`)).join(' ');
  } catch {
    return undefined;
  }
}

const APT_HOUSEKEEPING = [/^apt(-get)? (-\S+ )*update$/, /^apt(-get)? (-\S+ )*(clean|autoclean)$/, /^rm -r?f?r?f? \/var\/lib\/apt\/lists\/?\*?$/, /^export DEBIAN_FRONTEND=\S+$/];
const APT_INSTALL_FLAGS = new Set(['-y', '--yes', '-q', '-qq', '--quiet', '--no-install-recommends', '--no-install-suggests', '--assume-yes']);
const DEBIAN_PACKAGE = /^[a-z0-9][a-z0-9+.-]+(=[A-Za-z0-9.+~:-]+)?$/;

/**
 * The packages of a RUN line that does nothing but apt housekeeping and `apt-get install`, or
 * undefined when it does anything else: then it is kept whole as a `run` command, since splitting
 * a shell line apart would change what it does.
 */
function aptInstallOnly(cmd: string): string[] | undefined {
  if (/[|<>`'"()\\]|\$\(/.test(cmd)) return undefined;
  const pkgs: string[] = [];
  let installs = 0;
  for (let seg of cmd.split(/\s*(?:&&|;)\s*/)) {
    seg = seg.trim().replace(/^(?:[A-Z_][A-Z0-9_]*=\S*\s+)+/, '');
    if (seg === '' || APT_HOUSEKEEPING.some((re) => re.test(seg))) continue;
    const words = seg.split(/\s+/);
    if (words[0] !== 'apt-get' && words[0] !== 'apt') return undefined;
    const rest = words.slice(1).filter((w) => !APT_INSTALL_FLAGS.has(w));
    if (rest[0] !== 'install' || rest.length < 2) return undefined;
    for (const w of rest.slice(1)) {
      if (!DEBIAN_PACKAGE.test(w)) return undefined;
      pkgs.push(w);
    }
    installs++;
  }
  return installs > 0 ? pkgs : undefined;
}
