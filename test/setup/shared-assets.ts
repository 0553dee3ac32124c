/**
 * Global set-up of the tiers that run real boxes (host and e2e): before their first test, build
 * what many tests boot from and a node keeps per host — the Debian `base` bootstrap (about a minute
 * from the mirror) and the microVM assets (guest kernel download, guest agent compile, initramfs,
 * tools disk, accelerator probe). On a cold cache this takes minutes; here it has no test's time
 * limit and prints a progress line, and each test then finds the host's caches warm, as a node
 * does after its first box. Nothing here depends on an earlier run.
 */
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { BuiltinImageStore } from '@devyard/agent/images/builtin-image-store';
import { prepareMicrovmHost } from '@devyard/agent/runtime/microvm/microvm-host';

/** Progress on stderr: every step, and at most one line per 10 s of a chatty one (debootstrap). */
function progressPrinter(prefix = ''): (line: string) => void {
  let last = 0;
  let lastStep = '';
  return (line: string) => {
    const step = line.split(':')[0] ?? '';
    const now = Date.now();
    if (step !== lastStep || now - last > 10_000) {
      process.stderr.write(`[shared assets] ${prefix}${line.slice(0, 160)}\n`);
      last = now;
      lastStep = step;
    }
  };
}

export default async function setup(): Promise<void> {
  const t0 = Date.now();
  process.stderr.write('[shared assets] preparing the base bootstrap and the microVM assets (minutes on a cold cache, seconds when warm)\n');
  const scratch = await mkdtemp(join(tmpdir(), 'dy-shared-assets-'));
  try {
    const bootstrap = await new BuiltinImageStore({ dataDir: scratch }).ensureBaseBootstrap(progressPrinter());
    process.stderr.write(`[shared assets] base bootstrap: ${bootstrap.dir}\n`);
    const vmLog = progressPrinter('microvm: ');
    const host = await prepareMicrovmHost({ busybox: '/usr/bin/busybox', log: (msg, fields) => vmLog(`${msg} ${fields ? JSON.stringify(fields) : ''}`) });
    process.stderr.write(`[shared assets] microVM: guest kernel ${host.assets.kernel.release}, ${host.accel.accel} (${host.accel.reason})\n`);
  } finally {
    await rm(scratch, { recursive: true, force: true });
  }
  process.stderr.write(`[shared assets] ready in ${((Date.now() - t0) / 1000).toFixed(1)} s\n`);
}
