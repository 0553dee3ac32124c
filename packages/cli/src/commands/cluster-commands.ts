/** Node and template commands. */
import type { Command } from 'commander';
import { CreateTemplateRequestSchema } from '@devyard/api/template-schemas';
import { isBuiltinImage, type LifecycleCommand, type Template } from '@devyard/api/template-schemas';
import { formatBytes, formatCpu } from '@devyard/core/resources';
import { clientFromEnv } from '../cli-config.js';
import { age, printJson, resourcesText, table } from '../output-format.js';
import { loadTemplateFile } from '../template-files.js';

export function registerClusterCommands(program: Command): void {
  // Otherwise the program's own --version swallows `templates get NAME --version N` and prints 0.1.0;
  // the program has no other options, so only options placed before a command name change meaning.
  program.enablePositionalOptions();
  const nodes = program
    .command('nodes')
    .description('list nodes with capacity and allocation')
    .option('--json', 'print JSON')
    .action(async (o) => {
      const list = await clientFromEnv().listNodes();
      if (o.json) return printJson(list);
      process.stdout.write(
        `${table(
          ['NAME', 'STATUS', 'RUNTIMES', 'CPU (alloc/cap)', 'MEMORY (alloc/cap)', 'BOXES', 'AGENT'],
          list.map((n) => [
            n.name,
            `${n.status}${n.cordoned ? ',cordoned' : ''}`,
            n.runtimes.join(','),
            `${formatCpu(n.allocated.cpuMillis)}/${formatCpu(n.capacity.cpuMillis)}`,
            `${formatBytes(n.allocated.memoryBytes)}/${formatBytes(n.capacity.memoryBytes)}`,
            n.boxes,
            n.agentUrl,
          ]),
        )}\n`,
      );
    });
  nodes
    .command('cordon')
    .description('stop placing new boxes on a node')
    .argument('<node>')
    .action(async (name: string) => {
      await clientFromEnv().setCordoned(name, true);
      process.stdout.write(`node ${name} cordoned\n`);
    });
  nodes
    .command('uncordon')
    .description('allow placing boxes on a node again')
    .argument('<node>')
    .action(async (name: string) => {
      await clientFromEnv().setCordoned(name, false);
      process.stdout.write(`node ${name} uncordoned\n`);
    });

  const templates = program
    .command('templates')
    .description('list templates (latest versions)')
    .enablePositionalOptions()
    .option('--json', 'print JSON')
    .action(async (o) => {
      const list = await clientFromEnv().listTemplates();
      if (o.json) return printJson(list);
      process.stdout.write(
        `${table(
          ['NAME', 'VERSION', 'IMAGE', 'RUNTIME', 'DEFAULTS', 'AGE', 'DESCRIPTION'],
          list.map((t) => [t.name, t.version, imageText(t), t.runtime, resourcesText(t.defaultResources), age(t.createdAt), t.description]),
        )}\n`,
      );
    });
  // `templates --json get NAME` still sets the parent's --json, so subcommands ask both.
  const wantsJson = (o: { json?: boolean }) => Boolean(o.json ?? templates.opts().json);
  templates
    .command('get')
    .description('show a template: image and pinned digest, repository, hooks, ports, policy')
    .argument('<name>')
    .option('--version <n>', 'a specific version', (v) => Number(v))
    .option('--json', 'print JSON')
    .action(async (name: string, o) => {
      const t = await clientFromEnv().getTemplate(name, o.version);
      if (wantsJson(o)) return printJson(t);
      process.stdout.write(`${templateDetails(t)}\n`);
    });
  templates
    .command('versions')
    .description('list every version of a template')
    .argument('<name>')
    .option('--json', 'print JSON')
    .action(async (name: string, o) => {
      const list = await clientFromEnv().listTemplateVersions(name);
      if (wantsJson(o)) return printJson(list);
      process.stdout.write(
        `${table(['VERSION', 'IMAGE', 'DIGEST', 'RUNTIME', 'DEFAULTS', 'CREATED'], list.map((t) => [t.version, imageText(t), shortDigest(t.imageDigest), t.runtime, resourcesText(t.defaultResources), t.createdAt]))}\n`,
      );
    });
  templates
    .command('prebuilds')
    .description("a template's prebuilds (repository checkout + onCreate + updateContent, once per commit) with their logs")
    .argument('<name>')
    .option('--logs', 'print the log tail of each prebuild')
    .option('--json', 'print JSON')
    .action(async (name: string, o) => {
      const list = await clientFromEnv().listTemplatePrebuilds(name);
      if (wantsJson(o)) return printJson(list);
      if (list.length === 0) return void process.stdout.write(`no prebuilds of ${name} yet (a template with a repository is prebuilt by every node)\n`);
      process.stdout.write(`${table(['ID', 'VERSION', 'NODE', 'COMMIT', 'STATUS', 'FINISHED'], list.map((p) => [p.id.slice(0, 12), p.templateVersion, p.node, p.commit.slice(0, 12), p.status + (p.error ? `: ${p.error.split('\n')[0]}` : ''), p.finishedAt]))}\n`);
      if (o.logs) for (const p of list) process.stdout.write(`\n--- ${p.id.slice(0, 12)} (${p.status})\n${p.logTail.join('\n')}\n`);
    });
  templates
    .command('push')
    .description('publish a new template version from a YAML/JSON template, a devcontainer.json, or a folder with .devcontainer/')
    .argument('<file>')
    .option('--name <name>', 'template name (default: from the file)')
    .option('--dry-run', 'print the request that would be published, publish nothing')
    .option('--repository <url>', 'repository to check out into /workspace (a devcontainer.json does not name one)')
    .option('--ref <ref>', 'branch, tag or commit of --repository')
    .option('--warm-pool <n>', 'boxes to keep ready for fast creates', (v) => Number(v))
    .option('--json', 'print JSON (warnings included)')
    .action(async (file: string, o) => {
      if (o.ref && !o.repository) throw new Error('--ref needs --repository');
      const loaded = loadTemplateFile(file, { name: o.name });
      if (o.repository) loaded.request = { ...loaded.request, repository: { url: o.repository, ...(o.ref ? { ref: o.ref } : {}) } };
      if (o.warmPool !== undefined) loaded.request = { ...loaded.request, warmPoolSize: o.warmPool };
      // The flags may produce an invalid request (bad URL, pool size): validate like the file itself.
      const checked = CreateTemplateRequestSchema.safeParse(loaded.request);
      if (!checked.success) {
        const i = checked.error.issues[0]!;
        throw new Error(`${i.path.join('.') || '(template)'}: ${i.message}`);
      }
      loaded.request = checked.data;
      // Warnings go to stderr so stdout stays the result, JSON included.
      for (const w of loaded.warnings) process.stderr.write(`devyard: warning: ${loaded.file}: ${w}\n`);
      if (o.dryRun) return printJson(wantsJson(o) ? { request: loaded.request, warnings: loaded.warnings } : loaded.request);
      const t = await clientFromEnv().createTemplate(loaded.request);
      if (wantsJson(o)) printJson({ ...t, warnings: loaded.warnings });
      else process.stdout.write(`template ${t.name} v${t.version} published${t.imageDigest ? ` (image pinned to ${t.imageDigest})` : ''}\n`);
    });
}

