/**
 * bench:memory — predicted vs reported bytes per device on the real llama.cpp engine.
 *
 * For generated llama models of two shapes × ctx {512, 4096, 16384} × cache {f16, q8_0} × 1/2/3
 * stages, start one ggml-rpc-server per stage on 127.0.0.1, start llama-server with the planned
 * layer ranges pinned (`llamaDeviceArgs`), read the per-device `model buffer size`, `KV buffer
 * size` and `compute buffer size` lines from its `-lv 4` log, and compare with Orchard's
 * prediction for the same device. Goal: every device within 5 % or 32 MiB.
 *
 * MLX ranks too (`mlx` in the JSON, bench/lib/mlx-memory.ts): Orchard's MLX memory model against
 * MLX's own active/peak memory report from every rank, pipeline and tensor parallel, dense and MoE.
 *
 * Usage: node --import tsx bench/memory.ts [--json] [--quick] [--families (only the MoE/newer families)]
 *        [--no-mlx | --mlx-only]
 * Needs ORCHARD_LLAMA_BIN_DIR (or `orchard setup`) and, for the MLX section, `orchard setup --mlx`.
 * Every process started is killed on exit; everything written lives in one temp dir, removed.
 */
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { loadavg, tmpdir } from 'node:os';
import { join } from 'node:path';
import { findLlamaBinaries } from '../src/node/llama/binaries.ts';
import { readGgufHeader } from '../src/shared/gguf/reader.ts';
import type { CacheType } from '../src/shared/memory/kv.ts';
import { DEFAULT_MEMORY_OPTIONS, type MemoryOptions, deviceBytes, hostBytes, memoryModel } from '../src/shared/memory/stage.ts';
import { modelProfile } from '../src/shared/model/profile.ts';
import { tensorBytes } from '../src/shared/gguf/ggml-types.ts';
import { writeGguf } from '../src/shared/gguf/writer.ts';
import { FAMILY_ARCHS } from '../src/shared/testmodel/families.ts';
import { familyTestModelSpec, familyTestShape } from '../src/shared/testmodel/family-model.ts';
import { loadVocab, vocabPath } from '../src/shared/testmodel/vocab.ts';
import { killAll } from './lib/children.ts';
import { MiB, type Shape, runLlama, writeModel, zeros } from './llama-run.ts';
import { type MlxMemoryCase, mlxMemoryCases, mlxSummary } from './lib/mlx-memory.ts';

const SHAPES: Shape[] = [
  { name: 'llama-8L-512d-f16', layers: 8, embd: 512, ffn: 1408, heads: 8, kvHeads: 4, type: 'F16', heldOut: false },
  { name: 'llama-12L-768d-q8', layers: 12, embd: 768, ffn: 2048, heads: 12, kvHeads: 4, type: 'Q8_0', heldOut: false },
  // Was held out in the first calibration round; it exposed the final-layer and per-stream rules,
  // so it is calibration data now and 5L-1536d is the unseen check.
  { name: 'llama-6L-1024d-f16', layers: 6, embd: 1024, ffn: 3584, heads: 16, kvHeads: 8, type: 'F16', heldOut: false },
  { name: 'llama-5L-1536d-q8', layers: 5, embd: 1536, ffn: 4096, heads: 12, kvHeads: 4, type: 'Q8_0', heldOut: true },
  // A larger, unseen shape (~0.6 GB file) at a few spot configurations: does the fit hold at scale?
  { name: 'llama-4L-2048d-f16', layers: 4, embd: 2048, ffn: 5632, heads: 16, kvHeads: 8, type: 'F16', heldOut: true, spot: true },
];

function splitLayers(n: number, stages: number): [number, number][] {
  // Uneven on purpose (the first stage larger) so the mapping is really exercised.
  const out: [number, number][] = [];
  let first = 0;
  for (let i = 0; i < stages; i++) {
    const left = stages - i;
    const count = i === stages - 1 ? n - first : Math.ceil((n - first) / left) + (i === 0 && left > 1 ? 1 : 0);
    out.push([first, first + count - 1]);
    first += count;
  }
  return out;
}

