/**
 * Bytes over the wire during a model load, with and without a pre-seeded rpc-server tensor
 * cache. For each model shape: (1) cold load — empty cache, llama-server sends every weight;
 * the rpc-server writes its own cache entries; (2) Orchard pre-seeds a second, empty cache from
 * the local model file (`seedTensorCache`), timed; (3) load against the pre-seeded cache.
 * Also checks the seeded entry names equal the ones the real rpc-server wrote (same FNV-1a).
 *
 * Shapes: `gqa` is the brief's `--dim 2048 --ffn 5632 --type f16` with 4 KV heads of 8 — its
 * attn_q/attn_output (8 MiB) and attn_k/attn_v (4 MiB) are under ggml-rpc's 10 MiB
 * HASH_THRESHOLD and always cross; `wide` (dim 2304, 8 KV heads) puts every matrix above it.
 * Usage: npm run bench:rpc-cache -- [--json] [--layers 4] [--patched-rpc-lib DIR --patched-threshold BYTES]
 * With --patched-rpc-lib, also a `patched` run: llama-server loads libggml-rpc.so.0 from DIR
 * (LD_LIBRARY_PATH; built from ggml-rpc.cpp with -DGGML_RPC_HASH_THRESHOLD=BYTES after turning
 * the `const` into an overridable define — the source has no such define) and Orchard seeds
 * with the same threshold. Only the head side checks the threshold; the rpc-server is stock.
 * Needs ORCHARD_LLAMA_BIN_DIR (or `orchard setup`). Processes are killed by measureRpcLoad.
 */
