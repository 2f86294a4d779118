import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, afterEach, beforeAll, beforeEach } from 'vitest';

/**
 * A fresh temporary directory for each test (`each`) or for the whole suite (`all`), removed
 * afterwards; `path` is valid inside tests and hooks declared after this call.
 */
export function tempDir(prefix: string, scope: 'each' | 'all' = 'each'): { readonly path: string } {
  const box = { path: '' };
  (scope === 'each' ? beforeEach : beforeAll)(async () => {
    box.path = await mkdtemp(join(tmpdir(), prefix));
  });
  (scope === 'each' ? afterEach : afterAll)(async () => {
    // A coordinator's local nats-server is stopped by its keeper a moment after the coordinator
    // dies and may still flush its store: retry ENOTEMPTY/EBUSY for a few seconds.
    await rm(box.path, { recursive: true, force: true, maxRetries: 30, retryDelay: 100 });
  });
  return box;
}
