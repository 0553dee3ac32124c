/** Shared pieces of the benchmarks: percentiles, a watch-driven phase waiter, `exec true`. */
import { PassThrough } from 'node:stream';
import type { Box } from '@devyard/api/box-schemas';
import type { DevyardClient } from '@devyard/sdk/devyard-client';
import { execInBox } from '@devyard/sdk/exec-client';

export function pct(xs: number[], p: number): number {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.min(s.length - 1, Math.max(0, Math.ceil((p / 100) * s.length) - 1))]!;
}

export const ms = (v: number) => `${v.toFixed(1)} ms`;

/** A markdown table row: p50 and p99 of the samples, the target, and whether p50 meets it. */
export function row(what: string, xs: number[], target = '', ok?: boolean): string {
  return `| ${what} | ${ms(pct(xs, 50))} | ${ms(pct(xs, 99))} | ${target}${ok === undefined ? '' : ok ? ' ✅' : ' ❌'} |`;
}

/**
 * One box watch for a whole benchmark: `phase(name, p)` resolves when the box reaches phase p,
 * so waiting costs no polling and the latency measured is what a watching client sees.
 */
export class PhaseWaiter {
  private readonly waiters = new Map<string, { phase: string; resolve: (b: Box) => void; reject: (e: Error) => void }>();
  private readonly ac = new AbortController();

  constructor(client: DevyardClient) {
    void (async () => {
      for await (const b of client.watchBoxes(this.ac.signal)) {
        const w = this.waiters.get(b.name);
        if (w && b.phase === w.phase) {
          this.waiters.delete(b.name);
          w.resolve(b);
        } else if (w && b.phase === 'failed') {
          this.waiters.delete(b.name);
          w.reject(new Error(`${b.name} failed: ${b.lastError}`));
        }
      }
    })().catch((e) => {
      if (!this.ac.signal.aborted) console.error(e);
    });
  }

  phase(name: string, phase: string, timeoutMs = 120_000): Promise<Box> {
    return new Promise<Box>((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`${name} did not reach ${phase} within ${timeoutMs / 1000} s`)), timeoutMs);
      this.waiters.set(name, {
        phase,
        resolve: (b) => (clearTimeout(timer), resolve(b)),
        reject: (e) => (clearTimeout(timer), reject(e)),
      });
    });
  }

  close(): void {
    this.ac.abort();
  }
}

export async function execTrue(client: DevyardClient, name: string): Promise<void> {
  const session = await client.createExecSession(name);
  const code = await execInBox(session, { argv: ['true'], stdout: new PassThrough(), stderr: new PassThrough() }).exited;
  if (code !== 0) throw new Error(`exec true in ${name} exited ${code}`);
}
