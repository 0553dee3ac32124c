/** Box commands: create, list, get, lifecycle verbs, fork, move, exec and events. */
import { randomUUID } from 'node:crypto';
import type { Command } from 'commander';
import type { Box } from '@devyard/api/box-schemas';
import { execInBox } from '@devyard/sdk/exec-client';
import { clientFromEnv } from '../cli-config.js';
import { age, boxDetails, printJson, table } from '../output-format.js';
import { waitForBox, type WaitCheck } from '../wait-for-box.js';

export function registerBoxCommands(program: Command): void {
  program
    .command('create')
    .description('create a box from a template')
    .argument('<name>', 'box name (lowercase letters, digits, dashes)')
    .requiredOption('-t, --template <template>', 'template name (see `devyard templates`)')
    .option('--template-version <n>', 'template version (default: latest)', (v) => Number(v))
    .option('--runtime <runtime>', "runtime (default: the template's)")
    .option('--cpu <cpu>', 'CPU cores, e.g. 2 or 0.5 or 500m')
    .option('--memory <size>', 'memory, e.g. 1GiB')
    .option('--disk <size>', 'disk, e.g. 10GiB')
    .option('-e, --env <KEY=VALUE...>', 'environment variables')
    .option('-w, --wait', 'wait until the box is running')
    .option('--json', 'print the box as JSON')
    .action(async (name: string, o) => {
      const client = clientFromEnv();
      const env = Object.fromEntries(
        ((o.env as string[] | undefined) ?? []).map((kv) => {
          const i = kv.indexOf('=');
          if (i <= 0) throw new Error(`--env expects KEY=VALUE, got "${kv}"`);
          return [kv.slice(0, i), kv.slice(i + 1)];
        }),
      );
      const resources = o.cpu || o.memory || o.disk ? { cpu: o.cpu, memory: o.memory, disk: o.disk } : undefined;
      let box = await client.createBox(
        { name, template: o.template, templateVersion: o.templateVersion, runtime: o.runtime, resources, env: Object.keys(env).length ? env : undefined },
        randomUUID(),
      );
      if (o.wait) box = await waitForBox(client, box);
      if (o.json) printJson(box);
      else if (!o.wait) process.stdout.write(`box ${box.name} created (${box.phase}); follow it with \`devyard get ${box.name}\` or use --wait\n`);
    });

  program
    .command('list')
    .alias('ls')
    .description('list your boxes')
    .option('--json', 'print JSON')
    .action(async (o) => {
      const boxes = await clientFromEnv().listBoxes();
      if (o.json) return printJson(boxes);
      if (boxes.length === 0) return void process.stdout.write('no boxes yet: `devyard create NAME --template base --wait`\n');
      process.stdout.write(
        `${table(
          ['NAME', 'TEMPLATE', 'RUNTIME', 'PHASE', 'DESIRED', 'NODE', 'IP', 'AGE'],
          boxes.map((b) => [b.name, `${b.template}:${b.templateVersion}`, b.runtime, b.phase, b.desiredState, b.node ?? '-', b.ip ?? '-', age(b.createdAt)]),
        )}\n`,
      );
    });

  program
    .command('get')
    .description('show one box')
    .argument('<name>')
    .option('--json', 'print JSON')
    .action(async (name: string, o) => {
      const box = await clientFromEnv().getBox(name);
      if (o.json) printJson(box);
      else process.stdout.write(`${boxDetails(box)}\n`);
    });

  const verbs: Array<['start' | 'stop' | 'pause' | 'resume', string]> = [
    ['start', 'start a stopped box (cold boot)'],
    ['stop', 'stop a box: end its processes, release CPU and memory, keep its disk'],
    ['pause', 'pause a box: freeze its processes, keeping their memory'],
    ['resume', 'resume a paused box'],
  ];
  for (const [verb, description] of verbs) {
    program
      .command(verb)
      .description(description)
      .argument('<name>')
      .option('-w, --wait', 'wait until done')
      .option('--json', 'print the box as JSON')
      .action(async (name: string, o) => {
        const client = clientFromEnv();
        let box = await client.boxVerb(name, verb);
        if (o.wait) box = await waitForBox(client, box);
        if (o.json) printJson(box);
        else if (!o.wait) process.stdout.write(`${verb} requested for ${name} (now ${box.phase})\n`);
      });
  }

  program
    .command('fork')
    .description('clone a running or paused microvm box (memory and disk) into new boxes of yours')
    .argument('<name>', 'the box to fork')
    .argument('<new>', 'name of the new box (with --count N: NEW-1 … NEW-N)')
    .option('-n, --count <n>', 'how many clones (1–16)', (v) => Number(v))
    .option('--owner <user>', "another user's box (shared with you to manage, or you administer the organization)")
    .option('-w, --wait', 'wait until the new boxes are running')
    .option('--json', 'print the new boxes as JSON')
    .action(async (name: string, newName: string, o) => {
      const client = clientFromEnv();
      let boxes = await client.forkBox(name, { name: newName, ...(o.count !== undefined ? { count: o.count as number } : {}) }, o.owner as string | undefined);
      if (o.wait) {
        const done: typeof boxes = [];
        for (const b of boxes) done.push(await waitForBox(client, b));
        boxes = done;
      }
      if (o.json) printJson(boxes);
      else if (!o.wait) for (const b of boxes) process.stdout.write(`box ${b.name} created (${b.phase}); follow it with \`devyard get ${b.name}\` or use --wait\n`);
    });

  program
    .command('move')
    .description('move a paused microvm box to another node (its memory and disks go along; it stays paused there)')
    .argument('<name>')
    .option('--to <node>', 'the node to move it to (default: the scheduler picks one other than its own)')
    .option('--owner <user>', "another user's box (shared with you to manage, or you administer the organization)")
    .option('-w, --wait', 'wait until the box is paused on its new node (or back on its old one if the move failed)')
    .option('--json', 'print the box as JSON')
    .action(async (name: string, o) => {
      const client = clientFromEnv();
      let box = await client.moveBox(name, o.to !== undefined ? { node: o.to as string } : {}, o.owner as string | undefined);
      if (o.wait) box = await waitForBox(client, box, undefined, movedTo(box));
      if (o.json) printJson(box);
      else if (!o.wait) process.stdout.write(`moving ${box.name} from ${box.movingFrom ?? '?'} to ${box.node ?? '?'} (now ${box.phase}); follow it with \`devyard get ${box.name}\` or use --wait\n`);
    });

  program
    .command('delete')
    .alias('rm')
    .description('delete a box and its disk')
    .argument('<name>')
    .option('-w, --wait', 'wait until it is gone')
    .option('--json', 'print the box as JSON')
    .action(async (name: string, o) => {
      const client = clientFromEnv();
      let box = await client.deleteBox(name);
      if (o.wait) box = await waitForBox(client, box);
      if (o.json) printJson(box);
      else if (!o.wait) process.stdout.write(`delete requested for ${name}\n`);
    });

  program
    .command('events')
    .description("show a box's event timeline")
    .argument('<name>')
    .option('-f, --follow', 'keep streaming new events')
    .option('--json', 'print JSON (one object per line with --follow)')
    .action(async (name: string, o) => {
      const client = clientFromEnv();
      const line = (e: { time: string; type: string; phase: string | null; message: string }) =>
        process.stdout.write(`${e.time}  ${e.type.padEnd(16)} ${(e.phase ?? '').padEnd(12)} ${e.message}\n`);
      if (o.follow) {
        for await (const e of client.watchBoxEvents(name)) {
          if (o.json) process.stdout.write(`${JSON.stringify(e)}\n`);
          else line(e);
        }
        return;
      }
      const events = await client.boxEvents(name);
      if (o.json) printJson(events);
      else events.forEach(line);
    });

  program
    .command('exec')
    .description('run a command in a box (exit code passes through)')
    .argument('<name>')
    .argument('<command...>', 'command and arguments (after --)')
    .option('-i, --stdin', 'pass stdin to the command')
    .option('-t, --tty', 'allocate a terminal')
    .option('-w, --workdir <dir>', 'working directory inside the box')
    .option('-e, --env <KEY=VALUE...>', 'environment variables')
    .action(async (name: string, argv: string[], o) => {
      const client = clientFromEnv();
      const tty = Boolean(o.tty);
      const session = await client.createExecSession(name, tty);
      const env = Object.fromEntries(((o.env as string[] | undefined) ?? []).map((kv) => [kv.split('=')[0]!, kv.slice(kv.indexOf('=') + 1)]));
      if (tty && process.env.TERM) env.TERM ??= process.env.TERM;
      const rawMode = tty && process.stdin.isTTY;
      if (rawMode) process.stdin.setRawMode(true);
      const handle = execInBox(session, {
        argv,
        tty,
        cols: process.stdout.columns,
        rows: process.stdout.rows,
        env,
        cwd: o.workdir,
        stdin: o.stdin ? process.stdin : null,
        stdout: process.stdout,
        stderr: process.stderr,
      });
      const onResize = () => handle.resize(process.stdout.columns, process.stdout.rows);
      if (tty) process.stdout.on('resize', onResize);
      try {
        process.exitCode = await handle.exited;
      } finally {
        if (rawMode) process.stdin.setRawMode(false);
        process.stdout.off('resize', onResize);
        process.stdin.pause();
      }
    });
}

/**
 * The end of a move: the box paused on its new node with no move in flight, or back on the node it
 * came from (the new node could not import it; the box's Scheduled condition says why).
 */
function movedTo(moving: Box): WaitCheck {
  return (b) => {
    if (b.desiredState === 'deleted') return { failed: `${b.name}: deleted during the move` };
    if (b.movingFrom !== undefined) return null;
    if (b.node === moving.node) return b.phase === 'paused' && b.observedGeneration >= moving.generation ? 'done' : null;
    const why = b.conditions.find((c) => c.type === 'Scheduled' && c.reason === 'MoveFailed')?.message;
    return { failed: `${b.name}: ${why ?? `the move to ${moving.node ?? '?'} did not complete (see \`devyard events ${b.name}\`)`}` };
  };
}
