import { defineConfig } from 'vitest/config';

// Unit tests are fast and pure; integration tests start real engines and servers, so they run
// one file at a time (2-core CI machine) with generous timeouts. The skip report prints why tests
// did not run and, with CI=true, fails the run when an integration test skipped.
export default defineConfig({
  test: {
    include: ['test/**/*.test.ts'],
    globalSetup: ['test/global-setup.ts'],
    setupFiles: ['test/helpers/leftovers.ts'],
    reporters: ['default', './test/helpers/skip-report.ts'],
    testTimeout: 120_000,
    hookTimeout: 120_000,
    fileParallelism: false,
    pool: 'forks',
  },
});