interface DeviceCase {
  model: string;
  heldOut: boolean;
  parallel: number;
  unified: boolean;
  ctx: number;
  cache: CacheType;
  stages: number;
  device: string;
  layers: string;
  kind: 'model' | 'kv' | 'compute' | 'total';
  predicted: number;
  reported: number;
  errorBytes: number;
  relativeError: number;
  withinGoal: boolean;
}

async function runCase(
  bins: { llamaServer: string; rpcServer: string },
  modelPath: string,
  shape: Pick<Shape, 'name' | 'heldOut'>,
  ctx: number,
  cache: CacheType,
  stages: number,
  parallel = 1,
  unified = true,
): Promise<DeviceCase[]> {
  const header = await readGgufHeader(modelPath);
  const profile = modelProfile(header);
  const options: MemoryOptions = { ...DEFAULT_MEMORY_OPTIONS, ctx, cacheType: cache, parallel, unified, flashAttention: true };
  const mm = memoryModel(profile, options);
  const ranges = splitLayers(profile.layerCount, stages);
  const { endpoints, reported, log } = await runLlama(bins, modelPath, profile.layerCount, ranges, options);
  if (process.env.ORCHARD_BENCH_LOG) await writeFile(process.env.ORCHARD_BENCH_LOG, log);
  const cases: DeviceCase[] = [];
  const devices = ranges.map(([a, b], i) => ({
    name: `RPC${i}`,
    layers: `${a}-${b}`,
    rep: reported.get(endpoints[i]!) ?? { model: 0, kv: 0, compute: 0 },
    pred: deviceBytes(mm, a, b, i === stages - 1, stages > 1),
  }));
  // The head process's own CPU buffers: token_embd (CPU_Mapped) and its compute buffer.
  devices.push({ name: 'host', layers: '-', rep: reported.get('host') ?? { model: 0, kv: 0, compute: 0 }, pred: hostBytes(mm, stages > 1) });
  for (const { name, layers, rep, pred } of devices) {
    const predTotal = pred.model + pred.kv + pred.compute;
    const repTotal = rep.model + rep.kv + rep.compute;
    for (const [kind, p, r] of [
      ['model', pred.model, rep.model],
      ['kv', pred.kv, rep.kv],
      ['compute', pred.compute, rep.compute],
      ['total', predTotal, repTotal],
    ] as const) {
      const err = Math.abs(p - r);
      const rel = r > 0 ? err / r : p > 0 ? 1 : 0;
      cases.push({
        model: shape.name,
        heldOut: shape.heldOut ?? false,
        parallel,
        unified,
        ctx,
        cache,
        stages,
        device: name,
        layers,
        kind,
        predicted: p,
        reported: r,
        errorBytes: err,
        relativeError: rel,
        withinGoal: rel <= 0.05 || err <= 32 * MiB,
      });
    }
  }
  return cases;
}

/**
 * The llama.cpp families with their own memory rules (MLA, leading dense layers and shared
 * experts, sliding/chunked layers, attention sinks): their small generated models (the real
 * tensor tables, `orchard testmodel gguf --arch`) with zero weights, split 1/2/3 ways. None of
 * them was used to fit the compute constants: all held out.
 */
async function familyCases(bins: { llamaServer: string; rpcServer: string }, dir: string, quick: boolean): Promise<DeviceCase[]> {
  const vocab = await loadVocab();
  const cases: DeviceCase[] = [];
  for (const arch of FAMILY_ARCHS) {
    const shape = familyTestShape(arch, 6);
    const spec = familyTestModelSpec(shape, vocab, 'f16', 1);
    const path = join(dir, `${arch}.gguf`);
    await writeGguf(path, { metadata: spec.metadata, tensors: spec.tensors.map((t) => ({ ...t, data: () => zeros(tensorBytes(t.type, t.dims)) })) });
    const label = { name: `${arch}-6L-${shape.dim}d-f16`, heldOut: true };
    for (const stages of quick ? [2] : [1, 2, 3]) cases.push(...(await runCase(bins, path, label, 4096, 'f16', stages)));
    if (!quick) cases.push(...(await runCase(bins, path, label, 16384, 'q8_0', 2)));
  }
  return cases;
}

