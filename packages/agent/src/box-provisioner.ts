/**
 * Turns a desired box into a ready one on this node: image, then either a prebuild clone (COW
 * layers, no rebuild) or a fresh checkout plus onCreate/updateContent in the box, then postCreate
 * (deferred while the box waits in a warm pool) and postStart. Later starts only run postStart.
 *
 * What was done for a box is remembered by the agent (BoxSetupRecord), so a restarted agent
 * neither repeats one-time steps nor forgets the prebuild layers a box was created from.
 */
import type { BoxSetup, DesiredBox, LifecycleCommand } from '@devyard/api/node-schemas';
import type { BuildRecipe } from './images/recipe-image-builder.js';
import type { Prebuild, PrebuildBuilder, PrebuildRequest } from './prebuilds/prebuild-builder.js';
import type { BoxRuntimeSpec, RuntimeDriver } from './runtime/runtime-driver.js';
import type { NodeSecretFiles } from './workspace/node-secret-files.js';
import { checkoutRepository, repoNameFromUrl, type GitCredentials } from './workspace/repository-checkout.js';
import { runHook } from './workspace/lifecycle-hooks.js';

/** What a node remembers about a box's one-time setup. */
export interface BoxSetupRecord {
  /** Image root filesystem and digest the box was created on. */
  image: { rootfs: string; digest: string };
  /** Prebuild layers the box was cloned from, if any. */
  layers?: string[];
  /** Prebuild workspace base, if any. */
  workspaceBase?: string;
  /** Directory of the checkout under /workspace. */
  repoName?: string;
  /** Commit checked out (or the prebuild's). */
  commit?: string;
  /** Whether postCreate ran (false while the box waits in a warm pool). */
  postCreateDone: boolean;
  /** Hostname the box was given (changes when a pool box is claimed under a new name). */
  hostname: string;
}

/** Driver capabilities the provisioner needs beyond the common interface. */
export interface ProvisioningDriver extends RuntimeDriver {
  /** Runtimes offered when the driver routes to several (a node with sandbox and microvm); default [name]. */
  readonly runtimes?: string[];
  /** Host paths of the box's disk state, for a host-side checkout. */
  boxHostPaths?(boxId: string): { workspace: string; owner: { uid: number; gid: number } };
  /** Renames the box's host name without restarting it. */
  setHostname?(boxId: string, name: string): Promise<void>;
  /**
   * Runs `fn` with the box's workspace reachable on the host (a microVM's volume is a disk image:
   * mounted for the call); drivers without it expose {@link boxHostPaths} permanently.
   */
  withWorkspaceOnHost?<T>(boxId: string, fn: (paths: { workspace: string; owner: { uid: number; gid: number } }) => Promise<T>): Promise<T>;
  /**
   * Tells a node with several runtimes which one a box is for, before anything of it exists (its
   * secrets are written before its first start): calls for the box then go to that runtime.
   */
  assign?(boxId: string, runtime: string): void;
  /** Whether boxes of this runtime can be cloned from prebuilds (layered roots); default yes. */
  canRunPrebuilds?(runtime: string): boolean;
  /** Clones a running or paused box (memory and disks) into a new running box with its own identity. */
  fork?(sourceBoxId: string, spec: BoxRuntimeSpec): Promise<void>;
}

export interface ProvisionerDeps {
  driver: ProvisioningDriver;
  images: { ensure(name: string | BuildRecipe, onProgress?: (line: string) => void): Promise<{ digest: string; rootfs: string }> };
  prebuilds: PrebuildBuilder | null;
  pids: number;
  log: (msg: string, fields?: Record<string, unknown>) => void;
  /** Where named repository credentials come from. */
  secrets?: NodeSecretFiles;
  /** The newest ready prebuild of a template version for this image, if the node has one. */
  currentPrebuild?: (templateName: string, templateVersion: number, imageDigest: string) => Prebuild | undefined;
  /** Told about every prebuild a box was cloned from (built now or reused). */
  onPrebuild?: (box: DesiredBox, prebuild: Prebuild, imageDigest: string) => void;
}

/** The image a box (or prebuild) runs: its template's image, or the recipe built on it. */
export function imageOf(image: string, s: BoxSetup): string | BuildRecipe {
  return s.build ? { from: image, packages: s.build.packages, run: s.build.run } : image;
}

