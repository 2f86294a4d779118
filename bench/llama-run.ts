/**
 * Run the real llama.cpp engines for a planned split and read what they allocate: one
 * ggml-rpc-server per stage on 127.0.0.1 (free ports), llama-server with the plan's device and
 * memory arguments, its `-lv 4` buffer-size lines parsed per device. Shared by bench/memory.ts and
 * the integration test that proves the plan → device mapping. The processes are the benches'
 * children (lib/children.ts): own process groups, SIGKILLed when the run ends, on error, on exit,
 * and by a sentinel when the bench itself is SIGKILLed.
 */
import { join } from 'node:path';
import type { LlamaBinaries } from '../src/node/llama/binaries.ts';
import { type GgmlTypeName, tensorBytes } from '../src/shared/gguf/ggml-types.ts';
import { readGgufHeader } from '../src/shared/gguf/reader.ts';
import type { GgufValue } from '../src/shared/gguf/types.ts';
import { gv } from '../src/shared/gguf/types.ts';
import { writeGguf } from '../src/shared/gguf/writer.ts';
import type { MemoryOptions } from '../src/shared/memory/stage.ts';
import { llamaDeviceArgs, llamaMemoryArgs } from '../src/shared/placement/llama-args.ts';
import { freePort, type Started, start, stop as stopChild, waitPort } from './lib/children.ts';

export const MiB = 2 ** 20;

export interface Shape {
  name: string;
  layers: number;
  embd: number;
  ffn: number;
  heads: number;
  kvHeads: number;
  type: GgmlTypeName;
  /** Not used to fit the compute-buffer constants: checks the formula on an unseen shape. */
  heldOut?: boolean;
  /** Run only a few configurations (large shapes: keeps the bench bounded). */
  spot?: boolean;
}

const ZERO_CHUNK = new Uint8Array(8 * MiB);
/** `n` zero bytes as chunks of one shared buffer, so big models never sit in memory. */
export function* zeros(n: number): Iterable<Uint8Array> {
  for (let left = n; left > 0; left -= ZERO_CHUNK.length) yield left >= ZERO_CHUNK.length ? ZERO_CHUNK : ZERO_CHUNK.subarray(0, left);
}

export async function writeModel(dir: string, s: Shape, vocabPath: string): Promise<string> {
  const vocab = await readGgufHeader(vocabPath);
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
    tensors: tensors.map((t) => ({ ...t, data: () => zeros(tensorBytes(t.type, t.dims)) })),
  });
  return path;
}

async function waitFor(pred: () => boolean, ms: number, what: string): Promise<void> {
  const end = Date.now() + ms;
  while (!pred()) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

export interface Reported {
  model: number;
  kv: number;
  compute: number;
}

/** Parse `<dev> model buffer size = X MiB` etc. into bytes per device name. */
export function parseReport(log: string): Map<string, Reported> {
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


export interface LlamaRun {
  readonly endpoints: readonly string[];
  /** Buffer sizes per RPC endpoint ("127.0.0.1:port") and "host" (the head's CPU buffers). */
  readonly reported: ReadonlyMap<string, Reported>;
  readonly log: string;
}

/** Running engines for a split: the head's URL, its log so far, and a stop that kills every group. */
export interface LlamaEngines {
  readonly endpoints: readonly string[];
  readonly url: string;
  readonly log: () => string;
  readonly stop: () => Promise<void>;
}

/** Start the engines for `ranges` (inclusive, in pipeline order) and wait until llama-server is loaded. */
export async function startLlama(
  bins: Pick<LlamaBinaries, 'llamaServer' | 'rpcServer'>,
  modelPath: string,
  layerCount: number,
  ranges: readonly (readonly [number, number])[],
  options: MemoryOptions,
  extraArgs: readonly string[] = [],
): Promise<LlamaEngines> {
  const procs: Started[] = [];
  const stop = async () => {
    for (const r of procs.splice(0)) await stopChild(r.proc);
  };
  try {
    const endpoints: string[] = [];
    for (let i = 0; i < ranges.length; i++) {
      const port = await freePort();
      const r = start(bins.rpcServer, ['-H', '127.0.0.1', '-p', String(port), '-t', '1']);
      procs.push(r);
      endpoints.push(`127.0.0.1:${port}`);
      await waitPort(port, r.proc, r.log, 15_000);
    }
    const dev = llamaDeviceArgs(
      ranges.map(([a, b], i) => ({ firstLayer: a, lastLayer: b, rpc: endpoints[i]! })),
      layerCount,
    );
    const port = await freePort();
    const args = ['-m', modelPath, ...dev.args, ...llamaMemoryArgs(options), '--host', '127.0.0.1', '--port', String(port), '-t', '1', '-lv', '4', '--no-warmup', ...extraArgs];
    const server = start(bins.llamaServer, args);
    procs.push(server);
    await Promise.race([
      waitFor(() => /server is listening|main: model loaded|all slots are idle/.test(server.log()), 120_000, 'llama-server'),
      server.exited.then((c) => {
        throw new Error(`llama-server exited (${c}):\n${server.log().slice(-2000)}`);
      }),
    ]);
    return { endpoints, url: `http://127.0.0.1:${port}`, log: server.log, stop };
  } catch (err) {
    await stop();
    throw err;
  }
}

/** Start the engines for `ranges`, wait until loaded, report what they allocated, stop. */
export async function runLlama(...args: Parameters<typeof startLlama>): Promise<LlamaRun> {
  const e = await startLlama(...args);
  try {
    return { endpoints: e.endpoints, reported: parseReport(e.log()), log: e.log() };
  } finally {
    await e.stop();
  }
}
