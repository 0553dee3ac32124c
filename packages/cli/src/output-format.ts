/** Human output: borderless tables and short units; `--json` bypasses all of it. */
import Table from 'cli-table3';
import type { Box } from '@devyard/api/box-schemas';
import { formatBytes, formatCpu } from '@devyard/core/resources';

export function table(head: string[], rows: Array<Array<string | number>>): string {
  const t = new Table({
    head,
    chars: { top: '', 'top-mid': '', 'top-left': '', 'top-right': '', bottom: '', 'bottom-mid': '', 'bottom-left': '', 'bottom-right': '', left: '', 'left-mid': '', mid: '', 'mid-mid': '', right: '', 'right-mid': '', middle: '  ' },
    style: { head: [], border: [], 'padding-left': 0, 'padding-right': 0 },
  });
  t.push(...rows.map((r) => r.map(String)));
  return t.toString();
}

export function printJson(value: unknown): void {
  process.stdout.write(`${JSON.stringify(value, null, 2)}\n`);
}

export function resourcesText(r: { cpuMillis: number; memoryBytes: number; diskBytes: number }): string {
  return `cpu ${formatCpu(r.cpuMillis)}, memory ${formatBytes(r.memoryBytes)}, disk ${formatBytes(r.diskBytes)}`;
}

export function age(iso: string, now = Date.now()): string {
  const s = Math.max(0, Math.round((now - Date.parse(iso)) / 1000));
  if (s < 60) return `${s}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m`;
  if (s < 86400) return `${Math.floor(s / 3600)}h`;
  return `${Math.floor(s / 86400)}d`;
}

/** Which boundary separates the box from other tenants' code on its node. */
function isolationText(runtime: string): string {
  if (runtime === 'microvm') return 'microVM: its own guest kernel, a hardware boundary';
  if (runtime === 'sandbox') return "sandbox: namespaces and cgroups on the node's kernel (trusted organizations only)";
  return runtime;
}

export function boxDetails(b: Box): string {
  const lines = [
    ['Name', b.name],
    ['Template', `${b.template} v${b.templateVersion} (image ${b.image})`],
    ['Runtime', b.runtime],
    ['Isolation', isolationText(b.runtime)],
    ...(b.forkOf ? [['Fork of', b.forkOf]] : []),
    ['State', `${b.phase} (desired: ${b.desiredState})`],
    ['Node', b.node ?? '-'],
    ...(b.movingFrom ? [['Moving from', b.movingFrom]] : []),
    ['IP', b.ip ?? '-'],
    ['Resources', resourcesText(b.resources)],
    ['Pause', `${b.pause.keepsMemory ? 'keeps process memory' : 'does not keep memory'}: ${b.pause.description}`],
    ['Generation', `${b.generation} (observed ${b.observedGeneration})`],
    ['Created', `${b.createdAt} (${age(b.createdAt)} ago)`],
    ['ID', b.id],
  ];
  if (b.lastError) lines.push(['Last error', b.lastError]);
  for (const c of b.conditions) lines.push([`Condition ${c.type}`, `${c.status} ${c.reason}: ${c.message}`]);
  const w = Math.max(...lines.map(([k]) => k!.length));
  return lines.map(([k, v]) => `${k!.padEnd(w)}  ${v}`).join('\n');
}
