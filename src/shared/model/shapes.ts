import { type GgmlTypeName, ggmlType, tensorBytes } from '../gguf/ggml-types.ts';
import type { GgufHeader, GgufTensorInfo, GgufValue } from '../gguf/types.ts';
import { gv } from '../gguf/types.ts';
import { encodeGgufHeader } from '../gguf/writer.ts';
import { anyPresetSpec, hyperparameterMetadata } from '../testmodel/presets.ts';
import type { PresetQuant } from '../testmodel/quant-mix.ts';

/** The header of a foundation preset (`orchard testmodel gguf --shape ID --quant Q --header-only`). */
export function presetHeader(id: string, quant: PresetQuant): GgufHeader {
  return encodeGgufHeader(anyPresetSpec(id, quant).spec).header;
}

/**
 * Model headers for tests and benchmarks.
 *
 * - `presetHeader`: the foundation's header-only presets of real models (src/shared/testmodel:
 *   published shapes, llama.cpp's per-tensor quant mix, checked against real files).
 * - `shapeHeader`: a synthetic llama-style header of any shape with a fixed, simple quant mix
 *   (Q4_K_M here = Q4_K everywhere except Q6_K for attn_v, ffn_down and output in every layer),
 *   for tests that need to know every tensor's type to compute bytes independently.
 */
export interface ModelShape {
  readonly name: string;
  readonly arch: 'llama' | 'qwen2' | 'gemma2';
  readonly layers: number;
  readonly embd: number;
  readonly ffn: number;
  readonly heads: number;
  readonly kvHeads: number;
  readonly vocab: number;
  readonly ctx: number;
  readonly experts?: number;
  readonly expertsUsed?: number;
  readonly tiedOutput?: boolean;
}

export type QuantMix = 'f16' | 'q8_0' | 'q4_k_m' | 'q6_k';

function types(q: QuantMix): { main: GgmlTypeName; more: GgmlTypeName; output: GgmlTypeName; embd: GgmlTypeName } {
  switch (q) {
    case 'f16':
      return { main: 'F16', more: 'F16', output: 'F16', embd: 'F16' };
    case 'q8_0':
      return { main: 'Q8_0', more: 'Q8_0', output: 'Q8_0', embd: 'Q8_0' };
    case 'q6_k':
      return { main: 'Q6_K', more: 'Q6_K', output: 'Q6_K', embd: 'Q6_K' };
    case 'q4_k_m':
      return { main: 'Q4_K', more: 'Q6_K', output: 'Q6_K', embd: 'Q4_K' };
  }
}

/** A GGUF header (no data) for `shape` quantised as `quant`. */
export function shapeHeader(shape: ModelShape, quant: QuantMix): GgufHeader {
  const t = types(quant);
  const headDim = shape.embd / shape.heads;
  const kv = headDim * shape.kvHeads;
  const tensors: GgufTensorInfo[] = [];
  let offset = 0;
  const add = (name: string, dims: number[], type: GgmlTypeName) => {
    const bytes = tensorBytes(type, dims);
    tensors.push({ name, dims, type: ggmlType(type), offset, bytes });
    offset += Math.ceil(bytes / 32) * 32;
  };
  add('token_embd.weight', [shape.embd, shape.vocab], t.embd);
  for (let il = 0; il < shape.layers; il++) {
    const b = `blk.${il}`;
    add(`${b}.attn_norm.weight`, [shape.embd], 'F32');
    add(`${b}.attn_q.weight`, [shape.embd, shape.embd], t.main);
    add(`${b}.attn_k.weight`, [shape.embd, kv], t.main);
    add(`${b}.attn_v.weight`, [shape.embd, kv], t.more);
    add(`${b}.attn_output.weight`, [shape.embd, shape.embd], t.main);
    add(`${b}.ffn_norm.weight`, [shape.embd], 'F32');
    if (shape.experts) {
      add(`${b}.ffn_gate_inp.weight`, [shape.embd, shape.experts], 'F32');
      add(`${b}.ffn_gate_exps.weight`, [shape.embd, shape.ffn, shape.experts], t.main);
      add(`${b}.ffn_up_exps.weight`, [shape.embd, shape.ffn, shape.experts], t.main);
      add(`${b}.ffn_down_exps.weight`, [shape.ffn, shape.embd, shape.experts], t.more);
    } else {
      add(`${b}.ffn_gate.weight`, [shape.embd, shape.ffn], t.main);
      add(`${b}.ffn_up.weight`, [shape.embd, shape.ffn], t.main);
      add(`${b}.ffn_down.weight`, [shape.ffn, shape.embd], t.more);
    }
  }
  add('output_norm.weight', [shape.embd], 'F32');
  if (!shape.tiedOutput) add('output.weight', [shape.embd, shape.vocab], t.output);
  const a = shape.arch;
  const metadata = new Map<string, GgufValue>([
    ['general.architecture', gv.str(a)],
    ['general.name', gv.str(shape.name)],
    ...hyperparameterMetadata(a, shape),
  ]);
  if (shape.experts) {
    metadata.set(`${a}.expert_count`, gv.u32(shape.experts));
    metadata.set(`${a}.expert_used_count`, gv.u32(shape.expertsUsed ?? 2));
  }
  if (a === 'gemma2') metadata.set(`${a}.attention.sliding_window`, gv.u32(4096));
  return { version: 3, metadata, tensors, alignment: 32, dataOffset: 0, dataSize: offset };
}
