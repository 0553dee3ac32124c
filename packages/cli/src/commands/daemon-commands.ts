/** Long-running roles: `up` (all-in-one), `server` (control plane), `agent` (node) and `gateway` (access). */
import { mkdirSync, readFileSync } from 'node:fs';
import { hostname } from 'node:os';
import { join, resolve } from 'node:path';
import type { Command } from 'commander';
import pino from 'pino';
import type { NodeAgent } from '@devyard/agent/node-agent';
import type { ImageResolver } from '@devyard/agent/images/image-resolver';
import { createSandboxNode } from '@devyard/agent/sandbox-node';
import { startGateway, type Gateway, type GatewayOptions } from '@devyard/gateway/gateway-process';
import { startGatewayChild, type GatewayChild } from '../gateway-child.js';
import { startControlPlane } from '@devyard/server/control-plane';
import { CliUsageError, configPath, writeConfig } from '../cli-config.js';
import { addOidcFlags, oidcFromFlags } from './oidc-flags.js';
import { addOrgPolicyFlags, orgPolicyFromFlags } from './org-policy-flags.js';

type Logger = pino.Logger;

function requireRoot(what: string): void {
  if (process.getuid?.() !== 0) throw new Error(`${what} needs root: the sandbox runtime creates namespaces, cgroups and mounts (run it with sudo)`);
}

function parseListen(v: string | undefined, fallbackPort: number): { host: string; port: number } {
  if (!v) return { host: '127.0.0.1', port: fallbackPort };
  const m = /^(.*):(\d+)$/.exec(v);
  if (!m) throw new Error(`--listen expects HOST:PORT, got "${v}"`);
  return { host: m[1] || '0.0.0.0', port: Number(m[2]) };
}

interface NetworkFlags {
  bridge?: string;
  subnet?: string;
  /** Runtimes offered, comma-separated (`sandbox,microvm`). */
  runtimes?: string;
  vmBridge?: string;
  vmSubnet?: string;
  vmSnapshot?: string;
  vmZeroFreedMemory?: boolean;
  /** Registry hosts reached over plain HTTP (loopback ones always are). */
  insecureRegistries?: string[];
}


function startAgent(o: { serverUrl: string; token: string; dataDir: string; name?: string; listen?: string; advertise?: string; resyncMs?: number; prebuildCheckMs?: number; log: Logger } & NetworkFlags): { agent: NodeAgent; images: ImageResolver; runtimes(): string[] } {
  const listen = parseListen(o.listen, 0);
  return createSandboxNode({
    serverUrl: o.serverUrl,
    token: o.token,
    dataDir: o.dataDir,
    name: o.name,
    listenHost: listen.host,
    listenPort: listen.port,
    advertiseHost: o.advertise,
    resyncMs: o.resyncMs,
    prebuildCheckMs: o.prebuildCheckMs,
    bridge: o.bridge,
    subnet: o.subnet,
    ...(o.runtimes ? { runtimes: parseRuntimes(o.runtimes) } : {}),
    vmBridge: o.vmBridge,
    vmSubnet: o.vmSubnet,
    ...(o.vmSnapshot ? { vmSnapshotMode: parseSnapshotMode(o.vmSnapshot) } : {}),
    ...(o.vmZeroFreedMemory ? { vmZeroFreedMemory: true } : {}),
    insecureRegistries: o.insecureRegistries,
    log: (msg: string, fields?: object) => o.log.info(fields ?? {}, msg),
  });
}

function parseSnapshotMode(v: string): 'fast' | 'portable' {
  if (v !== 'fast' && v !== 'portable') throw new CliUsageError(`--vm-snapshot is fast or portable, got "${v}"`);
  return v;
}

function parseRuntimes(v: string): Array<'sandbox' | 'microvm'> {
  const list = v.split(',').map((s) => s.trim()).filter(Boolean);
  for (const r of list) if (r !== 'sandbox' && r !== 'microvm') throw new CliUsageError(`unknown runtime "${r}" (known: sandbox, microvm)`);
  if (list[0] !== 'sandbox') throw new CliUsageError('--runtimes must start with sandbox (image builds and prebuilds run in it)');
  return list as Array<'sandbox' | 'microvm'>;
}

/** The runtime flags of `up` and `agent`. */
function runtimeOptions(c: Command): Command {
  return c
    .option('--runtimes <list>', 'runtimes this node offers (default: sandbox, plus microvm when QEMU is installed)')
    .option('--vm-bridge <name>', 'bridge interface for microVMs (default devyardvm0)')
    .option('--vm-subnet <cidr>', 'microVM subnet (default 10.214.0.0/16)')
    .option('--vm-snapshot <mode>', 'how pause stores a microVM: fast (RAM file + device state) or portable (one compressed stream)', 'fast')
    .option('--vm-zero-freed-memory', 'microVM guest kernels zero memory as they free it, so that secrets exited processes held are not in RAM snapshots either (costs: each VM zeroes all its memory at boot, slow under TCG, and its RAM file is fully written)');
}

