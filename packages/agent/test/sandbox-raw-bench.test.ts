/** Runs the raw primitive baselines once (figures printed for docs/benchmarks.md). */
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, expect, test } from 'vitest';
import { BuiltinImageStore } from '@devyard/agent/images/builtin-image-store';
import { median, rawCleanup, rawCreateExec, rawFreezer } from '../../../bench/raw-primitives.js';

let dataDir = '';
afterAll(async () => {
  await rawCleanup();
  if (dataDir) await rm(dataDir, { recursive: true, force: true });
});

test('raw primitives: overlay + netns + veth + crun run; freezer writes', async () => {
  dataDir = await mkdtemp(join(tmpdir(), 'dy-rawb-'));
  const { rootfs } = await new BuiltinImageStore({ dataDir }).ensure('tiny');
  const createExec = await median(7, () => rawCreateExec(rootfs));
  const freezes: number[] = [];
  const thaws: number[] = [];
  for (let i = 0; i < 7; i++) {
    const f = await rawFreezer();
    freezes.push(f.freezeMs);
    thaws.push(f.thawMs);
  }
  const med = (xs: number[]) => xs.sort((a, b) => a - b)[Math.floor(xs.length / 2)]!;
  console.log(`raw create+exec ${createExec.toFixed(1)} ms, freeze ${med(freezes).toFixed(2)} ms, thaw ${med(thaws).toFixed(2)} ms`);
  expect(createExec).toBeGreaterThan(0);
});
