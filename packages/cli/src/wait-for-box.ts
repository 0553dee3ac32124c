/**
 * `--wait`: follows a box until it reaches the phase its desired state asks for (or what a check
 * says), with a spinner.
 */
import ora from 'ora';
import type { Box } from '@devyard/api/box-schemas';
import { TARGET_PHASE } from '@devyard/core/box-lifecycle';
import { ApiError } from '@devyard/sdk/api-error';
import type { DevyardClient } from '@devyard/sdk/devyard-client';

export class BoxFailedError extends Error {}

/**
 * What a wait looks for, when it is not the phase of the desired state: 'done', a failure (its
 * message), or null to keep waiting.
 */
export type WaitCheck = (b: Box) => 'done' | { failed: string } | null;

export async function waitForBox(client: DevyardClient, box: Box, timeoutMs = 15 * 60_000, check?: WaitCheck): Promise<Box> {
  const target = TARGET_PHASE[box.desiredState];
  const started = Date.now();
  const interactive = process.stderr.isTTY === true;
  const spinner = ora({ text: `${box.name}: ${box.phase}`, stream: process.stderr, isEnabled: interactive });
  spinner.start();
  let lastLine = '';
  const progress = (b: Box, extra = '') => {
    const line = `${b.name}: ${b.phase}${extra ? ` — ${extra}` : ''}`;
    if (line === lastLine) return;
    lastLine = line;
    if (interactive) spinner.text = `${line} (${((Date.now() - started) / 1000).toFixed(1)}s)`;
    else process.stderr.write(`${line}\n`);
  };
  const ac = new AbortController();
  const timer = setTimeout(() => ac.abort(), timeoutMs);
  // Progress messages (scheduling, image build, failures) come from the box's event stream.
  let lastEvent = '';
  const events = (async () => {
    try {
      for await (const e of client.watchBoxEvents(box.name, ac.signal)) if (Date.parse(e.time) >= started - 1000) lastEvent = e.message;
    } catch {}
  })();
  // A deletion can be finalized before the watch is connected: the watch then never mentions the
  // box again (deleted boxes are not listed), so look for it having gone as well.
  const gone =
    target === 'deleted'
      ? (async () => {
          while (!ac.signal.aborted) {
            await new Promise((r) => setTimeout(r, 500));
            try {
              await client.getBox(box.name);
            } catch (e) {
              if (e instanceof ApiError && e.status === 404) return true;
            }
          }
          return false;
        })()
      : null;
  const watchUntilDeleted = async (): Promise<'deleted' | 'aborted'> => {
    for await (const b of client.watchBoxes(ac.signal)) {
      if (b.id !== box.id) continue;
      progress(b, lastEvent);
      if (b.phase === 'deleted') return 'deleted';
    }
    return 'aborted';
  };
  try {
    if (gone) {
      const winner = await Promise.race([gone.then((g) => (g ? 'gone' : 'aborted')), watchUntilDeleted()]);
      if (winner === 'gone' || winner === 'deleted') {
        spinner.succeed(`${box.name}: deleted (${((Date.now() - started) / 1000).toFixed(1)}s)`);
        return { ...box, phase: 'deleted' };
      }
      throw new Error(`timed out waiting for ${box.name} to be deleted`);
    }
    for await (const b of client.watchBoxes(ac.signal)) {
      if (b.id !== box.id) continue;
      progress(b, lastEvent);
      if (b.phase === 'failed') {
        spinner.fail(`${b.name}: failed — ${b.lastError ?? 'unknown reason'}`);
        throw new BoxFailedError(`box ${b.name} failed: ${b.lastError ?? 'unknown reason'}`);
      }
      const verdict = check ? check(b) : b.phase === target && b.observedGeneration >= box.generation ? 'done' : null;
      if (verdict === 'done') {
        spinner.succeed(`${b.name}: ${b.phase} (${((Date.now() - started) / 1000).toFixed(1)}s)`);
        return b;
      }
      if (verdict) {
        spinner.fail(verdict.failed);
        throw new BoxFailedError(verdict.failed);
      }
      if (b.phase === 'deleted' && target === 'deleted') return b;
    }
    throw new Error(ac.signal.aborted ? `timed out waiting for ${box.name} to become ${target}` : 'lost the watch connection to the server');
  } finally {
    clearTimeout(timer);
    ac.abort();
    await events;
    if (spinner.isSpinning) spinner.stop();
  }
}