const portOption = (v: string): number => {
  const n = Number(v);
  if (!Number.isInteger(n) || n < 0 || n > 65535) throw new CliUsageError(`expected a port number (0 picks one), got "${v}"`);
  return n;
};

/** Starts a gateway, with a readable error for a port in use. */
async function startGatewayOn(opts: GatewayOptions, flags: { ssh: string; http: string }): Promise<Gateway> {
  return startGateway(opts).catch((e: Error & { code?: string; port?: number }) => {
    if (e.code === 'EADDRINUSE') {
      const which = e.port === opts.sshPort ? `SSH port ${e.port}` : `HTTP port ${e.port}`;
      throw new Error(`the gateway's ${which} is in use (choose others with ${flags.ssh} and ${flags.http}; 0 picks a free one)`);
    }
    throw e;
  });
}

function onShutdown(fn: () => Promise<void>, note = 'boxes keep running; start again to adopt them'): void {
  let closing = false;
  const handler = (sig: string) => {
    if (closing) process.exit(130);
    closing = true;
    process.stderr.write(`\n${sig}: stopping (${note})\n`);
    fn().then(
      () => process.exit(0),
      (e) => {
        process.stderr.write(`shutdown error: ${(e as Error).message}\n`);
        process.exit(1);
      },
    );
  };
  process.on('SIGINT', () => handler('SIGINT'));
  process.on('SIGTERM', () => handler('SIGTERM'));
}

const PREVIEW_DOMAIN_HELP =
  'previews at <port>--<box>.<domain>, a site apart from the gateway (e.g. gateway devyard.example.com, previews under preview.example-boxes.com; the gateway refuses to start otherwise); "none" serves no previews; default localhost for a gateway at a loopback IP address';

/** `--preview-domain`: a domain, "none" (null: no previews) or absent (the gateway's default). */
function previewDomainFlag(v: string | undefined): string | null | undefined {
  if (v === undefined) return undefined;
  return v === 'none' || v === '' ? null : v;
}

