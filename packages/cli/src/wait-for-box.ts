/** `--wait`: follows a box until it reaches the phase its desired state asks for, with a spinner. */
import ora from 'ora';
import type { Box } from '@devyard/api/box-schemas';
import { TARGET_PHASE } from '@devyard/core/box-lifecycle';
import type { DevyardClient } from '@devyard/sdk/devyard-client';

export class BoxFailedError extends Error {}

export async function waitForBox(client: DevyardClient, box: Box, timeoutMs = 15 * 60_000): Promise<Box> {
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
  try {
    for await (const b of client.watchBoxes(ac.signal)) {
      if (b.id !== box.id) continue;
      progress(b, lastEvent);
      if (b.phase === 'failed') {
        spinner.fail(`${b.name}: failed — ${b.lastError ?? 'unknown reason'}`);
        throw new BoxFailedError(`box ${b.name} failed: ${b.lastError ?? 'unknown reason'}`);
      }
      if (b.phase === target && b.observedGeneration >= box.generation) {
        spinner.succeed(`${b.name}: ${b.phase} (${((Date.now() - started) / 1000).toFixed(1)}s)`);
        return b;
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
