/**
 * bench:memory — predicted vs reported bytes per device on the real llama.cpp engine.
 *
 * For generated llama models of two shapes × ctx {512, 4096, 16384} × cache {f16, q8_0} × 1/2/3
 * stages, start one ggml-rpc-server per stage on 127.0.0.1, start llama-server with the planned
 * layer ranges pinned (`llamaDeviceArgs`), read the per-device `model buffer size`, `KV buffer
 * size` and `compute buffer size` lines from its `-lv 4` log, and compare with Orchard's
 * prediction for the same device. Goal: every device within 5 % or 32 MiB.
 *
 * Usage: node --import tsx bench/memory.ts [--json] [--quick]
 * Needs ORCHARD_LLAMA_BIN_DIR (or `orchard setup`). Every process started is killed on exit.
 */
import { type ChildProcess, spawn } from 'node:child_process';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { connect, createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { findLlamaBinaries } from '../src/node/llama/binaries.ts';
import { type GgmlTypeName, tensorBytes } from '../src/shared/gguf/ggml-types.ts';
import { readGgufHeader } from '../src/shared/gguf/reader.ts';
import type { GgufValue } from '../src/shared/gguf/types.ts';
import { gv } from '../src/shared/gguf/types.ts';
import { writeGguf } from '../src/shared/gguf/writer.ts';
import type { CacheType } from '../src/shared/memory/kv.ts';
import { DEFAULT_MEMORY_OPTIONS, type MemoryOptions, deviceBytes, hostBytes, memoryModel } from '../src/shared/memory/stage.ts';
import { modelProfile } from '../src/shared/model/profile.ts';
import { llamaDeviceArgs, llamaMemoryArgs } from '../src/shared/placement/llama-args.ts';

const MiB = 2 ** 20;
const VOCAB_FILE = process.env.ORCHARD_VOCAB_GGUF ?? '/tmp/llsrc/src/models/ggml-vocab-llama-spm.gguf';

interface Shape {
  name: string;
  layers: number;
  embd: number;
  ffn: number;
  heads: number;
  kvHeads: number;
  type: GgmlTypeName;
  /** Not used to fit the compute-buffer constants: checks the formula on an unseen shape. */
  heldOut: boolean;
}
const SHAPES: Shape[] = [
  { name: 'llama-8L-512d-f16', layers: 8, embd: 512, ffn: 1408, heads: 8, kvHeads: 4, type: 'F16', heldOut: false },
  { name: 'llama-12L-768d-q8', layers: 12, embd: 768, ffn: 2048, heads: 12, kvHeads: 4, type: 'Q8_0', heldOut: false },
  // Was held out in the first calibration round; it exposed the final-layer and per-stream rules,
  // so it is calibration data now and 5L-1536d is the unseen check.
  { name: 'llama-6L-1024d-f16', layers: 6, embd: 1024, ffn: 3584, heads: 16, kvHeads: 8, type: 'F16', heldOut: false },
  { name: 'llama-5L-1536d-q8', layers: 5, embd: 1536, ffn: 4096, heads: 12, kvHeads: 4, type: 'Q8_0', heldOut: true },
];

async function writeModel(dir: string, s: Shape): Promise<string> {
  const vocab = await readGgufHeader(VOCAB_FILE);
  const metadata = new Map<string, GgufValue>();
  for (const [k, v] of vocab.metadata) if (k.startsWith('tokenizer.')) metadata.set(k, v);
  const tokens = vocab.metadata.get('tokenizer.ggml.tokens');
  const nVocab = tokens?.type === 'array' ? tokens.value.length : 32000;
  const a = 'llama';
  metadata.set('general.architecture', gv.str(a));
  metadata.set('general.name', gv.str(s.name));
  metadata.set(`${a}.block_count`, gv.u32(s.layers));
  metadata.set(`${a}.context_length`, gv.u32(16384));
  metadata.set(`${a}.embedding_length`, gv.u32(s.embd));
  metadata.set(`${a}.feed_forward_length`, gv.u32(s.ffn));
  metadata.set(`${a}.attention.head_count`, gv.u32(s.heads));
  metadata.set(`${a}.attention.head_count_kv`, gv.u32(s.kvHeads));
  metadata.set(`${a}.attention.layer_norm_rms_epsilon`, gv.f32(1e-5));
  metadata.set(`${a}.rope.dimension_count`, gv.u32(s.embd / s.heads));
  const kv = (s.embd / s.heads) * s.kvHeads;
  const tensors: { name: string; dims: number[]; type: GgmlTypeName }[] = [];
  tensors.push({ name: 'token_embd.weight', dims: [s.embd, nVocab], type: s.type });
  for (let il = 0; il < s.layers; il++) {
    const b = `blk.${il}`;
    tensors.push({ name: `${b}.attn_norm.weight`, dims: [s.embd], type: 'F32' });
    tensors.push({ name: `${b}.attn_q.weight`, dims: [s.embd, s.embd], type: s.type });
    tensors.push({ name: `${b}.attn_k.weight`, dims: [s.embd, kv], type: s.type });
    tensors.push({ name: `${b}.attn_v.weight`, dims: [s.embd, kv], type: s.type });
    tensors.push({ name: `${b}.attn_output.weight`, dims: [s.embd, s.embd], type: s.type });
    tensors.push({ name: `${b}.ffn_norm.weight`, dims: [s.embd], type: 'F32' });
    tensors.push({ name: `${b}.ffn_gate.weight`, dims: [s.embd, s.ffn], type: s.type });
    tensors.push({ name: `${b}.ffn_up.weight`, dims: [s.embd, s.ffn], type: s.type });
    tensors.push({ name: `${b}.ffn_down.weight`, dims: [s.ffn, s.embd], type: s.type });
  }
  tensors.push({ name: 'output_norm.weight', dims: [s.embd], type: 'F32' });
  tensors.push({ name: 'output.weight', dims: [s.embd, nVocab], type: s.type });
  const path = join(dir, `${s.name}.gguf`);
  // Zero weights: memory use does not depend on the values.
  await writeGguf(path, {
    metadata,
    tensors: tensors.map((t) => ({ ...t, data: new Uint8Array(tensorBytes(t.type, t.dims)) })),
  });
  return path;
}

async function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const srv = createServer();
    srv.once('error', reject);
    srv.listen(0, '127.0.0.1', () => {
      const port = (srv.address() as { port: number }).port;
      srv.close(() => resolve(port));
    });
  });
}

