import { UsageError } from '../errors.ts';
import type { GgufHeader } from '../gguf/types.ts';
import { metaNumber } from '../gguf/types.ts';

/**
 * What Orchard knows exactly about each llama.cpp architecture beyond the tensor table (which
 * gives every layer's bytes for ANY architecture): which layers use sliding-window attention,
 * whether the KV cache holds an MLA latent instead of K and V, which architectures must have
 * experts. Read from the bundled llama.cpp (src/models/<arch>.cpp, `load_arch_hparams` and
 * `load_arch_tensors`; src/llama-kv-cache.cpp). Every architecture listed here has its KV and
 * compute math checked against llama.cpp's own buffer report by bench/memory.ts.
 */
export const EXACT_ARCHS = [
  'llama',
  'qwen2',
  'qwen3',
  'gemma2',
  'gemma3',
  'qwen2moe',
  'qwen3moe',
  'phi3',
  'deepseek2',
  'glm4moe',
  'gpt-oss',
  'llama4',
  'mistral3',
] as const;
export type ExactArch = (typeof EXACT_ARCHS)[number];

export function isExactArch(a: string): a is ExactArch {
  return (EXACT_ARCHS as readonly string[]).includes(a);
}

/** Architectures whose loaders throw "n_expert must be > 0" (their FFN is experts only). */
export const MOE_ONLY: ReadonlySet<string> = new Set(['qwen2moe', 'qwen3moe', 'deepseek2', 'glm4moe', 'gpt-oss', 'llama4']);

function optionalInt(header: GgufHeader, key: string): number | undefined {
  const n = metaNumber(header, key);
  if (n === undefined) return undefined;
  if (!Number.isSafeInteger(n) || n < 0) throw new UsageError(`GGUF key ${key} = ${n} must be a non-negative integer`);
  return n;
}

/** The window and default pattern period of an architecture's SWA layers, or undefined (none). */
function swaDefaults(header: GgufHeader, arch: string): { window: number | undefined; period: number } | undefined {
  const windowKey = `${arch}.attention.sliding_window`;
  switch (arch) {
    case 'gemma2':
      // src/models/gemma2.cpp: always SWA, window 4096 unless the key says otherwise, period 2.
      return { window: optionalInt(header, windowKey) ?? 4096, period: 2 };
    case 'gemma3':
      return { window: optionalInt(header, windowKey), period: 6 };
    case 'gpt-oss':
      // src/models/openai-moe.cpp: window from the (required) key, load_swa_pattern(ml, 2).
      return { window: optionalInt(header, windowKey), period: 2 };
    case 'llama4': {
      // src/models/llama4.cpp: a sliding_window key of 0 turns chunked attention off; otherwise
      // chunked attention (chunk 8192) on 3 of every 4 layers. The chunked layers' cache is sized
      // like an SWA cache (llama-kv-cache-iswa.cpp: min(size_base, n_swa·n_seq + n_ubatch)).
      const w = optionalInt(header, windowKey);
      return w === 0 ? undefined : { window: 8192, period: 4 };
    }
    default:
      // phi3's sliding_window key is ignored by this llama.cpp ("Phi SWA is currently disabled");
      // llama/qwen/deepseek2/glm4moe/mistral3 have no SWA.
      return undefined;
  }
}

/**
 * Which layers use sliding-window attention, mirroring llama.cpp's `load_swa_pattern`
 * (src/llama-model.cpp): an explicit bool array `<arch>.attention.sliding_window_pattern` wins;
 * otherwise a period n (key or the architecture's default) where layer il is SWA iff
 * il % n < n − 1.
 */
export function swaLayers(header: GgufHeader, arch: string, layers: number): { window: number; mask: boolean[] } | undefined {
  const d = swaDefaults(header, arch);
  if (!d?.window) return undefined;
  const key = `${arch}.attention.sliding_window_pattern`;
  const v = header.metadata.get(key);
  if (v?.type === 'array') {
    if (v.itemType !== 'bool' || v.value.length < layers) {
      throw new UsageError(`GGUF key ${key} must be a bool array with one entry per layer`);
    }
    return { window: d.window, mask: (v.value as readonly boolean[]).slice(0, layers) };
  }
  const period = optionalInt(header, key) ?? d.period;
  const mask = Array.from({ length: layers }, (_, il) => period === 0 || il % period < period - 1);
  return { window: d.window, mask };
}

/**
 * Multi-head Latent Attention (deepseek2 files converted with `key_length_mla`): llama.cpp's
 * `llama_hparams::is_mla`. The KV cache then holds ONE tensor per layer, K of width key_length ×
 * head_count_kv = kv_lora_rank + rope dims (the compressed latent plus the shared rope key), and
 * no V (src/llama-kv-cache.cpp: `has_v = !is_mla`; V is read back out of the latent).
 */
export function isMla(header: GgufHeader, arch: string): boolean {
  return (optionalInt(header, `${arch}.attention.key_length_mla`) ?? 0) > 0 && (optionalInt(header, `${arch}.attention.value_length_mla`) ?? 0) > 0;
}

/**
 * Multi-token-prediction layers at the end of the block list (`<arch>.nextn_predict_layers`,
 * GLM-4.5+, DeepSeek V3 conversions that keep them). llama-server loads them only for MTP
 * speculative decoding (common.cpp: load_mtp), which Orchard never turns on: their tensors are
 * skipped (TENSOR_SKIP) and they get no KV cache, so they are not layers of the plan.
 */
export function nextnLayers(header: GgufHeader, arch: string): number {
  return optionalInt(header, `${arch}.nextn_predict_layers`) ?? 0;
}
