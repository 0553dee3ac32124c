/** Node and template commands. */
import { readFileSync } from 'node:fs';
import type { Command } from 'commander';
import { CreateTemplateRequestSchema } from '@devyard/api/template-schemas';
import { formatBytes, formatCpu } from '@devyard/core/resources';
import { clientFromEnv } from '../cli-config.js';
import { age, printJson, resourcesText, table } from '../output-format.js';

export function registerClusterCommands(program: Command): void {
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
    .option('--json', 'print JSON')
    .action(async (o) => {
      const list = await clientFromEnv().listTemplates();
      if (o.json) return printJson(list);
      process.stdout.write(
        `${table(
          ['NAME', 'VERSION', 'IMAGE', 'RUNTIME', 'DEFAULTS', 'AGE', 'DESCRIPTION'],
          list.map((t) => [t.name, t.version, t.image, t.runtime, resourcesText(t.defaultResources), age(t.createdAt), t.description]),
        )}\n`,
      );
    });
  templates
    .command('get')
    .description('show a template')
    .argument('<name>')
    .option('--version <n>', 'a specific version', (v) => Number(v))
    .option('--json', 'print JSON')
    .action(async (name: string, o) => {
      const t = await clientFromEnv().getTemplate(name, o.version);
      if (o.json) return printJson(t);
      process.stdout.write(
        [
          `Name         ${t.name} v${t.version}`,
          `Image        ${t.image}`,
          `Runtime      ${t.runtime}`,
          `Defaults     ${resourcesText(t.defaultResources)}`,
          `Maximum      ${resourcesText(t.maxResources)}`,
          `Description  ${t.description}`,
          `Created      ${t.createdAt}`,
        ].join('\n') + '\n',
      );
    });
  templates
    .command('versions')
    .description('list every version of a template')
    .argument('<name>')
    .option('--json', 'print JSON')
    .action(async (name: string, o) => {
      const list = await clientFromEnv().listTemplateVersions(name);
      if (o.json) return printJson(list);
      process.stdout.write(`${table(['VERSION', 'IMAGE', 'RUNTIME', 'DEFAULTS', 'CREATED'], list.map((t) => [t.version, t.image, t.runtime, resourcesText(t.defaultResources), t.createdAt]))}\n`);
    });
  templates
    .command('push')
    .description('publish a new template version from a JSON file')
    .argument('<file>')
    .option('--json', 'print JSON')
    .action(async (file: string, o) => {
      let raw: unknown;
      try {
        raw = JSON.parse(readFileSync(file, 'utf8'));
      } catch (e) {
        throw new Error(`cannot read template ${file}: ${(e as Error).message}`);
      }
      const parsed = CreateTemplateRequestSchema.safeParse(raw);
      if (!parsed.success) {
        const i = parsed.error.issues[0]!;
        throw new Error(`${file}: ${i.path.join('.') || '(top level)'}: ${i.message}`);
      }
      const t = await clientFromEnv().createTemplate(parsed.data);
      if (o.json) printJson(t);
      else process.stdout.write(`template ${t.name} v${t.version} published\n`);
    });
}
