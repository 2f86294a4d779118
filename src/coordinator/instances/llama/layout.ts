import type { MemoryOptions } from '../../../shared/memory/stage.ts';
import { type LlamaServerOptions, llamaDeviceArgs, type RpcTarget } from '../../../shared/placement/llama-args.ts';
import type { PlannedDevice } from './verify.ts';

/**
 * From a plan's stages to the llama-server arguments that pin each stage's layer range to its
 * device, and the devices verification expects. Pure. The split arithmetic is the planner's
 * (`llamaDeviceArgs`, src/shared/placement/llama-args.ts); this adds what the coordinator owns:
 * * Device names. RPC devices are `RPC<dev>[host:port]` (one device per server here, so
 *   `RPC0[…]`, the endpoint the head dials: `unix:<path>` of the rpc-server itself on the head's
 *   node or of a tunnel forwarder for another node (src/node/engine-sockets.ts), or a
 *   127.0.0.1 host:port where an agent runs without Unix legs); the head's Metal GPU is `MTL0`. `--device` names them in stage order so the
 *   order never depends on registration order (llama.cpp: RPC first, then local GPUs).
 * * On a CPU-only build (Linux here) the CPU is not a device for -ngl/--tensor-split, so the
 *   head's own layers (and the output layer) need a ggml-rpc-server on the head node's
 *   127.0.0.1; on macOS the head's Metal device holds them directly.
 * * `debugLog`: the agent starts llama-server at -lv 5 instead of 4.
 * The agent turns the typed options into argv (src/node/engine-spec.ts `llamaServerArgs`).
 */
export interface LayoutStage {
  readonly nodeId: string;
  readonly nodeName: string;
  readonly firstLayer: number;
  readonly lastLayer: number;
  readonly predicted?: PlannedDevice['predicted'];
  readonly budgetBytes?: number;
}

export interface HeadOptions {
  readonly modelPath: string;
  readonly nLayer: number;
  readonly memory: MemoryOptions;
  /** The head's llama-server has a GPU device (macOS Metal) for the head stage. */
  readonly headHasGpu: boolean;
  /**
   * Start the engine at DEBUG verbosity (`-lv 5`) so it prints every layer's device. Off by
   * default: the debug log also prints per token and slows decode; verification then derives
   * the ranges from the KV buffer sizes (engine-verify.ts `layersFromKv`).
   */
  readonly debugLog?: boolean | undefined;
}

export function stageDevice(endpoint: string | undefined, isHeadGpu: boolean): string {
  if (isHeadGpu) return 'MTL0';
  if (!endpoint) throw new Error('an RPC stage needs an endpoint');
  return `RPC0[${endpoint}]`;
}

const targetKey = (t: RpcTarget) => `${t.nodeId}/${t.enginePort}`;

export interface HeadLayout {
  readonly llama: LlamaServerOptions;
  /**
   * The devices verification expects, named as llama-server's log names them: by the local
   * endpoint it dials (a Unix socket, or 127.0.0.1 host:port) for each rpc target (direct, or a tunnel forwarder the head agent picked),
   * which the agent reports in StartEngineResponse.rpc_endpoints, one per `llama.rpc` entry.
   */
  devices(rpcEndpoints: readonly string[]): PlannedDevice[];
}

/**
 * @param targets each stage's rpc-server in stage order; for a GPU head the last entry is
 *   undefined (no rpc-server there).
 */
export function headLayout(stages: readonly LayoutStage[], targets: readonly (RpcTarget | undefined)[], o: HeadOptions): HeadLayout {
  if (targets.length !== stages.length) throw new Error('one rpc target per stage');
  const last = stages.length - 1;
  const rpcStage = (i: number) => !(i === last && o.headHasGpu);
  const dev = llamaDeviceArgs(
    stages.map((s, i) => ({ firstLayer: s.firstLayer, lastLayer: s.lastLayer, ...(rpcStage(i) ? { rpc: targetKey(targets[i]!) } : {}) })),
    o.nLayer,
  );
  const byKey = new Map(targets.flatMap((t) => (t ? [[targetKey(t), t] as const] : [])));
  const deviceIndex = (i: number) => dev.rpc.indexOf(targetKey(targets[i]!));
  const llama: LlamaServerOptions = {
    modelPath: o.modelPath,
    memory: o.memory,
    rpc: dev.rpc.map((k) => byKey.get(k)!),
    // `--device` takes the registered device names: llama.cpp numbers RPC devices globally in
    // --rpc order (RPC0, RPC1, …; checked with --list-devices on this version), while its buffer
    // log lines say RPC<index within the server>[endpoint] — the names verification matches.
    devices: stages.map((_s, i) => (rpcStage(i) ? `RPC${deviceIndex(i)}` : 'MTL0')),
    tensorSplit: dev.tensorSplit,
    gpuLayers: dev.nGpuLayers,
    // llama.cpp's INFO lines (devices, buffer sizes) need -lv 4; DEBUG (5) adds every layer's device.
    debugLog: o.debugLog === true,
  };
  const devices = (rpcEndpoints: readonly string[]): PlannedDevice[] => {
    if (rpcEndpoints.length !== llama.rpc.length) throw new Error(`the head reported ${rpcEndpoints.length} rpc endpoint(s) for ${llama.rpc.length} target(s)`);
    return stages.map((s, i) => ({
      device: stageDevice(rpcStage(i) ? rpcEndpoints[deviceIndex(i)] : undefined, !rpcStage(i)),
      nodeName: s.nodeName,
      firstLayer: s.firstLayer,
      lastLayer: s.lastLayer,
      holdsOutput: i === last,
      predicted: s.predicted,
      budgetBytes: s.budgetBytes,
    }));
  };
  return { llama, devices };
}

/** The llama-server threads named by ORCHARD_LLAMA_SERVER_EXTRA_ARGS (`-t N` / `--threads N`): the only tuning a typed StartEngine carries. */
export function headThreads(extraArgs: readonly string[] | undefined): number {
  const a = extraArgs ?? [];
  if (a.length === 0) return 0;
  const flag = a[0] === '-t' || a[0] === '--threads';
  const n = Number(a[1]);
  if (a.length !== 2 || !flag || !Number.isInteger(n) || n < 1) {
    throw new Error(`extra llama-server arguments "${a.join(' ')}": only "-t N" is supported (the agent builds the command line)`);
  }
  return n;
}
