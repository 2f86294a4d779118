import { afterAll } from 'vitest';
import { killLeftovers } from './processes.ts';

// A setup file (vitest.config.ts): this afterAll is registered before the test file's own, so it
// runs after them (hooks stack) and only finds what a timed-out hook left unregistered.
afterAll(() => {
  const left = killLeftovers();
  if (left.length > 0) console.warn(`killed ${left.length} process group(s) the test file left running: ${left.join(', ')}`);
});
