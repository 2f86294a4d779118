import { UsageError } from '../errors.ts';
import type { MemoryOptions } from '../memory/stage.ts';
import type { TensorHash } from '../rpc-cache/known-hashes.ts';

/**
 * Plan → llama-server arguments that pin each stage's layer range to its device.
 *
 * How this llama.cpp assigns layers (src/llama-model.cpp, `load_tensors`): devices are ordered
 * RPC servers first (in `--rpc` order), then local GPUs (src/llama.cpp). With -ngl ≥ n_layer + 1
 * every layer is offloaded and the split is over n_layer + 1 units — the output layer is unit
 * n_layer. Layer il goes to the first device whose cumulative split fraction is > il/(n_layer+1)
 * (`std::upper_bound` on float32). So `--tensor-split c0,c1,…,c_last+1` with c_i = layers of
 * stage i puts exactly stage i's range on device i and the output layer on the last device.
 * Integer counts keep the float32 arithmetic exact (sums and quotients of small integers).
 */
export interface StageEndpoint {
  readonly firstLayer: number;
  readonly lastLayer: number;
  /** host:port of the stage's ggml-rpc-server; undefined for the head's local GPU. */
  readonly rpc?: string;
}

export interface DeviceArgs {
  readonly rpc: readonly string[];
  readonly tensorSplit: readonly number[];
  readonly nGpuLayers: number;
  readonly args: readonly string[];
}

/**
 * @param stages in pipeline order, covering every layer once; the last is the head. When the head
 *   has a local GPU (Metal) its stage has no `rpc` and must be last; otherwise (a CPU-only head,
 *   e.g. Linux CI) every stage is an RPC server.
 */
export function llamaDeviceArgs(stages: readonly StageEndpoint[], layerCount: number): DeviceArgs {
  if (stages.length === 0) throw new UsageError('a plan needs at least one stage');
  let next = 0;
  stages.forEach((s, i) => {
    if (s.firstLayer !== next) throw new UsageError(`stage ${i} starts at layer ${s.firstLayer}, expected ${next}`);
    if (s.lastLayer < s.firstLayer - 1) throw new UsageError(`stage ${i} has a negative layer range`);
    if (s.rpc === undefined && i !== stages.length - 1) throw new UsageError(`stage ${i} has no RPC endpoint but is not the head`);
    next = s.lastLayer + 1;
  });
  if (next !== layerCount) throw new UsageError(`stages cover layers 0–${next - 1}, model has ${layerCount}`);
  const rpc = stages.flatMap((s) => (s.rpc ? [s.rpc] : []));
  const tensorSplit = stages.map((s, i) => s.lastLayer - s.firstLayer + 1 + (i === stages.length - 1 ? 1 : 0));
  const nGpuLayers = layerCount + 1;
  const args = ['-ngl', String(nGpuLayers), '--tensor-split', tensorSplit.join(',')];
  if (rpc.length > 0) args.unshift('--rpc', rpc.join(','));
  return { rpc, tensorSplit, nGpuLayers, args };
}

/** Which device llama.cpp gives each unit (layers 0..n-1, then the output layer n), float32 as in C++. */
export function llamaLayerDevices(tensorSplit: readonly number[], layerCount: number): number[] {
  const f = Math.fround;
  const cum: number[] = [];
  let sum = f(0);
  for (const s of tensorSplit) {
    sum = f(sum + f(s));
    cum.push(sum);
  }
  const norm = cum.map((c) => f(c / sum));
  const act = layerCount + 1;
  const out: number[] = [];
  for (let il = 0; il <= layerCount; il++) {
    const x = f(il / act);
    let d = norm.findIndex((c) => c > x);
    if (d < 0) d = norm.length; // llama.cpp would index past the end; never happens for valid splits
    out.push(d);
  }
  return out;
}

/**
 * What the coordinator decides about a head llama-server (the typed StartEngine's llama field,
 * proto LlamaServerOptions); the agent alone turns it into argv.
 */
/**
 * One rpc-server a head uses, typed (proto RpcTarget): the head's agent dials it itself (at its
 * Unix socket, derived from the engine port) when `nodeId` is its own, and otherwise opens a TLS forwarder to `tunnel` that must prove to be
 * `nodeId` (src/node/tunnel/). No free-form address ever reaches llama-server's --rpc.
 */
export interface RpcTarget {
  readonly nodeId: string;
  /** That node's tunnel listener; undefined when it runs none (no cluster credentials): a head on another node refuses such a target. */
  readonly tunnel?: { readonly host: string; readonly port: number } | undefined;
  /** The rpc-server's engine port on that node: its identity (its agent derives its socket from it). */
  readonly enginePort: number;
}

export interface LlamaServerOptions {
  readonly modelPath: string;
  readonly memory: MemoryOptions;
  /** Each rpc-server, in device order. */
  readonly rpc: readonly RpcTarget[];
  /** --device names, one per stage (RPC<n>, MTL0, CPU). */
  readonly devices: readonly string[];
  readonly tensorSplit: readonly number[];
  readonly gpuLayers: number;
  readonly debugLog: boolean;
  /** Hashes the stages' nodes computed when pre-seeding: the engine offers these instead of re-hashing (rpc-cache/known-hashes.ts). */
  readonly tensorHashes?: readonly TensorHash[];
}

/**
 * KV/context/weight-buffer arguments matching the memory math's assumptions. Also the arguments
 * that decide numerics, so a one-engine run given the same ones computes what a split does.
 */
export function llamaMemoryArgs(o: MemoryOptions): string[] {
  return [
    '-c',
    String(o.ctx),
    '-np',
    String(o.parallel),
    o.unified ? '--kv-unified' : '--no-kv-unified',
    '-ctk',
    o.cacheType,
    '-ctv',
    o.cacheType,
    '-ub',
    String(o.ubatch),
    '-fa',
    o.flashAttention ? 'on' : 'off',
    // llama.cpp's own fitting would change -c behind the plan's back.
    '-fit',
    'off',
    // No CPU "extra" buffer types (repack, AMX): ggml-rpc-server only ever allocates the CPU
    // backend's default buffer, so every stage runs the plain CPU kernels. Weights the head's CPU
    // holds would otherwise get other kernels (AMX's f16 matmul accumulates in f32; the plain one,
    // built with AVX512-FP16, in f16 — greedy tokens differ) and a second, repacked copy.
    '--no-repack',
    // No host-RAM prompt cache (llama-server's default keeps up to 8 GiB): before every fresh
    // prompt it saves the slot's previous KV to host memory, and on a split that means reading
    // every worker layer's K and V back over the network (rpc-wire.ts; 2.2 s of a 20 Mbit/s
    // link's TTFT in bench:lan, ~0.7 GB per prompt for a 70B at 4k context on workers), and
    // on one node it is memory the plan never budgeted. A returning conversation is recomputed
    // instead; each slot still keeps its own prompt's prefix.
    '--cache-ram',
    '0',
  ];
}