import { execFile } from 'node:child_process';
import { mkdtemp, readdir, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { findLlamaBinaries } from '../src/node/llama/binaries.ts';
import { seedTensorCache } from '../src/node/llama/tensor-cache.ts';
import { readGgufHeader } from '../src/shared/gguf/reader.ts';
import { stageCachePlan } from '../src/shared/rpc-cache/plan.ts';
import { measureRpcLoad } from './rpc-load.ts';

const ROOT = new URL('../', import.meta.url).pathname;
const argv = process.argv.slice(2);
const flag = (name: string, def: string) => {
  const i = argv.indexOf(name);
  return i >= 0 && argv[i + 1] ? argv[i + 1]! : def;
};
const JSON_OUT = argv.includes('--json');
const LAYERS = flag('--layers', '4');
const PATCHED_LIB = flag('--patched-rpc-lib', '');
const PATCHED_THRESHOLD = Number(flag('--patched-threshold', '0'));

const SHAPES = {
  gqa: ['--dim', '2048', '--ffn', '5632', '--heads', '8', '--kv-heads', '4'],
  wide: ['--dim', '2304', '--ffn', '5632', '--heads', '8', '--kv-heads', '8'],
} as const;

const hexNames = async (d: string) => (await readdir(d).catch(() => [] as string[])).filter((n) => /^[0-9a-f]{16}$/.test(n)).sort();

type Bins = Awaited<ReturnType<typeof findLlamaBinaries>>;
type Stage = { firstLayer: number; lastLayer: number; holdsOutput: boolean };

/** --patched-rpc-lib: the same loads with a head whose libggml-rpc hashes tensors above PATCHED_THRESHOLD. */
async function measurePatched(bins: Bins, model: string, work: string, shape: string, stage: Stage, shardBytes: number): Promise<Record<string, unknown>> {
  const header = await readGgufHeader(model);
  const pDir = join(work, `${shape}-patched`);
  const coldDir = join(work, `${shape}-patched-cold`);
  const pPlan = stageCachePlan(header, stage, PATCHED_THRESHOLD);
  const pSeed = await seedTensorCache({ modelPath: model, llamaCacheDir: pDir, stage, thresholdBytes: PATCHED_THRESHOLD });
  const headEnv = { LD_LIBRARY_PATH: `${PATCHED_LIB}:${process.env.LD_LIBRARY_PATH ?? ''}` };
  const pCold = await measureRpcLoad({ rpcServer: bins.rpcServer, llamaServer: bins.llamaServer, model, llamaCacheDir: coldDir, headEnv });
  const pLoad = await measureRpcLoad({ rpcServer: bins.rpcServer, llamaServer: bins.llamaServer, model, llamaCacheDir: pDir, headEnv });
  await rm(pDir, { recursive: true, force: true });
  await rm(coldDir, { recursive: true, force: true });
  return {
    thresholdBytes: PATCHED_THRESHOLD,
    belowThresholdBytes: pPlan.sentBytes,
    seedingSeconds: pSeed.seconds,
    cold: { ...pCold, fractionOfShard: pCold.bytesToServer / shardBytes },
    seeded: { ...pLoad, fractionOfShard: pLoad.bytesToServer / shardBytes },
    acceptance1Percent: pLoad.bytesToServer <= 0.01 * shardBytes,
  };
}

/** One model shape: cold load, warm load, seeding, seeded load (and the patched head when asked). */
async function measureShape(bins: Bins, work: string, shape: string, args: readonly string[]): Promise<Record<string, unknown>> {
  const model = join(work, `${shape}.gguf`);
  await promisify(execFile)(process.execPath, [join(ROOT, 'bin/orchard.js'), 'testmodel', 'gguf', '--out', model, '--layers', LAYERS, '--type', 'f16', ...args]);
  const header = await readGgufHeader(model);
  const nLayer = Number(LAYERS);
  // CPU-only head: the one rpc-server holds every layer and the output layer.
  const stage: Stage = { firstLayer: 0, lastLayer: nLayer - 1, holdsOutput: true };
  const plan = stageCachePlan(header, stage);
  const shardBytes = plan.cachedBytes + plan.sentBytes;
  const coldDir = join(work, `${shape}-cold`);
  const cold = await measureRpcLoad({ rpcServer: bins.rpcServer, llamaServer: bins.llamaServer, model, llamaCacheDir: coldDir });
  const warm = await measureRpcLoad({ rpcServer: bins.rpcServer, llamaServer: bins.llamaServer, model, llamaCacheDir: coldDir });
  const seedDir = join(work, `${shape}-seed`);
  const seed = await seedTensorCache({ modelPath: model, llamaCacheDir: seedDir, stage });
  const reseed = await seedTensorCache({ modelPath: model, llamaCacheDir: seedDir, stage });
  const seeded = await measureRpcLoad({ rpcServer: bins.rpcServer, llamaServer: bins.llamaServer, model, llamaCacheDir: seedDir });
  const patched = PATCHED_LIB && PATCHED_THRESHOLD > 0 ? await measurePatched(bins, model, work, shape, stage, shardBytes) : undefined;
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
    modelBytes: header.fileSize,
    shardWeightBytes: shardBytes,
    hashableBytes: plan.cachedBytes,
    belowThresholdBytes: plan.sentBytes,
    belowThresholdByTensor: sentByKind,
    cold: { ...cold, fractionOfShard: cold.bytesToServer / shardBytes },
    warmServerWritten: { ...warm, fractionOfShard: warm.bytesToServer / shardBytes },
    seeding: { seconds: seed.seconds, bytesWritten: seed.bytesWritten, reseedSeconds: reseed.seconds, reseedBytesWritten: reseed.bytesWritten },
    seeded: { ...seeded, fractionOfShard: seeded.bytesToServer / shardBytes },
    seededEntriesEqualServerWritten: serverNames.length > 0 && serverNames.join() === seededNames.join(),
    acceptance1Percent: seeded.bytesToServer <= 0.01 * shardBytes,
    ...(patched ? { patched } : {}),
  };
}

async function main(): Promise<void> {
  const bins = await findLlamaBinaries();
  const work = await mkdtemp(join(tmpdir(), 'orchard-bench-rpc-cache-'));
  const results: Record<string, unknown>[] = [];
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
