// Lint rules that keep the architecture honest (DESIGN.md §12): dependencies point inward.
import js from '@eslint/js';
import tseslint from 'typescript-eslint';

const others = (allowed) =>
  ['core', 'api', 'oci', 'sdk', 'server', 'agent', 'gateway', 'cli', 'web']
    .filter((p) => !allowed.includes(p))
    .map((p) => `@devyard/${p}/*`);

/** Each package may import only the packages listed; `core` imports nothing of ours. */
const direction = {
  core: [],
  api: ['core'],
  oci: ['core'],
  sdk: ['api', 'core'],
  server: ['api', 'core', 'oci'],
  agent: ['api', 'core', 'oci', 'sdk'],
  gateway: ['api', 'core', 'sdk'],
  cli: ['api', 'core', 'oci', 'sdk', 'server', 'agent', 'gateway'],
  web: ['api', 'sdk'],
};

export default tseslint.config(
  { ignores: ['**/dist/**', '**/node_modules/**', '.devyard/**', 'coverage/**'] },
  js.configs.recommended,
  ...tseslint.configs.recommended,
  {
    rules: {
      '@typescript-eslint/no-unused-vars': ['error', { argsIgnorePattern: '^_', varsIgnorePattern: '^_' }],
      'no-empty': ['error', { allowEmptyCatch: true }],
    },
  },
  ...Object.entries(direction).map(([pkg, allowed]) => ({
    // Tests may drive a package through others (e.g. server tests use the SDK); sources may not.
    files: [`packages/${pkg}/src/**/*.ts`],
    rules: {
      'no-restricted-imports': [
        'error',
        {
          patterns: [
            { group: others([pkg, ...allowed]), message: `packages/${pkg} may import only: ${allowed.join(', ') || 'nothing of ours'} (DESIGN.md §12)` },
            { group: ['../../*/src/*', '../../../*/src/*'], message: 'import other packages by their @devyard/ name, not by relative path' },
          ],
        },
      ],
    },
  })),
);
