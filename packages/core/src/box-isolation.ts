/**
 * Which boundary a box runs behind. Code from an organization is untrusted unless an operator says
 * otherwise: its boxes run in microVMs (a guest kernel per box, a hardware boundary), and the
 * shared-kernel sandbox is for organizations an operator marked trusted (the operator's own, a
 * team's CI). A template's `runtime: sandbox` is its publisher's preference, not the
 * organization's permission: an untrusted organization's box from it runs in a microVM.
 */
import { DomainError } from './domain-error.js';

/**
 * The runtime of a new box: the one asked for (else the template's), moved to `microvm` for an
 * untrusted organization; asking for `sandbox` explicitly there is refused (403), so nobody is
 * surprised by what they get.
 */
export function decideBoxRuntime(requested: string | undefined, templateRuntime: string, orgTrusted: boolean): string {
  if (orgTrusted) return requested ?? templateRuntime;
  if (requested === 'sandbox') {
    throw new DomainError('forbidden', "this organization's boxes run in microVMs: the sandbox shares the node's kernel and is for organizations an operator marked trusted", {
      field: 'runtime',
    });
  }
  return requested ?? (templateRuntime === 'sandbox' ? 'microvm' : templateRuntime);
}

/** Whether a box of `runtime` may start (or resume) in an organization of this trust. */
export function mayRunIn(runtime: string, orgTrusted: boolean): boolean {
  return orgTrusted || runtime !== 'sandbox';
}
