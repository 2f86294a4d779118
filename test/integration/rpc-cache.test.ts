import { execFile } from 'node:child_process';
import { mkdtemp, readdir, rm, unlink, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { measureRpcLoad } from '../../bench/rpc-load.ts';
import { findLlamaBinaries } from '../../src/node/llama/binaries.ts';
import { seedTensorCache } from '../../src/node/llama/tensor-cache.ts';
import { readGgufHeader } from '../../src/shared/gguf/reader.ts';
import { knownHashesFileText, TENSOR_HASHES_ENV } from '../../src/shared/rpc-cache/known-hashes.ts';
import { HASH_THRESHOLD_BYTES, stageCachePlan } from '../../src/shared/rpc-cache/plan.ts';
import { ORACLE_PROMPT } from '../helpers/oracle.ts';

/**
 * A real llama-server loading through a real ggml-rpc-server (-c), with a byte-counting proxy in
 * between: with the cache pre-seeded by Orchard from the local file, the bytes sent during the
 * load are ≤ 1 % of the shard's weight bytes; cold, they are ~100 %. Two shapes: `wide` (dim 2304,
 * 8 KV heads, f16, 1 layer) has every matrix above ggml-rpc's stock 10 MiB hash threshold; `gqa`
 * (dim 2048, 4 KV heads of 8) has attn_q/attn_output (8 MiB) and attn_k/attn_v (4 MiB) under it,
 * which cross with a stock engine (~11 % of this shard) and are cached only by the engines
 * `orchard setup` builds with the GGML_RPC_CACHE_MIN_SIZE patch, run with Orchard's threshold.
 */
const ROOT = new URL('../..', import.meta.url).pathname;
let work = '';
let model = '';
let gqa = '';
let bins: Awaited<ReturnType<typeof findLlamaBinaries>>;

beforeAll(async () => {
  bins = await findLlamaBinaries();
  work = await mkdtemp(join(tmpdir(), 'orchard-rpc-cache-it-'));
  model = join(work, 'wide.gguf');
  gqa = join(work, 'gqa.gguf');
  const testmodel = (out: string, shape: string[]) =>
    promisify(execFile)(process.execPath, [join(ROOT, 'bin/orchard.js'), 'testmodel', 'gguf', '--out', out, '--layers', '1', '--type', 'f16', ...shape]);
  await testmodel(model, ['--dim', '2304', '--ffn', '5632', '--heads', '8', '--kv-heads', '8']);
  await testmodel(gqa, ['--dim', '2048', '--ffn', '5632', '--heads', '8', '--kv-heads', '4']);
}, 120_000);

afterAll(async () => {
  if (work) await rm(work, { recursive: true, force: true });
});

describe('pre-seeded rpc-server tensor cache', () => {
  it('cuts the bytes sent during a load to ≤ 1 % of the shard (cold: ≥ 99 %), with the same entries the server writes', async () => {
    const header = await readGgufHeader(model);
    const stage = { firstLayer: 0, lastLayer: 0, holdsOutput: true };
    const plan = stageCachePlan(header, stage);
    const shard = plan.cachedBytes + plan.sentBytes;
    expect(plan.sent.every((t) => t.name.includes('norm'))).toBe(true);

    const seedDir = join(work, 'seeded');
    const seed = await seedTensorCache({ modelPath: model, llamaCacheDir: seedDir, stage });
    expect(seed.bytesWritten).toBe(plan.cachedBytes);
    const seeded = await measureRpcLoad({ rpcServer: bins.rpcServer, llamaServer: bins.llamaServer, model, llamaCacheDir: seedDir });
    expect(seeded.bytesToServer).toBeLessThanOrEqual(0.01 * shard);

    const coldDir = join(work, 'cold');
    const cold = await measureRpcLoad({ rpcServer: bins.rpcServer, llamaServer: bins.llamaServer, model, llamaCacheDir: coldDir });
    expect(cold.bytesToServer).toBeGreaterThanOrEqual(0.99 * shard);

    // The real rpc-server, on the cold load, wrote its cache with its own fnv_hash: same names.
    const names = async (d: string) => (await readdir(join(d, 'rpc'))).filter((n) => /^[0-9a-f]{16}$/.test(n)).sort();
    expect(await names(seedDir)).toEqual(await names(coldDir));
    expect((await names(seedDir)).length).toBe(plan.cached.length);
  }, 240_000);

  it('GQA shape: the K/V and Q/O projections under 10 MiB are cached too, so ≤ 1 % of the shard crosses', async () => {
    const header = await readGgufHeader(gqa);
    const stage = { firstLayer: 0, lastLayer: 0, holdsOutput: true };
    const plan = stageCachePlan(header, stage);
    const shard = plan.cachedBytes + plan.sentBytes;
    const stock = stageCachePlan(header, stage, HASH_THRESHOLD_BYTES);
    // Without the lowered threshold the projections would cross: the test would fail on a stock engine.
    expect(stock.sentBytes).toBeGreaterThan(0.05 * shard);
    expect(plan.sent.every((t) => t.name.includes('norm'))).toBe(true);

    const seedDir = join(work, 'gqa-seeded');
    const seed = await seedTensorCache({ modelPath: gqa, llamaCacheDir: seedDir, stage });
    expect(seed.bytesWritten).toBe(plan.cachedBytes);
    const seeded = await measureRpcLoad({ rpcServer: bins.rpcServer, llamaServer: bins.llamaServer, model: gqa, llamaCacheDir: seedDir });
    expect(seeded.bytesToServer).toBeLessThanOrEqual(0.01 * shard);
  }, 240_000);

  it('known hashes (GGML_RPC_TENSOR_HASHES) replace the head’s own hashing: right ones load from the cache, wrong ones send the bytes', async () => {
    const header = await readGgufHeader(gqa);
    const stage = { firstLayer: 0, lastLayer: 0, holdsOutput: true };
    const plan = stageCachePlan(header, stage);
    const shard = plan.cachedBytes + plan.sentBytes;
    const seedDir = join(work, 'gqa-known');
    const seed = await seedTensorCache({ modelPath: gqa, llamaCacheDir: seedDir, stage });
    const right = join(work, 'known-right');
    await writeFile(right, knownHashesFileText(seed.hashes));
    const withKnown = await measureRpcLoad({ rpcServer: bins.rpcServer, llamaServer: bins.llamaServer, model: gqa, llamaCacheDir: seedDir, headEnv: { [TENSOR_HASHES_ENV]: right } });
    expect(withKnown.bytesToServer).toBeLessThanOrEqual(0.01 * shard);
    // Hashes that name no entry: an engine that hashed the bytes itself would still hit the
    // seeded cache and send nothing; the patched one trusts the file, misses, and sends them.
    const wrong = join(work, 'known-wrong');
    await writeFile(wrong, knownHashesFileText(seed.hashes.map((h) => ({ ...h, hash: h.hash.replace(/^./, (c) => (c === '0' ? '1' : '0')) }))));
    const misled = await measureRpcLoad({ rpcServer: bins.rpcServer, llamaServer: bins.llamaServer, model: gqa, llamaCacheDir: seedDir, headEnv: { [TENSOR_HASHES_ENV]: wrong } });
    expect(misled.bytesToServer).toBeGreaterThanOrEqual(0.99 * plan.cachedBytes);
  }, 240_000);

  it('a miss among deferred known-hash replies sends that weight: one entry deleted crosses alone, tokens equal a cold load', async () => {
    const header = await readGgufHeader(gqa);
    const stage = { firstLayer: 0, lastLayer: 0, holdsOutput: true };
    const plan = stageCachePlan(header, stage);
    const generate = { prompt: ORACLE_PROMPT, nPredict: 12 };
    const cold = await measureRpcLoad({ rpcServer: bins.rpcServer, llamaServer: bins.llamaServer, model: gqa, llamaCacheDir: join(work, 'gqa-cold-tokens'), generate });
    expect(new Set(cold.tokens).size).toBeGreaterThan(3);

    const seedDir = join(work, 'gqa-one-missing');
    const seed = await seedTensorCache({ modelPath: gqa, llamaCacheDir: seedDir, stage });
    // A weight in the middle of the load order: hits before and after it are deferred too.
    const missing = seed.hashes[Math.floor(seed.hashes.length / 2)]!;
    await unlink(join(seedDir, 'rpc', missing.hash));
    const known = join(work, 'known-one-missing');
    await writeFile(known, knownHashesFileText(seed.hashes));
    const load = await measureRpcLoad({ rpcServer: bins.rpcServer, llamaServer: bins.llamaServer, model: gqa, llamaCacheDir: seedDir, headEnv: { [TENSOR_HASHES_ENV]: known }, generate });
    expect(load.bytesToServer).toBeGreaterThanOrEqual(missing.bytes);
    expect(load.bytesToServer).toBeLessThanOrEqual(missing.bytes + 0.01 * (plan.cachedBytes + plan.sentBytes));
    expect(load.tokens).toEqual(cold.tokens);
    // the server cached the weight again under the same name
    expect(await readdir(join(seedDir, 'rpc'))).toContain(missing.hash);
  }, 240_000);
});
