/**
 * Bytes over the wire during a model load, with and without a pre-seeded rpc-server tensor
 * cache. For each model shape: (1) cold load — empty cache, llama-server sends every weight;
 * the rpc-server writes its own cache entries; (2) Orchard pre-seeds a second, empty cache from
 * the local model file (`seedTensorCache`), timed; (3) load against the pre-seeded cache, and
 * (4) the same with the seeding's hashes handed to llama-server (GGML_RPC_TENSOR_HASHES, as the
 * agent does), which then does not re-hash the weights (`seededKnownHashes`).
 * Also checks the seeded entry names equal the ones the real rpc-server wrote (same FNV-1a).
 *
 * Shapes: `gqa` is the brief's `--dim 2048 --ffn 5632 --type f16` with 4 KV heads of 8 — its
 * attn_q/attn_output (8 MiB) and attn_k/attn_v (4 MiB) are under ggml-rpc's stock 10 MiB
 * HASH_THRESHOLD; `wide` (dim 2304, 8 KV heads) puts every matrix above it. The engines are the
 * ones `orchard setup` builds, patched with GGML_RPC_CACHE_MIN_SIZE (src/node/llama/patches.ts),
 * and the head runs with Orchard's threshold (RPC_CACHE_MIN_SIZE_BYTES) as the agent starts it,
 * so only 1-D norms cross. `--threshold BYTES` measures another threshold (seeding and head
 * alike); `--threshold 10485760` reproduces the stock engine.
 * Usage: npm run bench:rpc-cache -- [--json] [--layers 4] [--threshold BYTES]
 * Needs ORCHARD_LLAMA_BIN_DIR (or `orchard setup`). Processes are killed by measureRpcLoad.
 */