async function main(): Promise<void> {
  for (const sig of ['SIGINT', 'SIGTERM'] as const) process.on(sig, () => process.exit(130));
  const json = process.argv.includes('--json');
  const quick = process.argv.includes('--quick');
  const mlxOnly = process.argv.includes('--mlx-only');
  const loadBefore = loadavg()[0];
  const bins = await findLlamaBinaries();
  const vocab = await vocabPath();
  const dir = await mkdtemp(join(tmpdir(), 'orchard-bench-memory-'));
  try {
    const cases: DeviceCase[] = [];
    const ctxs = quick ? [4096] : [512, 4096, 16384];
    const report = (c: DeviceCase[]) => {
      cases.push(...c);
      if (json) return;
      for (const x of c.filter((y) => y.kind === 'total')) {
        process.stderr.write(
          `${x.model} ctx=${x.ctx} ${x.cache} np=${x.parallel}${x.unified ? '' : ' split-kv'} ${x.stages}st ${x.device} ${x.layers}: predicted ${(x.predicted / MiB).toFixed(2)} reported ${(x.reported / MiB).toFixed(2)} MiB\n`,
        );
      }
    };
    for (const shape of process.argv.includes('--families') || mlxOnly ? [] : SHAPES) {
      if (quick && shape.spot) continue;
      const path = await writeModel(dir, shape, vocab);
      for (const ctx of ctxs) {
        if (shape.spot && ctx === 512) continue;
        for (const cache of quick || shape.spot ? (['f16'] as const) : (['f16', 'q8_0'] as const)) {
          for (const stages of quick ? [2] : shape.spot ? [1, 3] : [1, 2, 3]) report(await runCase(bins, path, shape, ctx, cache, stages));
        }
      }
      // Parallel slots: unified (llama-server's auto mode) and per-slot streams.
      if (!quick && shape.layers <= 6) {
        report(await runCase(bins, path, shape, 4096, 'f16', 2, 4, true));
        report(await runCase(bins, path, shape, 4096, 'f16', 2, 3, false));
      }
    }
    if (!mlxOnly) report(await familyCases(bins, dir, quick));
    const mlx = process.argv.includes('--no-mlx') ? undefined : mlxSummary(await mlxMemoryCases(dir, quick, (c) => json || reportMlx(c)));
    const totals = cases.filter((c) => c.kind === 'total');
    const configs = new Set(totals.map((c) => `${c.model}/${c.ctx}/${c.cache}/${c.stages}/${c.parallel}/${c.unified}`)).size;
    const heldOut = totals.filter((c) => c.heldOut);
    const worst = [...cases].sort((a, b) => b.relativeError - a.relativeError).slice(0, 8);
    const out = {
      configurations: configs,
      devices: totals.length,
      maxRelativeError: Math.max(...totals.map((c) => c.relativeError)),
      maxErrorBytes: Math.max(...totals.map((c) => c.errorBytes)),
      devicesWithinGoal: totals.filter((c) => c.withinGoal).length,
      heldOutMaxRelativeError: heldOut.length ? Math.max(...heldOut.map((c) => c.relativeError)) : null,
      maxRelativeErrorByKind: Object.fromEntries(
        (['model', 'kv', 'compute'] as const).map((k) => [k, Math.max(...cases.filter((c) => c.kind === k).map((c) => c.relativeError))]),
      ),
      goal: 'every device total within 5 % or 32 MiB (MLX: every rank)',
      goalMet: totals.every((c) => c.withinGoal) && (mlx?.goalMet ?? true),
      // Byte counts do not depend on the machine's load, but the run time does: say what it was.
      loadAverage1m: { before: loadBefore, after: loadavg()[0] },
      worstCases: worst,
      cases,
      mlx,
    };
    process.stdout.write(`${JSON.stringify(out, null, json ? 0 : 2)}\n`);
  } finally {
    killAll();
    await rm(dir, { recursive: true, force: true });
  }
}

function reportMlx(cases: readonly MlxMemoryCase[]): void {
  for (const c of cases) {
    process.stderr.write(
      `mlx ${c.model} ${c.mode}/${c.ranks} rank ${c.rank} layers ${c.layers} ${c.kind}${c.kind === 'peak' ? ` prompt=${c.promptTokens}` : ''}: predicted ${(c.predicted / MiB).toFixed(2)} reported ${(c.reported / MiB).toFixed(2)} MiB\n`,
    );
  }
}

await main();
