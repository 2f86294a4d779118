import { randomBytes } from 'node:crypto';
import { mkdir, mkdtemp, readdir, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { writeGguf } from '../../src/shared/gguf/writer.ts';
import { createLogger } from '../../src/shared/log.ts';
import { ModelLibrary, PrepareCacheError } from '../../src/node/model-library.ts';
import { sha256File } from '../../src/shared/model/file-identity.ts';

const log = createLogger('test', 'silent');
let dir = '';
let model = '';
beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), 'orchard-model-library-'));
  await mkdir(join(dir, 'models'));
  model = join(dir, 'models', 'm.gguf');
  await writeGguf(model, {
    metadata: [['general.architecture', { type: 'string', value: 'llama' }]],
    tensors: [
      { name: 'blk.0.ffn_up.weight', dims: [16 * 1024 * 1024 / 2 + 64], type: 'F16', data: randomBytes(16 * 1024 * 1024 + 128) },
      { name: 'blk.0.attn_norm.weight', dims: [64], type: 'F32', data: randomBytes(256) },
    ],
  });
});
afterAll(async () => {
  await rm(dir, { recursive: true, force: true });
});

describe('ModelLibrary', () => {
  it('identifies the files under its dirs and seeds a stage cache from the matching one', async () => {
    const lib = new ModelLibrary({ dirs: [join(dir, 'models')], stateDir: join(dir, 'state'), log });
    const files = await lib.scan();
    expect(files.map((f) => f.path)).toEqual([model]);
    const sha = await sha256File(model);
    expect(files[0]!.sha256).toBe(sha);
    const req = { modelSha256: sha, modelSizeBytes: files[0]!.sizeBytes, firstLayer: 0, lastLayer: 0, holdsOutput: false, cacheDir: '' };
    const r = await lib.prepareCache(req, () => {});
    expect(r.llamaCacheDir).toBe(join(dir, 'state', 'llama-cache'));
    expect(r.tensorsTotal).toBe(1); // the 16 MiB tensor; the norm is under the threshold
    expect(r.sentTensors).toEqual(['blk.0.attn_norm.weight']);
    expect((await readdir(join(r.llamaCacheDir, 'rpc'))).filter((n) => /^[0-9a-f]{16}$/.test(n))).toEqual([r.entries['blk.0.ffn_up.weight']]);
  });

  it('refuses bad requests and files it does not hold, with codes the gRPC layer maps', async () => {
    const lib = new ModelLibrary({ dirs: [join(dir, 'models')], stateDir: join(dir, 'state'), log });
    const base = { modelSha256: 'a'.repeat(64), modelSizeBytes: 10, firstLayer: 0, lastLayer: 0, holdsOutput: false, cacheDir: '' };
    const code = (p: Promise<unknown>) => p.then(() => 'ok', (e: unknown) => (e instanceof PrepareCacheError ? e.code : String(e)));
    expect(await code(lib.prepareCache(base, () => {}))).toBe('NOT_FOUND');
    expect(await code(lib.prepareCache({ ...base, modelSha256: 'xyz' }, () => {}))).toBe('INVALID_ARGUMENT');
    expect(await code(lib.prepareCache({ ...base, cacheDir: 'relative/dir' }, () => {}))).toBe('INVALID_ARGUMENT');
    expect(await code(lib.prepareCache({ ...base, firstLayer: 5, lastLayer: 2 }, () => {}))).toBe('INVALID_ARGUMENT');
    const none = new ModelLibrary({ dirs: [], stateDir: join(dir, 'state'), log });
    await expect(none.prepareCache(base, () => {})).rejects.toThrow(/no --models-dir/);
  });
});
