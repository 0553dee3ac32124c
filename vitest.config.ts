import { fileURLToPath } from 'node:url';
import { defineConfig } from 'vitest/config';

const root = fileURLToPath(new URL('.', import.meta.url));

/**
 * Three tiers, run in this order by `make test` (one at a time with `make test-unit|test-host|test-e2e`):
 * - unit: pure code, and the control plane in-process on SQLite; no root, no host programs beyond
 *   Node and dpkg.
 * - host: real runtimes, networks, registries and browsers on this machine (root; the programs of
 *   host-packages.json).
 * - e2e: `devyard up`, the CLI and the OpenSSH client against real boxes.
 * host and e2e first build the shared assets their boxes boot from (test/setup/shared-assets.ts).
 */
const HOST_TESTS = ['packages/agent/test/**/*.test.ts', 'packages/gateway/test/gateway-*.test.ts', 'packages/oci/test/registry-*.test.ts'];
const E2E_TESTS = ['test/e2e/**/*.test.ts'];

export default defineConfig({
  resolve: {
    // Tests run against sources, not dist: `@devyard/<pkg>/<file>` maps to packages/<pkg>/src/<file>.ts.
    alias: [{ find: /^@devyard\/([^/]+)\/(.*)$/, replacement: `${root}packages/$1/src/$2.ts` }],
  },
  test: {
    testTimeout: 60_000,
    hookTimeout: 120_000,
    // Runtime tests share host resources (bridge, cgroup tree, crun state); run files one at a time.
    fileParallelism: false,
    reporters: ['default'],
    projects: [
      {
        extends: true,
        test: {
          name: 'unit',
          include: ['packages/*/src/**/*.test.ts', 'packages/*/test/**/*.test.ts', 'test/**/*.test.ts'],
          exclude: [...HOST_TESTS, ...E2E_TESTS, '**/node_modules/**'],
          // Group 0 is where vitest puts serial files of projects without an order, after all others: start at 1.
          sequence: { groupOrder: 1 },
        },
      },
      {
        extends: true,
        test: { name: 'host', include: HOST_TESTS, globalSetup: ['test/setup/shared-assets.ts'], sequence: { groupOrder: 2 } },
      },
      {
        extends: true,
        test: { name: 'e2e', include: E2E_TESTS, globalSetup: ['test/setup/shared-assets.ts'], sequence: { groupOrder: 3 } },
      },
    ],
  },
});