export function registerDaemonCommands(program: Command): void {
  runtimeOptions(program
    .command('up'))
    .description('run the whole platform on this machine (server + agent) on an embedded SQLite store')
    .option('-d, --data-dir <dir>', 'where state, images and boxes live', './.devyard')
    .option('-p, --port <port>', 'API port', (v) => Number(v), 7480)
    .option('--host <host>', 'API listen address', '127.0.0.1')
    .option('--no-prebuild', 'do not build the built-in images in the background at start')
    .option('--bridge <name>', 'bridge interface for box networking (default devyard0)')
    .option('--subnet <cidr>', 'box subnet (default 10.213.0.0/16)')
    .option('--prebuild-check-ms <ms>', 'how often tracked refs are checked for new commits to prebuild', (v) => Number(v), 60_000)
    .option('--ssh-port <port>', 'gateway SSH port (0 picks one)', portOption, 2222)
    .option('--gateway-port <port>', 'gateway HTTP port: browser terminal, previews, CLI tunnels (0 picks one)', portOption, 7100)
    .option('--gateway-url <url>', 'base URL browsers and the CLI reach the gateway at (default http://HOST:GATEWAY-PORT)')
    .option('--preview-domain <domain>', PREVIEW_DOMAIN_HELP)
    .action(async (o) => {
      requireRoot('devyard up');
      const dataDir = resolve(o.dataDir);
      mkdirSync(dataDir, { recursive: true });
      const log = pino({ level: 'info' }, pino.destination({ dest: join(dataDir, 'devyard.log'), mkdir: true, sync: false }));
      const cp = await startControlPlane({ dataDir: join(dataDir, 'server'), port: o.port, host: o.host, logger: log.child({ role: 'server' }), ...oidcFromFlags(o), ...orgPolicyFromFlags(o) }).catch((e: Error & { code?: string }) => {
        if (e.code === 'EADDRINUSE') throw new Error(`port ${o.port} is in use: is another \`devyard up\` running? (choose another with --port)`);
        throw e;
      });
      const { agent, images, runtimes } = startAgent({ serverUrl: cp.url, token: cp.tokens.nodeToken, dataDir: join(dataDir, 'node'), name: hostname(), bridge: o.bridge, subnet: o.subnet, runtimes: o.runtimes, vmBridge: o.vmBridge, vmSubnet: o.vmSubnet, vmSnapshot: o.vmSnapshot, vmZeroFreedMemory: o.vmZeroFreedMemory, prebuildCheckMs: o.prebuildCheckMs, log: log.child({ role: 'agent' }) });
      await agent.start();
      for (let i = 0; i < 200 && !agent.nodeId; i++) await new Promise((r) => setTimeout(r, 25));
      if (!agent.nodeId) process.stderr.write(`warning: the node agent has not registered yet; see ${join(dataDir, 'devyard.log')}\n`);
      let gateway: GatewayChild;
      try {
        // A process of its own, like a separate deployment (see gateway-child.ts); its logs go to ours.
        gateway = await startGatewayChild({
          serverUrl: cp.url,
          tokenFile: join(dataDir, 'server', 'gateway.token'),
          host: o.host,
          sshPort: o.sshPort,
          httpPort: o.gatewayPort,
          publicUrl: o.gatewayUrl as string | undefined,
          previewDomain: previewDomainFlag(o.previewDomain as string | undefined),
          logLine: (line) => line.trim() && log.info({ role: 'gateway', line }, 'gateway log'),
          onRestart: (why) => log.warn({ role: 'gateway' }, why),
        });
      } catch (e) {
        await agent.stop();
        await cp.close();
        log.flush();
        const m = (e as Error).message;
        throw new Error(/in use/.test(m) ? `${m.replace(/--http-port/, '--gateway-port')}` : `the gateway did not start: ${m.replace(/--public-url/g, '--gateway-url')}`);
      }
      const gw = { ...gateway.endpoint };
      const sshPortFlag = gw.sshPort === 22 ? '' : `-p ${gw.sshPort} `;
      const cfgFile = writeConfig({ url: cp.url, token: cp.tokens.adminToken });
      if (o.prebuild) {
        // Build the built-in images ahead of the first create, so `create --wait` is quick.
        void (async () => {
          for (const name of ['tiny', 'base']) {
            try {
              await images.ensure(name);
              log.info({ image: name }, 'image ready');
            } catch (e) {
              log.warn({ image: name, err: (e as Error).message }, 'image prebuild failed; it will be built at first use');
            }
          }
        })();
      }
      process.stdout.write(
        [
          'Devyard is up.',
          `  API       ${cp.url}   (OpenAPI: ${cp.url}/v1/openapi.json)`,
          `  Token     ${cp.tokens.adminToken}`,
          `  CLI       configured in ${cfgFile} (or set DEVYARD_URL and DEVYARD_TOKEN)`,
          `  Gateway   ${gw.url}   (browser terminal: devyard open NAME)`,
          gw.previewDomain
            ? `  Previews  ${new URL(gw.url).protocol}//PORT--NAME.${gw.previewDomain}${new URL(gw.url).port ? `:${new URL(gw.url).port}` : ''}/   (a site of their own: devyard open NAME --port PORT)`
            : '  Previews  off (no --preview-domain)',
          `  SSH       ssh ${sshPortFlag}NAME@${gw.sshHost}   (after \`devyard keys add\`), or: devyard ssh NAME`,
          `  Data      ${dataDir}   (log: ${join(dataDir, 'devyard.log')})`,
          '',
          'Next, in another shell:',
          '  devyard create demo --template base --wait',
          '  devyard exec demo -- uname -a',
          '  devyard ssh demo                 # a shell over SSH; `devyard config-ssh` for `ssh devyard.demo`, VS Code, JetBrains',
          '  devyard open demo                # terminal in the browser',
          '  devyard list',
          '  devyard stop demo --wait; devyard start demo --wait; devyard delete demo --wait',
          ...(runtimes().includes('microvm') ? ['  devyard create vm1 --template base --runtime microvm --wait   # a microVM: its own kernel; pause keeps RAM'] : []),
          '',
          'Ctrl-C stops the control plane, the agent and the gateway; boxes keep running and are adopted on the next `devyard up`.',
          '',
        ].join('\n'),
      );
      onShutdown(async () => {
        await gateway.stop();
        await agent.stop();
        await cp.close();
        log.flush();
      });
    });

  program
    .command('server')
    .description('run the control plane (API, store, reconciler)')
    .option('-d, --data-dir <dir>', 'store and token files', './.devyard/server')
    .option('-p, --port <port>', 'API port', (v) => Number(v), 7480)
    .option('--host <host>', 'listen address', '127.0.0.1')
    .action(async (o) => {
      const log = pino({ level: 'info' });
      const dataDir = resolve(o.dataDir);
      const cp = await startControlPlane({ dataDir, port: o.port, host: o.host, logger: log, ...oidcFromFlags(o), ...orgPolicyFromFlags(o) });
      log.info({ url: cp.url, adminTokenFile: join(dataDir, 'admin.token'), nodeTokenFile: join(dataDir, 'node.token') }, 'devyard server listening');
      onShutdown(() => cp.close());
    });

  runtimeOptions(program
    .command('agent'))
    .description('run the node agent: register this node and run its boxes')
    .requiredOption('--server <url>', 'control plane URL')
    .requiredOption('--token <token>', 'node join token (server data dir: node.token)')
    .option('-d, --data-dir <dir>', 'images, boxes and agent state', './.devyard/node')
    .option('--name <name>', 'node name', hostname())
    .option('--listen <host:port>', 'session endpoint address', '127.0.0.1:0')
    .option('--advertise <host>', 'host name or address the CLI and gateways use to reach this agent')
    .option('--bridge <name>', 'bridge interface for box networking (default devyard0)')
    .option('--subnet <cidr>', 'box subnet (default 10.213.0.0/16)')
    .option('--resync-ms <ms>', 'how often every box is checked against its desired state', (v) => Number(v), 10_000)
    .option('--insecure-registry <host...>', 'registry hosts to reach over plain HTTP (loopback ones always are)')
    .option('--prebuild-check-ms <ms>', 'how often tracked refs are checked for new commits to prebuild', (v) => Number(v), 60_000)
    .action(async (o) => {
      requireRoot('devyard agent');
      const log = pino({ level: 'info' });
      const { agent } = startAgent({ serverUrl: o.server, token: o.token, dataDir: resolve(o.dataDir), name: o.name, listen: o.listen, advertise: o.advertise, bridge: o.bridge, subnet: o.subnet, runtimes: o.runtimes, vmBridge: o.vmBridge, vmSubnet: o.vmSubnet, vmSnapshot: o.vmSnapshot, vmZeroFreedMemory: o.vmZeroFreedMemory, resyncMs: o.resyncMs, prebuildCheckMs: o.prebuildCheckMs, insecureRegistries: o.insecureRegistry, log });
      await agent.start();
      onShutdown(() => agent.stop());
    });

  program
    .command('gateway')
    .description('run an access gateway: SSH, browser terminal, port previews and CLI tunnels into boxes')
    .requiredOption('--server <url>', 'control plane URL')
    .option('--token-file <file>', "gateway token file (the server data dir's gateway.token); or set DEVYARD_GATEWAY_TOKEN")
    .option('--host <host>', 'listen address of both ports', '127.0.0.1')
    .option('--ssh-port <port>', 'SSH port (0 picks one)', portOption, 2222)
    .option('--http-port <port>', 'HTTP port (0 picks one)', portOption, 7100)
    .option('--public-url <url>', 'base URL browsers and the CLI reach the HTTP port at (default http://HOST:PORT)')
    .option('--ssh-public-host <host>', 'host name users give ssh (default: the public URL\'s host)')
    .option('--preview-domain <domain>', PREVIEW_DOMAIN_HELP)
    .action(async (o) => {
      let token = process.env.DEVYARD_GATEWAY_TOKEN?.trim();
      if (o.tokenFile) {
        try {
          token = readFileSync(resolve(o.tokenFile as string), 'utf8').trim();
        } catch (e) {
          throw new CliUsageError(`cannot read the gateway token file ${o.tokenFile} (${(e as { code?: string }).code ?? (e as Error).message})`);
        }
      }
      if (!token) throw new CliUsageError('the gateway needs its token: --token-file <server data dir>/gateway.token, or DEVYARD_GATEWAY_TOKEN');
      const log = pino({ level: 'info' }, pino.destination(2));
      const previewDomain = previewDomainFlag(o.previewDomain as string | undefined);
      // startGateway logs "gateway ready" with both endpoints once the ports are bound and the route table is in.
      const gateway = await startGatewayOn(
        {
          serverUrl: o.server,
          token,
          host: o.host,
          sshPort: o.sshPort,
          httpPort: o.httpPort,
          publicUrl: o.publicUrl,
          sshPublicHost: o.sshPublicHost,
          previewDomain,
          log: (msg, fields) => log.info(fields ?? {}, msg),
        },
        { ssh: '--ssh-port', http: '--http-port' },
      );
      // Run by `devyard up` (an IPC channel to it): end with it, even when it is killed.
      if (process.connected) process.once('disconnect', () => process.exit(0));
      onShutdown(() => gateway.close(), 'open sessions through this gateway end; boxes keep running');
    });

  // Single sign-on (docs/identity.md) is configured on whichever role runs the control plane.
  for (const name of ['up', 'server']) addOrgPolicyFlags(addOidcFlags(program.commands.find((c) => c.name() === name)!));
}

export { configPath };
