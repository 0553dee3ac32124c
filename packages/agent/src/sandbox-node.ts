/**
 * Assembles a node agent on the sandbox runtime with everything it runs boxes with: built-in,
 * OCI and recipe images, prebuilds, the bridge network. Used by `devyard agent`, `devyard up` and
 * the benchmarks, so all three run the same node.
 */
import { existsSync } from 'node:fs';
import { join } from 'node:path';
import { isLoopbackRegistry } from '@devyard/oci/oci-reference';
import { registryCredentialFiles } from '@devyard/oci/registry-credential-files';
import { RegistryClient } from '@devyard/oci/registry-client';
import { BuiltinImageStore } from './images/builtin-image-store.js';
import { ImageResolver } from './images/image-resolver.js';
import { OciImageStore } from './images/oci-image-store.js';
import { RecipeImageBuilder } from './images/recipe-image-builder.js';
import { NodeAgent, type NodeAgentOptions } from './node-agent.js';
import { PrebuildBuilder } from './prebuilds/prebuild-builder.js';
import { DEFAULT_ID_RANGE, SandboxDriver } from './runtime/sandbox/sandbox-driver.js';
import { MicrovmDriver } from './runtime/microvm/microvm-driver.js';
import { RuntimeRouter } from './runtime/runtime-router.js';

export interface SandboxNodeOptions extends Pick<NodeAgentOptions, 'serverUrl' | 'token' | 'name' | 'listenHost' | 'listenPort' | 'advertiseHost' | 'resyncMs' | 'prebuildCheckMs'> {
  /** Everything of the node lives below: images, boxes, prebuilds, agent state. */
  dataDir: string;
  /** Bridge interface (default devyard0); a non-default one gets its own nftables table. */
  bridge?: string;
  /** Box subnet (default 10.213.0.0/16). */
  subnet?: string;
  /** Registry hosts reached over plain HTTP besides loopback ones. */
  insecureRegistries?: string[];
  /** Disk the OCI image cache may use before least-recently-used images are removed (default 20 GiB). */
  imageDiskBudgetBytes?: number;
  /** Boxes are set up from scratch (checkout and hooks in each box) instead of from prebuilds. */
  noPrebuilds?: boolean;
  /**
   * Runtimes the node offers (default: sandbox, plus microvm when QEMU is installed). microVMs
   * get their own bridge and subnet (default devyardvm0, 10.214.0.0/16).
   */
  runtimes?: Array<'sandbox' | 'microvm'>;
  /** microVM network: bridge and subnet. */
  vmBridge?: string;
  vmSubnet?: string;
  /** microVM boot assets cache (default /var/cache/devyard/microvm). */
  vmAssetsDir?: string;
  /** How pause stores microVMs (default fast). */
  vmSnapshotMode?: 'fast' | 'portable';
  /** Guest kernels zero freed memory (see MicrovmDriverOptions.zeroFreedMemory; default off). */
  vmZeroFreedMemory?: boolean;
  log?: (msg: string, fields?: object) => void;
}

export interface SandboxNode {
  agent: NodeAgent;
  images: ImageResolver;
  driver: SandboxDriver;
  /** The microVM driver, when the node offers microvm. */
  microvm: MicrovmDriver | null;
  /** The runtimes the node offers (after the agent started: a runtime that failed to start is left out). */
  runtimes(): string[];
}

export function createSandboxNode(o: SandboxNodeOptions): SandboxNode {
  const log = o.log ?? (() => undefined);
  const registry = new RegistryClient({
    insecure: (host) => isLoopbackRegistry(host, o.insecureRegistries ?? []),
    credentials: registryCredentialFiles(join(o.dataDir, 'secrets')),
  });
  const network = { bridge: o.bridge, subnet: o.subnet, nftTable: o.bridge ? `devyard_${o.bridge}` : undefined };
  const driver = new SandboxDriver({ dataDir: join(o.dataDir, 'sandbox'), network, log });
  const runtimes = o.runtimes ?? (existsSync('/usr/bin/qemu-system-x86_64') ? ['sandbox', 'microvm'] : ['sandbox']);
  const microvm = runtimes.includes('microvm')
    ? new MicrovmDriver({
        dataDir: join(o.dataDir, 'microvm'),
        uidShift: DEFAULT_ID_RANGE.hostId,
        busybox: driver.busyboxPath,
        ...(o.vmAssetsDir ? { assetsDir: o.vmAssetsDir } : {}),
        ...(o.vmSnapshotMode ? { snapshotMode: o.vmSnapshotMode } : {}),
        ...(o.vmZeroFreedMemory ? { zeroFreedMemory: true } : {}),
        network: { ...(o.vmBridge ? { bridge: o.vmBridge, nftTable: `devyard_${o.vmBridge}` } : {}), ...(o.vmSubnet ? { subnet: o.vmSubnet } : {}) },
        log,
      })
    : null;
  const plain = {
    builtin: new BuiltinImageStore({ dataDir: join(o.dataDir, 'images'), log }),
    oci: new OciImageStore({
      dataDir: join(o.dataDir, 'images'),
      registry,
      idShift: DEFAULT_ID_RANGE.hostId,
      diskBudgetBytes: o.imageDiskBudgetBytes ?? 20 * 1024 ** 3,
      // Images of boxes on this node are never collected; the agent exists once this is called.
      inUse: (): Set<string> => agent.imagesInUse(),
      log,
    }),
  };
  // Recipes build on plain images only (a recipe's base is never itself a recipe).
  const recipes = new RecipeImageBuilder({ dataDir: join(o.dataDir, 'sandbox'), driver, base: new ImageResolver(plain), log });
  const images = new ImageResolver({ ...plain, recipes });
  const router = microvm ? new RuntimeRouter([driver, microvm], log) : null;
  const agent: NodeAgent = new NodeAgent({
    serverUrl: o.serverUrl,
    token: o.token,
    dataDir: join(o.dataDir, 'agent'),
    driver: router ?? driver,
    images,
    // Prebuilds live next to the boxes (same filesystem): capturing one is a rename, not a copy.
    prebuilds: o.noPrebuilds ? null : new PrebuildBuilder({ driver, dataDir: join(o.dataDir, 'sandbox'), log }),
    recipes,
    secretsDir: join(o.dataDir, 'secrets'),
    name: o.name,
    listenHost: o.listenHost,
    listenPort: o.listenPort,
    advertiseHost: o.advertiseHost,
    resyncMs: o.resyncMs,
    prebuildCheckMs: o.prebuildCheckMs,
    log,
  });
  return { agent, images, driver, microvm, runtimes: () => (router ? [...router.runtimes] : [driver.name]) };
}