const children = new Set<ChildProcess>();
function killAll(): void {
  for (const c of children) {
    try {
      if (c.pid) process.kill(-c.pid, 'SIGKILL');
    } catch {
      // already gone
    }
  }
  children.clear();
}
process.on('exit', killAll);
for (const sig of ['SIGINT', 'SIGTERM'] as const) process.on(sig, () => process.exit(130));

function start(cmd: string, args: string[]): { proc: ChildProcess; log: () => string; exited: Promise<number | null> } {
  const proc = spawn(cmd, args, { detached: true, stdio: ['ignore', 'pipe', 'pipe'] });
  children.add(proc);
  let log = '';
  proc.stdout?.on('data', (d: Buffer) => {
    log += d.toString();
  });
  proc.stderr?.on('data', (d: Buffer) => {
    log += d.toString();
  });
  const exited = new Promise<number | null>((r) => proc.on('exit', (code) => r(code)));
  return { proc, log: () => log, exited };
}

async function waitFor(pred: () => boolean, ms: number, what: string): Promise<void> {
  const end = Date.now() + ms;
  while (!pred()) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

/** ggml-rpc-server's stdout is block-buffered when piped, so readiness = the port accepts. */
async function waitForPort(port: number, ms: number): Promise<void> {
  const end = Date.now() + ms;
  for (;;) {
    const ok = await new Promise<boolean>((resolve) => {
      const s = connect(port, '127.0.0.1');
      s.once('connect', () => {
        s.destroy();
        resolve(true);
      });
      s.once('error', () => resolve(false));
    });
    if (ok) return;
    if (Date.now() > end) throw new Error(`ggml-rpc-server on port ${port} did not start`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

interface Reported {
  model: number;
  kv: number;
  compute: number;
}

/** Parse `<dev> model buffer size = X MiB` etc. into bytes per device name. */
function parseReport(log: string): Map<string, Reported> {
  const out = new Map<string, Reported>();
  const get = (d: string) => {
    let r = out.get(d);
    if (!r) {
      r = { model: 0, kv: 0, compute: 0 };
      out.set(d, r);
    }
    return r;
  };
  // Buffer names look like `RPC0[127.0.0.1:35537]` for every RPC device (the prefix is the
  // backend's, not the device index), so devices are keyed by their endpoint.
  for (const m of log.matchAll(/:\s+(\S+)\s+(model|KV|compute) buffer size =\s+([\d.]+) MiB/g)) {
    const kind = m[2] === 'model' ? 'model' : m[2] === 'KV' ? 'kv' : 'compute';
    const dev = /\[([^\]]+)\]/.exec(m[1]!)?.[1] ?? (m[1]!.startsWith('CPU') ? 'host' : m[1]!);
    get(dev)[kind] += Math.round(Number(m[3]) * MiB);
  }
  return out;
}

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
  shape: Shape,
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
  const rpcs: ReturnType<typeof start>[] = [];
  try {
    const endpoints: string[] = [];
    for (let i = 0; i < stages; i++) {
      const port = await freePort();
      const r = start(bins.rpcServer, ['-H', '127.0.0.1', '-p', String(port), '-t', '1']);
      rpcs.push(r);
      endpoints.push(`127.0.0.1:${port}`);
      await waitForPort(port, 15_000);
    }
    const dev = llamaDeviceArgs(
      ranges.map(([a, b], i) => ({ firstLayer: a, lastLayer: b, rpc: endpoints[i]! })),
      profile.layerCount,
    );
    const port = await freePort();
    const server = start(bins.llamaServer, [
      '-m',
      modelPath,
      ...dev.args,
      ...llamaMemoryArgs(options),
      '--host',
      '127.0.0.1',
      '--port',
      String(port),
      '-t',
      '1',
      '-lv',
      '4',
      '--no-warmup',
    ]);
    rpcs.push(server);
    await Promise.race([
      waitFor(() => /server is listening|main: model loaded|all slots are idle/.test(server.log()), 120_000, 'llama-server'),
      server.exited.then((c) => {
        throw new Error(`llama-server exited (${c}):\n${server.log().slice(-2000)}`);
      }),
    ]);
    if (process.env.ORCHARD_BENCH_LOG) await writeFile(process.env.ORCHARD_BENCH_LOG, server.log());
    const reported = parseReport(server.log());
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
          heldOut: shape.heldOut,
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
  } finally {
    for (const r of rpcs) {
      try {
        if (r.proc.pid) process.kill(-r.proc.pid, 'SIGKILL');
      } catch {
        // gone
      }
      children.delete(r.proc);
      await r.exited;
    }
  }
}

async function main(): Promise<void> {
  const json = process.argv.includes('--json');
  const quick = process.argv.includes('--quick');
  const bins = await findLlamaBinaries();
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
    for (const shape of SHAPES) {
      const path = await writeModel(dir, shape);
      for (const ctx of ctxs) {
        for (const cache of quick ? (['f16'] as const) : (['f16', 'q8_0'] as const)) {
          for (const stages of quick ? [2] : [1, 2, 3]) report(await runCase(bins, path, shape, ctx, cache, stages));
        }
      }
      // Parallel slots: unified (llama-server's auto mode) and per-slot streams.
      if (!quick && shape.layers <= 6) {
        report(await runCase(bins, path, shape, 4096, 'f16', 2, 4, true));
        report(await runCase(bins, path, shape, 4096, 'f16', 2, 3, false));
      }
    }
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
      goal: 'every device total within 5 % or 32 MiB',
      goalMet: totals.every((c) => c.withinGoal),
      worstCases: worst,
      cases,
    };
    process.stdout.write(`${JSON.stringify(out, null, json ? 0 : 2)}\n`);
  } finally {
    killAll();
    await rm(dir, { recursive: true, force: true });
  }
}

await main();
