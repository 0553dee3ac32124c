import { fileURLToPath } from 'node:url';
import { defineConfig } from 'vitest/config';

const root = fileURLToPath(new URL('.', import.meta.url));

export default defineConfig({
  resolve: {
    // Tests run against sources, not dist: `@devyard/<pkg>/<file>` maps to packages/<pkg>/src/<file>.ts.
    alias: [{ find: /^@devyard\/([^/]+)\/(.*)$/, replacement: `${root}packages/$1/src/$2.ts` }],
  },
  test: {
    include: ['packages/*/src/**/*.test.ts', 'packages/*/test/**/*.test.ts', 'test/**/*.test.ts'],
    testTimeout: 60_000,
    hookTimeout: 120_000,
    // Runtime tests share host resources (bridge, cgroup tree, crun state); run files one at a time.
    fileParallelism: false,
    reporters: ['default'],
  },
});
