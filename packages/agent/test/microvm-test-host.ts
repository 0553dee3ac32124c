/**
 * What the microVM tests share: a driver on a fresh temp data dir with its own bridge, subnet and
 * nft table (never a live node's), the `tiny` image, a box spec, a shell command in a VM, and the
 * processes still running for a data dir (there must be none after a test's clean-up).
 */
import { readdirSync, readFileSync } from 'node:fs';
import { chmod, mkdtemp } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { BuiltinImageStore, type BuiltImage } from '@devyard/agent/images/builtin-image-store';
import type { BoxRuntimeSpec, ExecProcess } from '@devyard/agent/runtime/runtime-driver';
import { MicrovmDriver, type MicrovmDriverOptions } from '@devyard/agent/runtime/microvm/microvm-driver';

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** A started driver and the image its boxes boot. */
export interface VmTestHost {
  dataDir: string;
  opts: MicrovmDriverOptions;
  driver: MicrovmDriver;
  image: BuiltImage;
}

/** A driver on a new temp data dir (mode 0711, as a node's) with network names of `tag` and `subnet`. */
export async function startVmTestHost(tag: string, subnet: string, vethPrefix: string): Promise<VmTestHost> {
  const suffix = Math.random().toString(36).slice(2, 6);
  const dataDir = await mkdtemp(join(tmpdir(), `dy-${tag}-`));
  await chmod(dataDir, 0o711);
  const opts: MicrovmDriverOptions = {
    dataDir,
    uidShift: 100_000,
    busybox: '/usr/bin/busybox',
    network: { bridge: `dy${tag}${suffix}`.slice(0, 15), subnet, nftTable: `devyard_${tag}test_${suffix}`, vethPrefix },
  };
  const driver = new MicrovmDriver(opts);
  await driver.init();
  const image = await new BuiltinImageStore({ dataDir }).ensure('tiny');
  return { dataDir, opts, driver, image };
}

/** A 1-vCPU, 256 MiB box on `image`, named after its id. */
export function vmBoxSpec(boxId: string, image: BuiltImage): BoxRuntimeSpec {
  return {
    boxId,
    name: boxId.replace(/_/g, '-'),
    runtime: 'microvm',
    imageRootfs: image.rootfs,
    imageDigest: image.digest,
    resources: { cpuMillis: 1000, memoryBytes: 256 * 1024 ** 2, pids: 256, diskBytes: 1024 ** 3 },
    env: {},
  };
}

/** Runs `sh -c script` in a VM and collects its output. */
export async function runInVm(driver: MicrovmDriver, boxId: string, script: string): Promise<{ code: number; out: string; err: string }> {
  const p: ExecProcess = await driver.exec(boxId, { argv: ['sh', '-c', script] });
  let out = '';
  let err = '';
  p.stdout.on('data', (b: Buffer) => (out += b.toString()));
  p.stderr.on('data', (b: Buffer) => (err += b.toString()));
  p.stdin.end();
  const code = await p.exited;
  await sleep(20);
  return { code, out, err };
}

/** Pids whose command line names `dir` (QEMU of a data dir's boxes, and their helpers). */
export function processesUnder(dir: string): string[] {
  return readdirSync('/proc')
    .filter((p) => /^\d+$/.test(p))
    .filter((p) => {
      try {
        return readFileSync(`/proc/${p}/cmdline`, 'utf8').includes(dir);
      } catch {
        return false; // gone meanwhile
      }
    });
}
