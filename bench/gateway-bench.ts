/**
 * Gateway benchmark (issue 4): what the gateway adds to SSH, measured in one run next to the direct
 * path. Direct = OpenSSH's sshd listening on the box's own address inside the box's network
 * namespace, configured like Debian's default sshd_config (SFTP through the external sftp-server,
 * as the gateway uses too) — what a user would get with an sshd in the box and a route to it;
 * gateway = the same OpenSSH client through `devyard gateway` → node agent → box. Same client, same
 * key, default cipher negotiation on both sides.
 */
import { spawn } from 'node:child_process';
import { mkdir, readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { pct, row } from './bench-support.js';
import { fileURLToPath } from 'node:url';
import { startGatewayChild, type GatewayChild } from '@devyard/cli/gateway-child';
import { startAccessStack, waitFor } from '../packages/gateway/test/access-test-stack.js';

const N = Number(process.env.BENCH_SSH_SAMPLES ?? 20);
const SIZE_MB = Number(process.env.BENCH_SCP_MB ?? 200);

function run(cmd: string, args: string[]): Promise<{ code: number | null; stderr: string }> {
  return new Promise((resolve, reject) => {
    const p = spawn(cmd, args, { stdio: ['ignore', 'ignore', 'pipe'] });
    let stderr = '';
    p.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
    p.on('error', reject);
    p.on('close', (code) => resolve({ code, stderr }));
  });
}

/** ms from spawning an interactive `ssh -tt` to the first byte of output (the shell prompt). */
function firstPrompt(args: string[]): Promise<number> {
  return new Promise((resolve, reject) => {
    const t0 = performance.now();
    const p = spawn('ssh', ['-tt', ...args], { stdio: ['pipe', 'pipe', 'pipe'] });
    let done = false;
    p.stdout.once('data', () => {
      done = true;
      resolve(performance.now() - t0);
      p.kill();
    });
    p.on('close', (code) => !done && reject(new Error(`ssh exited ${code} before a prompt`)));
  });
}

async function timed(fn: () => Promise<{ code: number | null; stderr: string }>): Promise<number> {
  const t0 = performance.now();
  const r = await fn();
  if (r.code !== 0) throw new Error(`command failed (${r.code}): ${r.stderr}`);
  return performance.now() - t0;
}

export async function gatewayBench(): Promise<string> {
  const stack = await startAccessStack('gwbench', 219);
  let sshd: ReturnType<typeof spawn> | undefined;
  let gateway: GatewayChild | undefined;
  try {
    // The box gets the whole machine: a CPU quota on the box's sftp-server would measure the box, not the gateway.
    const box = await stack.runningBox('bench', { cpu: 2, memory: '1GiB' });
    const dir = stack.dir;
    // The gateway as `devyard up` runs it: a process of its own (the stack's in-process one is unused here).
    await writeFile(join(dir, 'gateway.token'), stack.cp.tokens.gatewayToken, { mode: 0o600 });
    gateway = await startGatewayChild({
      serverUrl: stack.cp.url,
      tokenFile: join(dir, 'gateway.token'),
      host: '127.0.0.1',
      sshPort: 0,
      httpPort: 0,
      script: fileURLToPath(new URL('../../../bin/devyard', import.meta.url)),
      logLine: () => undefined,
      onRestart: (why) => console.error(why),
    });
    const knownHosts = join(dir, 'known_hosts');
    const common = ['-F', '/dev/null', '-i', stack.keyFile, '-o', 'IdentitiesOnly=yes', '-o', 'BatchMode=yes', '-o', `UserKnownHostsFile=${knownHosts}`, '-o', 'StrictHostKeyChecking=accept-new', '-o', 'LogLevel=ERROR'];

    // Direct: sshd on the box's address, in the box's network namespace.
    await run('ssh-keygen', ['-q', '-t', 'ed25519', '-N', '', '-f', join(dir, 'sshd_host_key')]);
    await mkdir('/run/sshd', { recursive: true });
    await mkdir(join(dir, 'direct'), { recursive: true });
    const cfg = join(dir, 'sshd_config');
    await writeFile(
      cfg,
      [`ListenAddress ${box.ip}:22`, `HostKey ${join(dir, 'sshd_host_key')}`, `AuthorizedKeysFile ${stack.keyFile}.pub`, 'PermitRootLogin yes', 'UsePAM no', 'StrictModes no', 'PidFile none', 'PasswordAuthentication no', 'Subsystem sftp /usr/lib/openssh/sftp-server', ''].join('\n'),
    );
    sshd = spawn('ip', ['netns', 'exec', stack.node.driver.network.netnsName(box.id), '/usr/sbin/sshd', '-D', '-e', '-f', cfg], { stdio: 'ignore' });
    const direct = [...common, `root@${box.ip}`];
    await waitFor(() => run('ssh', [...direct, 'true']), (r) => r.code === 0, 20_000);
    const gw = [...common, '-p', String(gateway.endpoint.sshPort), 'bench@127.0.0.1'];
    await run('ssh', [...gw, 'true']);

    const src = join(dir, 'payload.bin');
    await run('dd', ['if=/dev/urandom', `of=${src}`, 'bs=1M', `count=${SIZE_MB}`]);
    const scpGw = ['-F', '/dev/null', ...common.slice(2), '-P', String(gateway.endpoint.sshPort)];
    const scpDirect = ['-F', '/dev/null', ...common.slice(2)];
    const mbps = (msTaken: number) => SIZE_MB / (msTaken / 1000);
    const up = { gw: [] as number[], direct: [] as number[] };
    const down = { gw: [] as number[], direct: [] as number[] };
    // Each copy starts with the previous one's writes on disk, so writeback does not land on the next.
    const settled = async <T>(fn: () => Promise<T>) => (await run('sync', []), fn());
    const round = async (into: { up: typeof up; down: typeof down }) => {
      into.up.gw.push(mbps(await settled(() => timed(() => run('scp', [...scpGw, src, 'bench@127.0.0.1:/workspace/payload.bin'])))));
      into.up.direct.push(mbps(await settled(() => timed(() => run('scp', [...scpDirect, src, `root@${box.ip}:${join(dir, 'direct', 'payload.bin')}`])))));
      into.down.gw.push(mbps(await settled(() => timed(() => run('scp', [...scpGw, 'bench@127.0.0.1:/workspace/payload.bin', join(dir, 'back-gw.bin')])))));
      into.down.direct.push(mbps(await settled(() => timed(() => run('scp', [...scpDirect, `root@${box.ip}:${join(dir, 'direct', 'payload.bin')}`, join(dir, 'back-direct.bin')])))));
    };
    for (let i = 0; i < 3; i++) await round({ up, down });

    const gwExec: number[] = [];
    const dirExec: number[] = [];
    const gwPrompt: number[] = [];
    const dirPrompt: number[] = [];
    for (let i = 0; i < N; i++) {
      gwExec.push(await timed(() => run('ssh', [...gw, 'true'])));
      dirExec.push(await timed(() => run('ssh', [...direct, 'true'])));
      gwPrompt.push(await firstPrompt(gw));
      dirPrompt.push(await firstPrompt(direct));
    }


    // The same copy once more after the latency runs' 4×N sessions: both figures are reported.
    const later = { up: { gw: [] as number[], direct: [] as number[] }, down: { gw: [] as number[], direct: [] as number[] } };
    await round(later);
    const same = (await readFile(join(dir, 'back-gw.bin'))).equals(await readFile(src));
    if (!same) throw new Error('the file copied through the gateway differs from the original');

    const added = pct(gwPrompt, 50) - pct(dirPrompt, 50);
    const addedExec = pct(gwExec, 50) - pct(dirExec, 50);
    const med = (xs: number[]) => pct(xs, 50);
    const ratioRow = (what: string, g: number, d: number) => `| ${what} | ${g.toFixed(0)} MB/s | ${d.toFixed(0)} MB/s | ${((g / d) * 100).toFixed(0)}% | ≥ 70% ${g / d >= 0.7 ? '✅' : '❌'} |`;
    const upRatio = med(up.gw) / med(up.direct);
    const downRatio = med(down.gw) / med(down.direct);
    return [
      `## SSH through the gateway (warm box, ${N} samples; scp of ${SIZE_MB} MB, 3 samples each way, then once more after the latency runs)`,
      '',
      'OpenSSH client against `devyard gateway` in its own process, as `devyard up` runs it (ssh2 server → agent WebSocket →',
      '`crun exec` in the box; box with 2 CPUs, 1 GiB) and,',
      "in the same run, against OpenSSH's sshd listening on the box's address in the box's network namespace",
      "(Debian's default SFTP subsystem, the external sftp-server, like the gateway's).",
      '"First prompt" = spawn `ssh -tt` → first byte of output (TCP, key exchange, auth, PTY, shell start).',
      '',
      '| what | p50 | p99 | target |',
      '|---|---|---|---|',
      row('gateway: first shell prompt', gwPrompt),
      row('direct sshd: first shell prompt', dirPrompt),
      `| added by the gateway (p50 difference) | ${added.toFixed(1)} ms | | ≤ 50 ms ${added <= 50 ? '✅' : '❌'} |`,
      row('gateway: `ssh box true` round trip', gwExec),
      row('direct sshd: `ssh box true` round trip', dirExec),
      `| added by the gateway (p50 difference) | ${addedExec.toFixed(1)} ms | | |`,
      '',
      '| scp throughput (median of 3) | gateway | direct | gateway / direct | target |',
      '|---|---|---|---|---|',
      `| upload ${SIZE_MB} MB | ${med(up.gw).toFixed(0)} MB/s | ${med(up.direct).toFixed(0)} MB/s | ${(upRatio * 100).toFixed(0)}% | ≥ 70% ${upRatio >= 0.7 ? '✅' : '❌'} |`,
      `| download ${SIZE_MB} MB | ${med(down.gw).toFixed(0)} MB/s | ${med(down.direct).toFixed(0)} MB/s | ${(downRatio * 100).toFixed(0)}% | ≥ 70% ${downRatio >= 0.7 ? '✅' : '❌'} |`,
      ratioRow(`upload ${SIZE_MB} MB again, after the ${4 * N} latency sessions (1 sample)`, later.up.gw[0]!, later.up.direct[0]!),
      ratioRow(`download ${SIZE_MB} MB again, after the ${4 * N} latency sessions (1 sample)`, later.down.gw[0]!, later.down.direct[0]!),
      '',
    ].join('\n');
  } finally {
    sshd?.kill();
    await gateway?.stop();
    await stack.close();
  }
}