/** The prebuild a box setup asks for: repository + onCreate + updateContent, template env only. */
export function prebuildRequest(image: { rootfs: string; digest: string }, s: BoxSetup, credentials?: GitCredentials): PrebuildRequest {
  if (!s.repository) throw new Error('a prebuild needs a repository');
  return {
    image: { rootfs: image.rootfs, digest: image.digest },
    repository: { url: s.repository.url, ...(s.repository.ref ? { ref: s.repository.ref } : {}), ...(credentials ? { credentials } : {}) },
    hooks: { ...(s.onCreate ? { onCreate: s.onCreate } : {}), ...(s.updateContent ? { updateContent: s.updateContent } : {}) },
    env: s.templateEnv,
  };
}

/** A step of the setup failed; `retryable` setups are undone so a retry starts clean. */
export class ProvisioningError extends Error {
  constructor(
    message: string,
    /** Where it failed: image, prebuild, checkout, a hook name. */
    readonly stage: string,
  ) {
    super(message);
  }
}

export class BoxProvisioner {
  constructor(private readonly deps: ProvisionerDeps) {}

  spec(box: DesiredBox, setup: Pick<BoxSetupRecord, 'image' | 'layers' | 'workspaceBase'>): BoxRuntimeSpec {
    return {
      boxId: box.boxId,
      name: box.name,
      runtime: box.runtime,
      imageRootfs: setup.image.rootfs,
      imageDigest: setup.image.digest,
      resources: { cpuMillis: box.resources.cpuMillis, memoryBytes: box.resources.memoryBytes, pids: this.deps.pids, diskBytes: box.resources.diskBytes },
      env: box.env,
      ...(setup.layers ? { layers: setup.layers } : {}),
      ...(setup.workspaceBase ? { workspaceBase: setup.workspaceBase } : {}),
      // A user's box: it gets a secrets directory (prebuild and image build boxes never do).
      secrets: true,
    };
  }

  /** Creates and starts a box that does not exist on this node yet, with its whole setup. */
  async provision(box: DesiredBox, progress: (line: string) => void, opts: { start: boolean }): Promise<BoxSetupRecord> {
    const d = this.deps.driver;
    const s = box.setup;
    const image = await this.stage('image', () => this.deps.images.ensure(imageOf(box.image, s), progress));
    let prebuild: Prebuild | null = null;
    const credentials = await this.stage('credentials', () => this.credentials(s));
    if (s.repository && s.prebuild && this.deps.prebuilds && (d.canRunPrebuilds?.(box.runtime) ?? true)) {
      // The newest prebuild of this template version on this node, kept current in the
      // background; only when there is none yet does the create resolve the ref and build.
      const current = this.deps.currentPrebuild?.(box.templateName, box.templateVersion, image.digest);
      prebuild =
        current ??
        (await this.stage('prebuild', () => this.deps.prebuilds!.build(prebuildRequest(image, s, credentials), (line) => progress(`prebuild: ${line}`))));
      this.deps.onPrebuild?.(box, prebuild, image.digest);
      progress(current || prebuild.reused ? `using prebuild ${prebuild.id.slice(0, 12)} (${prebuild.commit.slice(0, 12)})` : `prebuild ${prebuild.id.slice(0, 12)} built`);
    }
    const setup: BoxSetupRecord = {
      image: { rootfs: image.rootfs, digest: image.digest },
      ...(prebuild ? { layers: [prebuild.rootfsLayer], workspaceBase: prebuild.workspaceBase, repoName: prebuild.repoName, commit: prebuild.commit } : {}),
      postCreateDone: false,
      hostname: box.name,
    };
    const spec = this.spec(box, setup);
    try {
      await d.create(spec);
      if (s.repository && !prebuild) {
        const onHost = d.withWorkspaceOnHost?.bind(d) ?? (async <T>(id: string, fn: (p: { workspace: string; owner: { uid: number; gid: number } }) => Promise<T>) => {
          if (!d.boxHostPaths) throw new ProvisioningError(`runtime ${d.name} cannot check out repositories`, 'checkout');
          return fn(d.boxHostPaths(id));
        });
        const ref = s.repository.ref ?? undefined;
        const co = await this.stage('checkout', () =>
          onHost(box.boxId, (paths) =>
            checkoutRepository({
              url: s.repository!.url,
              ...(ref ? { ref } : {}),
              ...(credentials ? { credentials } : {}),
              workspaceDir: paths.workspace,
              owner: paths.owner,
              onProgress: (l) => progress(`checkout: ${l}`),
            }),
          ),
        );
        setup.repoName = co.name;
        setup.commit = co.commit;
      }
      if (!opts.start && !prebuild && !s.onCreate && !s.updateContent) return setup;
      await d.start(spec);
      if (!prebuild) {
        await this.hook(box, setup, 'onCreate', s.onCreate, progress);
        await this.hook(box, setup, 'updateContent', s.updateContent, progress);
      }
      if (!box.pooled) {
        await this.hook(box, setup, 'postCreate', s.postCreate, progress);
        setup.postCreateDone = true;
      }
      await this.hook(box, setup, 'postStart', s.postStart, progress);
      if (!opts.start) await d.stop(box.boxId);
      return setup;
    } catch (e) {
      // A box whose setup failed holds nothing of the user's yet: remove it so a retry starts clean.
      await d.destroy(box.boxId).catch(() => undefined);
      throw e;
    }
  }

