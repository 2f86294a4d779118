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
    await rm(box.path, { recursive: true, force: true });
  });
  return box;
}
