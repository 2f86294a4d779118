import { createHash } from 'node:crypto';
import { mkdir, rename, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { expect } from 'vitest';
import { orchard } from './processes.ts';

/**
 * The file `orchard testmodel gguf …args` writes, made once per test run and shared by every test
 * file that asks for the same arguments (the generator is deterministic: same arguments, same
 * bytes). Besides the generation, a shared path saves each file's first load llama.cpp's loader
 * check, whose verdict is cached per path (src/shared/model/llama-load-check.ts). The run's folder
 * is under Orchard's cache dir, one of every agent's roots (test/global-setup.ts makes and
 * removes it); benches, which run without it, pass a folder of their own. `file` is its name
 * (a model loaded without --name is named after it). Callers must not modify the file.
 */
export async function testGguf(args: readonly string[], file = 'model.gguf', dir = process.env.ORCHARD_TEST_MODELS): Promise<string> {
  if (!dir) throw new Error('ORCHARD_TEST_MODELS is unset: test/global-setup.ts sets it (run the tests through vitest)');
  const folder = join(dir, createHash('sha256').update(JSON.stringify(args)).digest('hex').slice(0, 16));
  const path = join(folder, file);
  if (await stat(path).then(() => true, () => false)) return path;
  await mkdir(folder, { recursive: true });
  const part = `${path}.${process.pid}.part`;
  const made = await orchard(['testmodel', 'gguf', '--out', part, ...args], process.env);
  expect(made.code, made.stderr).toBe(0);
  await rename(part, path);
  return path;
}