import { execFile } from 'node:child_process';
import { mkdtemp, readdir, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { findLlamaBinaries } from '../src/node/llama/binaries.ts';
import { seedTensorCache } from '../src/node/llama/tensor-cache.ts';
import { readGgufHeader } from '../src/shared/gguf/reader.ts';
import { knownHashesFileText, TENSOR_HASHES_ENV } from '../src/shared/rpc-cache/known-hashes.ts';
import { RPC_CACHE_MIN_SIZE_BYTES, rpcCacheMinSizeEnv, stageCachePlan } from '../src/shared/rpc-cache/plan.ts';
import { measureRpcLoad } from './rpc-load.ts';

const ROOT = new URL('../', import.meta.url).pathname;
const argv = process.argv.slice(2);
const flag = (name: string, def: string) => {
  const i = argv.indexOf(name);
  return i >= 0 && argv[i + 1] ? argv[i + 1]! : def;
};
const JSON_OUT = argv.includes('--json');
const LAYERS = flag('--layers', '4');
const THRESHOLD = Number(flag('--threshold', String(RPC_CACHE_MIN_SIZE_BYTES)));
const HEAD_ENV = rpcCacheMinSizeEnv(THRESHOLD);

const SHAPES = {
  gqa: ['--dim', '2048', '--ffn', '5632', '--heads', '8', '--kv-heads', '4'],
  wide: ['--dim', '2304', '--ffn', '5632', '--heads', '8', '--kv-heads', '8'],
} as const;

const hexNames = async (d: string) => (await readdir(d).catch(() => [] as string[])).filter((n) => /^[0-9a-f]{16}$/.test(n)).sort();

type Bins = Awaited<ReturnType<typeof findLlamaBinaries>>;
type Stage = { firstLayer: number; lastLayer: number; holdsOutput: boolean };

/** One model shape: cold load, warm load, seeding, seeded load. */
async function measureShape(bins: Bins, work: string, shape: string, args: readonly string[]): Promise<Record<string, unknown>> {
  const model = join(work, `${shape}.gguf`);
  await promisify(execFile)(process.execPath, [join(ROOT, 'bin/orchard.js'), 'testmodel', 'gguf', '--out', model, '--layers', LAYERS, '--type', 'f16', ...args]);
  const header = await readGgufHeader(model);
  const nLayer = Number(LAYERS);
  // CPU-only head: the one rpc-server holds every layer and the output layer.
  const stage: Stage = { firstLayer: 0, lastLayer: nLayer - 1, holdsOutput: true };
  const plan = stageCachePlan(header, stage, THRESHOLD);
  const shardBytes = plan.cachedBytes + plan.sentBytes;
  const coldDir = join(work, `${shape}-cold`);
  const cold = await measureRpcLoad({ rpcServer: bins.rpcServer, llamaServer: bins.llamaServer, model, llamaCacheDir: coldDir, headEnv: HEAD_ENV });
  const warm = await measureRpcLoad({ rpcServer: bins.rpcServer, llamaServer: bins.llamaServer, model, llamaCacheDir: coldDir, headEnv: HEAD_ENV });
  const seedDir = join(work, `${shape}-seed`);
  const seed = await seedTensorCache({ modelPath: model, llamaCacheDir: seedDir, stage, thresholdBytes: THRESHOLD });
  const reseed = await seedTensorCache({ modelPath: model, llamaCacheDir: seedDir, stage, thresholdBytes: THRESHOLD });
  const seeded = await measureRpcLoad({ rpcServer: bins.rpcServer, llamaServer: bins.llamaServer, model, llamaCacheDir: seedDir, headEnv: HEAD_ENV });
  // The product's head: the seeding's hashes handed over, so llama-server does not re-hash the weights.
  const knownFile = join(work, `${shape}.tensor-hashes`);
  await writeFile(knownFile, knownHashesFileText(seed.hashes));
  const seededKnown = await measureRpcLoad({ rpcServer: bins.rpcServer, llamaServer: bins.llamaServer, model, llamaCacheDir: seedDir, headEnv: { ...HEAD_ENV, [TENSOR_HASHES_ENV]: knownFile } });
  const serverNames = await hexNames(join(coldDir, 'rpc'));
  const seededNames = await hexNames(join(seedDir, 'rpc'));
  const sentByKind: Record<string, number> = {};
  for (const t of plan.sent) {
    const kind = t.name.replace(/^blk\.\d+\./, 'blk.*.');
    sentByKind[kind] = (sentByKind[kind] ?? 0) + t.bytes;
  }
  await rm(model, { force: true });
  await rm(coldDir, { recursive: true, force: true });
  await rm(seedDir, { recursive: true, force: true });
  return {
    shape,
    layers: nLayer,
    thresholdBytes: THRESHOLD,
    modelBytes: header.fileSize,
    shardWeightBytes: shardBytes,
    hashableBytes: plan.cachedBytes,
    belowThresholdBytes: plan.sentBytes,
    belowThresholdByTensor: sentByKind,
    cold: { ...cold, fractionOfShard: cold.bytesToServer / shardBytes },
    warmServerWritten: { ...warm, fractionOfShard: warm.bytesToServer / shardBytes },
    seeding: { seconds: seed.seconds, bytesWritten: seed.bytesWritten, reseedSeconds: reseed.seconds, reseedBytesWritten: reseed.bytesWritten },
    seeded: { ...seeded, fractionOfShard: seeded.bytesToServer / shardBytes },
    seededKnownHashes: { ...seededKnown, fractionOfShard: seededKnown.bytesToServer / shardBytes },
    seededEntriesEqualServerWritten: serverNames.length > 0 && serverNames.join() === seededNames.join(),
    acceptance1Percent: seeded.bytesToServer <= 0.01 * shardBytes && seededKnown.bytesToServer <= 0.01 * shardBytes,
  };
}

async function main(): Promise<void> {
  const bins = await findLlamaBinaries();
  const work = await mkdtemp(join(tmpdir(), 'orchard-bench-rpc-cache-'));
  const results: Record<string, unknown>[] = [];
  process.stderr.write(`engines: llama.cpp ${bins.llamaCppVersion} in ${bins.binDir}; head GGML_RPC_CACHE_MIN_SIZE=${THRESHOLD}\n`);
  try {
    for (const [shape, args] of Object.entries(SHAPES)) results.push(await measureShape(bins, work, shape, args));
  } finally {
    await rm(work, { recursive: true, force: true });
  }
  if (JSON_OUT) {
    process.stdout.write(`${JSON.stringify({ bench: 'rpc-cache', results }, null, 2)}\n`);
    return;
  }
  for (const r of results) {
    const c = r.cold as { bytesToServer: number; loadSeconds: number; fractionOfShard: number };
    const s = r.seeded as { bytesToServer: number; loadSeconds: number; fractionOfShard: number };
    process.stdout.write(
      `${r.shape}: shard ${r.shardWeightBytes} B; cold ${c.bytesToServer} B (${(c.fractionOfShard * 100).toFixed(2)} %) in ${c.loadSeconds.toFixed(2)} s; ` +
        `seeded ${s.bytesToServer} B (${(s.fractionOfShard * 100).toFixed(3)} %) in ${s.loadSeconds.toFixed(2)} s; ≤1 %: ${r.acceptance1Percent}\n`,
    );
  }
}

main().catch((err) => {
  process.stderr.write(`${(err as Error).stack ?? err}\n`);
  process.exit(1);
});
