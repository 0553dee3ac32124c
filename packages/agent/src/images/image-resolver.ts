/**
 * One image provider for the agent: built-in names (`tiny`, `base`) go to the built-in store,
 * registry references (`host[:port]/repo[:tag][@digest]`) to the OCI store. The two namespaces
 * cannot collide because an OCI reference must name its registry host. A build recipe (an object,
 * not a name) goes to the recipe builder, which resolves its `from` through a resolver of its own.
 */
import { DomainError } from '@devyard/core/domain-error';
import { isOciReference } from '@devyard/oci/oci-reference';
import type { BuiltinImageName, BuiltinImageStore } from './builtin-image-store.js';
import type { OciImageStore } from './oci-image-store.js';
import type { BuildRecipe, RecipeImageBuilder } from './recipe-image-builder.js';

/** An image ready to use, whichever store it came from. */
export interface ResolvedImageRoot {
  /** Image name or reference, as listed. */
  name: string;
  /** Content digest (`sha256:…`). */
  digest: string;
  /** Root filesystem directory (read-only use). */
  rootfs: string;
}

/** Options of {@link ImageResolver}. */
export interface ImageResolverOptions {
  /** Store of the built-in images. */
  builtin: Pick<BuiltinImageStore, 'ensure' | 'list' | 'knownImages'>;
  /** Store of registry images. */
  oci: Pick<OciImageStore, 'ensure' | 'list'>;
  /**
   * Builder of recipe images; without it recipes are refused. Give it a resolver without recipes
   * as its `base`, so a recipe's `from` is always a plain image.
   */
  recipes?: Pick<RecipeImageBuilder, 'ensure' | 'list'>;
}

/** Implements the agent's `ImageProvider` over both stores. */
export class ImageResolver {
  constructor(private readonly opts: ImageResolverOptions) {}

  /** Returns the image's root filesystem, building or pulling it (or building the recipe) first when missing. */
  async ensure(name: string | BuildRecipe, onProgress?: (line: string) => void): Promise<ResolvedImageRoot> {
    if (typeof name !== 'string') {
      if (!this.opts.recipes) throw new DomainError('invalid-input', 'this node does not build images from recipes', { field: 'build' });
      return this.opts.recipes.ensure(name, onProgress);
    }
    if (isOciReference(name)) return this.opts.oci.ensure(name, onProgress);
    const known = this.opts.builtin.knownImages();
    if (known.includes(name)) return this.opts.builtin.ensure(name as BuiltinImageName, onProgress);
    throw new DomainError(
      'invalid-input',
      `unknown image "${name}": use a built-in image (${known.join(', ')}) or a registry reference such as registry.example.com/team/app:1.0`,
      { field: 'image' },
    );
  }

  /** Images present on this node: built-in ones, then registry images, then recipe images. */
  async list(): Promise<Array<{ name: string; digest: string }>> {
    const [builtin, oci, recipes] = await Promise.all([
      this.opts.builtin.list(),
      this.opts.oci.list(),
      this.opts.recipes?.list() ?? Promise.resolve([]),
    ]);
    return [...builtin, ...oci, ...recipes];
  }
}
