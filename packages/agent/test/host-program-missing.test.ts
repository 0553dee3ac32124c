/** A program that is not installed is reported with the Debian package that provides it. */
import { describe, expect, it } from 'vitest';
import { runHostCommand, runHostCommandRaw } from '@devyard/agent/network/host-command-runner';
import { debianPackageOf, HostProgramMissingError } from '@devyard/agent/network/host-program-missing';

describe('missing host programs', () => {
  it('names the package of host-packages.json that provides a program', () => {
    expect(debianPackageOf('getfattr')).toBe('attr');
    expect(debianPackageOf('/usr/bin/qemu-img')).toBe('qemu-utils');
    expect(debianPackageOf('devyard-no-such-program')).toBeUndefined();
  });

  it('runHostCommand rejects with the program and its package instead of spawn ENOENT', async () => {
    // host-programs: none (a program that exists nowhere, on purpose)
    const err = await runHostCommand(['devyard-no-such-program', '--version']).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(HostProgramMissingError);
    expect(err).toMatchObject({ code: 'HOST_PROGRAM_MISSING', program: 'devyard-no-such-program', message: 'devyard-no-such-program is not installed on this host' });
    // With a PATH that lacks it, a listed program is reported with its package.
    const missing = await runHostCommandRaw(['getfattr', '--version'], { env: { PATH: '/nonexistent' } }).catch((e: unknown) => e);
    expect(missing).toMatchObject({ program: 'getfattr', debianPackage: 'attr', message: 'getfattr is not installed on this host: install the Debian package attr (`make up` installs it)' });
  });
});