function shortDigest(d: string | null): string {
  return d ? `${d.slice(0, 19)}…` : '-';
}

function imageText(t: Template): string {
  return t.build ? `build from ${t.build.from}` : t.image;
}

function commandText(c: LifecycleCommand): string {
  if (typeof c === 'string') return c;
  if (Array.isArray(c)) return JSON.stringify(c);
  return Object.entries(c)
    .map(([k, v]) => `${k}: ${typeof v === 'string' ? v : JSON.stringify(v)}`)
    .join('; ');
}

function templateDetails(t: Template): string {
  const gpu = (r: Template['defaultResources']) => (r.gpu > 0 ? `, gpu ${r.gpu}` : '');
  const lines: Array<[string, string]> = [
    ['Name', `${t.name} v${t.version}`],
    ['Description', t.description],
    ['Image', t.build ? `build from ${t.build.from}` : t.image],
    ['Digest', t.imageDigest ?? (isBuiltinImage(t.image) ? '- (built-in image)' : '- (not pinned)')],
  ];
  if (t.build?.packages?.length) lines.push(['Packages', t.build.packages.join(' ')]);
  for (const r of t.build?.run ?? []) lines.push(['Build run', r]);
  lines.push(
    ['Runtime', t.runtime],
    ['Defaults', resourcesText(t.defaultResources) + gpu(t.defaultResources)],
    ['Maximum', resourcesText(t.maxResources) + gpu(t.maxResources)],
    ['Repository', t.repository ? `${t.repository.url}${t.repository.ref ? ` @ ${t.repository.ref}` : ''}${t.repository.credentialsSecret ? ` (credentials: secret ${t.repository.credentialsSecret})` : ''}` : '-'],
    ['User', t.user ?? '-'],
  );
  for (const [hook, cmd] of Object.entries(t.hooks)) if (cmd !== undefined) lines.push([`Hook ${hook}`, commandText(cmd)]);
  lines.push(
    ['Ports', t.ports.length ? t.ports.map((p) => (p.label ? `${p.port} (${p.label})` : String(p.port))).join(', ') : '-'],
    ['Env', Object.keys(t.env).length ? Object.entries(t.env).map(([k, v]) => `${k}=${v}`).join(' ') : '-'],
    ['Idle timeout', t.idleTimeout ?? '-'],
    ['Max lifetime', t.maxLifetime ?? '-'],
    ['Warm pool', String(t.warmPoolSize)],
    ['Created', t.createdAt],
  );
  const w = Math.max(...lines.map(([k]) => k.length));
  return lines.map(([k, v]) => `${k.padEnd(w)}  ${v}`).join('\n');
}
