/**
 * Runs the real `devyard` binary for end-to-end tests: `devyard up` (or `server` + `agent`) in a
 * temp dir with its own bridge and subnet, the CLI against it, and a cleanup that leaves nothing
 * on the host (boxes, netns, veths, cgroups, bridge, nft table, temp files).
 */
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { closeSync, existsSync, mkdtempSync, openSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { SandboxDriver } from '@devyard/agent/runtime/sandbox/sandbox-driver';
import { MicrovmDriver } from '@devyard/agent/runtime/microvm/microvm-driver';

export const REPO = resolve(import.meta.dirname, '../..');
export const BIN = join(REPO, 'bin/devyard');

export interface Harness {
  dir: string;
  dataDir: string;
  env: NodeJS.ProcessEnv;
  bridge: string;
  subnet: string;
  url: string;
  /** The gateway `devyard up` started: its HTTP base URL and SSH port (free ports picked at start). */
  gatewayUrl: string;
  sshPort: number;
  proc: ChildProcess | null;
  /** Log files of the daemons started, oldest first. */
  logs: string[];
}

export function newHarness(tag: string, octet: number): Harness {
  // An interrupted earlier run may have left this harness's bridge and NAT table behind.
  const bridge = `dyt${tag}0`.slice(0, 15);
  spawnSync('ip', ['link', 'del', bridge], { stdio: 'ignore' });
  spawnSync('nft', ['delete', 'table', 'inet', `devyard_${bridge}`], { stdio: 'ignore' });
  const dir = mkdtempSync(join(tmpdir(), `devyard-${tag}-`));
  return {
    dir,
    dataDir: join(dir, '.devyard'),
    env: { ...process.env, DEVYARD_CONFIG: join(dir, 'config.json'), DEVYARD_URL: undefined, DEVYARD_TOKEN: undefined },
    bridge,
    subnet: `10.${octet}.0.0/24`,
    url: '',
    gatewayUrl: '',
    sshPort: 0,
    proc: null,
    logs: [],
  };
}

/**
 * Starts a long-running devyard command and waits until `ready` appears in its output. The output
 * goes to a file, not a pipe: a pipe fills up while a test blocks in a synchronous CLI call, and a
 * daemon blocked on a full stdout pipe would deadlock that very call.
 */
export async function startDaemon(h: Harness, args: string[], ready: RegExp, timeoutMs = 60_000): Promise<{ proc: ChildProcess; match: RegExpMatchArray }> {
  const logFile = join(h.dir, `${args[0]}-${++daemonCount}.log`);
  const fd = openSync(logFile, 'w');
  // host-programs: none (this checkout's devyard CLI)
  const proc = spawn(BIN, args, { cwd: h.dir, env: h.env, stdio: ['ignore', fd, fd] });
  closeSync(fd);
  h.logs.push(logFile);
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const out = readFileSync(logFile, 'utf8');
    const m = ready.exec(out);
    if (m) return { proc, match: m };
    if (proc.exitCode !== null) throw new Error(`devyard ${args[0]} exited with ${proc.exitCode}:\n${out}`);
    if (Date.now() > deadline) throw new Error(`devyard ${args[0]} did not become ready:\n${out}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}
let daemonCount = 0;

/** Everything the daemons of this harness wrote so far (for assertions and failure messages). */
/**
 * Polls `fn` until `ok` holds (an error counts as "not yet"); on timeout the error shows the last
 * value and the tail of the daemons' logs.
 */
export async function waitUntil<T>(h: Harness, fn: () => T | Promise<T>, ok: (v: T) => boolean, ms = 60_000, everyMs = 200): Promise<T> {
  const end = Date.now() + ms;
  for (;;) {
    let v: T | undefined;
    let err: Error | undefined;
    try {
      v = await fn();
      if (ok(v)) return v;
    } catch (e) {
      err = e as Error;
    }
    if (Date.now() > end) throw new Error(`condition not met in ${ms} ms; last: ${err ? err.message : JSON.stringify(v)?.slice(0, 800)}\n${daemonOutput(h).slice(-3000)}`);
    await new Promise((r) => setTimeout(r, everyMs));
  }
}

export function daemonOutput(h: Harness): string {
  return h.logs.map((f) => (existsSync(f) ? readFileSync(f, 'utf8') : '')).join('\n');
}

/**
 * Starts `devyard up` on the harness's network. Sandbox only unless `extraArgs` asks for microVMs
 * (then on a bridge and subnet of the harness's own: `microvmArgs(h)`).
 */
export async function startUp(h: Harness, extraArgs: string[] = ['--runtimes', 'sandbox']): Promise<void> {
  const { proc, match } = await startDaemon(
    h,
    ['up', '--data-dir', h.dataDir, '--port', '0', '--ssh-port', '0', '--gateway-port', '0', '--no-prebuild', '--bridge', h.bridge, '--subnet', h.subnet, '--prebuild-check-ms', '2000', ...extraArgs],
    // The whole banner is one write: API, gateway and SSH lines arrive together.
    /API\s+(http:\/\/\S+)[\s\S]*Gateway\s+(http:\/\/\S+)[\s\S]*SSH\s+ssh -p (\d+) /,
  );
  h.proc = proc;
  h.url = match[1]!;
  h.gatewayUrl = match[2]!;
  h.sshPort = Number(match[3]);
  await new Promise((r) => setTimeout(r, 50));
}

export function kill9(proc: ChildProcess | null): Promise<void> {
  // A child that ended on a signal has exitCode null: it is gone all the same.
  if (!proc || proc.exitCode !== null || proc.signalCode !== null) return Promise.resolve();
  return new Promise((r) => {
    proc.once('exit', () => r());
    proc.kill('SIGKILL');
  });
}

export interface CliResult {
  code: number;
  stdout: string;
  stderr: string;
}

/** Runs the CLI the way a user does. */
export function cli(h: Harness, args: string[], input?: string): CliResult {
  // host-programs: none (this checkout's devyard CLI)
  const r = spawnSync(BIN, args, { cwd: h.dir, env: h.env, input, encoding: 'utf8', timeout: 240_000 });
  return { code: r.status ?? -1, stdout: r.stdout, stderr: r.stderr };
}

/**
 * The CLI without blocking this process: needed while a server the box talks to (such as an
 * in-process git HTTP server) must keep answering during the command.
 */
export function cliAsync(h: Harness, args: string[]): Promise<CliResult> {
  return new Promise((resolvePromise) => {
    // host-programs: none (this checkout's devyard CLI)
    const child = spawn(BIN, args, { cwd: h.dir, env: h.env, stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    child.stdout!.on('data', (d: Buffer) => (stdout += d.toString()));
    child.stderr!.on('data', (d: Buffer) => (stderr += d.toString()));
    const timer = setTimeout(() => child.kill('SIGKILL'), 240_000);
    child.on('close', (code) => {
      clearTimeout(timer);
      resolvePromise({ code: code ?? -1, stdout, stderr });
    });
  });
}

export function cliOk(h: Harness, args: string[]): string {
  const r = cli(h, args);
  if (r.code !== 0) throw new Error(`devyard ${args.join(' ')} exited ${r.code}\nstdout: ${r.stdout}\nstderr: ${r.stderr}\nlog tail: ${daemonOutput(h).slice(-2000)}`);
  return r.stdout;
}

/** `devyard up` flags that add the microVM runtime on a bridge and subnet of the harness's own. */
export function microvmArgs(h: Harness): string[] {
  return ['--runtimes', 'sandbox,microvm', '--vm-bridge', vmBridge(h), '--vm-subnet', h.subnet.replace(/\.0\.0\/24$/, '.1.0/24')];
}

function vmBridge(h: Harness): string {
  return `${h.bridge.slice(0, 13)}v`;
}

/** Removes every box the harness's node still has and the host objects of its network. */
export async function cleanup(h: Harness): Promise<void> {
  await kill9(h.proc);
  // microVMs (if the node ran any): QEMU processes, TAP devices, the VM bridge and its NAT table.
  const vms = new MicrovmDriver({ dataDir: join(h.dataDir, 'node', 'microvm'), uidShift: 100_000, busybox: '/usr/bin/busybox', network: { bridge: vmBridge(h), nftTable: `devyard_${vmBridge(h)}` } });
  for (const b of await vms.list().catch(() => [])) await vms.destroy(b.boxId);
  await vms.network.teardown().catch(() => undefined);
  const driver = new SandboxDriver({ dataDir: join(h.dataDir, 'node', 'sandbox'), network: { bridge: h.bridge, subnet: h.subnet, nftTable: `devyard_${h.bridge}` } });
  for (const b of await driver.list().catch(() => [])) await driver.destroy(b.boxId);
  await driver.teardownHost().catch(() => undefined);
  spawnSync('umount', ['-R', h.dir], { stdio: 'ignore' });
  rmSync(h.dir, { recursive: true, force: true });
}