  /** The repository credentials the setup names, from the node's secret files. */
  async credentials(s: BoxSetup): Promise<GitCredentials | undefined> {
    const name = s.repository?.credentialsSecret;
    if (!name) return undefined;
    if (!this.deps.secrets) throw new Error(`secret "${name}" cannot be resolved: this node has no secret files configured`);
    return this.deps.secrets.gitCredentials(name);
  }

  /**
   * Creates a box as a clone of another box of this node (`devyard fork`): its setup is the
   * source's (the clone carries the source's checkout and hook results), under its own name.
   */
  async fork(box: DesiredBox, source: BoxSetupRecord): Promise<BoxSetupRecord> {
    const d = this.deps.driver;
    if (!d.fork) throw new ProvisioningError(`runtime ${d.name} cannot fork boxes`, 'fork');
    const setup: BoxSetupRecord = { ...source, postCreateDone: true, hostname: box.name };
    await this.stage('fork', () => d.fork!(box.forkOf!, this.spec(box, setup)));
    return setup;
  }

  /** A cold start of a box that was set up before: only postStart runs. */
  async start(box: DesiredBox, setup: BoxSetupRecord, progress: (line: string) => void): Promise<void> {
    await this.deps.driver.start(this.spec(box, setup));
    await this.hook(box, setup, 'postStart', box.setup.postStart, progress);
  }

  /** Brings a running box up to date with what changed while it ran: a claim out of a warm pool. */
  async settle(box: DesiredBox, setup: BoxSetupRecord, progress: (line: string) => void): Promise<boolean> {
    let changed = false;
    if (setup.hostname !== box.name && this.deps.driver.setHostname) {
      await this.deps.driver.setHostname(box.boxId, box.name);
      setup.hostname = box.name;
      changed = true;
    }
    if (!box.pooled && !setup.postCreateDone) {
      await this.hook(box, setup, 'postCreate', box.setup.postCreate, progress);
      setup.postCreateDone = true;
      changed = true;
    }
    return changed;
  }

  private async hook(box: DesiredBox, setup: BoxSetupRecord, name: string, command: LifecycleCommand | null, progress: (line: string) => void): Promise<void> {
    if (!command) return;
    progress(`running ${name}`);
    await this.stage(name, () =>
      runHook(this.deps.driver, box.boxId, {
        name,
        command,
        env: box.env,
        ...(setup.repoName ? { repoName: setup.repoName } : box.setup.repository ? { repoName: repoNameFromUrl(box.setup.repository.url) } : {}),
        onLine: (l) => progress(`${name}: ${l.line}`),
      }),
    );
  }

  private async stage<T>(stage: string, fn: () => Promise<T>): Promise<T> {
    try {
      return await fn();
    } catch (e) {
      if (e instanceof ProvisioningError) throw e;
      throw new ProvisioningError(`${stage} failed: ${(e as Error).message}`, stage);
    }
  }
}
