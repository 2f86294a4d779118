
import { join } from 'node:path';
import { readGgufFileInfo } from 'node-llama-cpp';
import { describe, expect, it } from 'vitest';
import { readGgufHeader } from '../../src/shared/gguf/reader.ts';
import { metaNumber, metaString } from '../../src/shared/gguf/types.ts';
import { encodeGgufHeader } from '../../src/shared/gguf/writer.ts';
import { parameterCount } from '../../src/shared/testmodel/llama.ts';
import { findPreset, PRESETS, presetSpec } from '../../src/shared/testmodel/presets.ts';
import { type PresetQuant, useMoreBits } from '../../src/shared/testmodel/quant-mix.ts';
import { orchardInProcess } from '../helpers/cli-in-process.ts';
import { tempDir } from '../helpers/temp-dir.ts';

/**
 * Reference figures of the real model families. Parameter counts are the ones Hugging Face
 * shows on each model page (rounded there, e.g. "8.03B"). File sizes are of real GGUF files
 * made by llama.cpp's quantiser; "GB" is 10^9 bytes as Hugging Face lists them, GiB where the
 * source gives GiB. Provenance, honestly stated:
 *  [read]   seen in a page during this work (quoted next to the figure);
 *  [recall] the widely mirrored listing of that file, quoted from memory — not re-read here.
 */
interface Reference {
  readonly params: number;
  readonly files: ReadonlyArray<{ quant: PresetQuant; bytes: number; source: string }>;
}
const GB = 1e9;
const GiB = 2 ** 30;
const REFERENCES: Record<string, Reference> = {
  'llama-3-8b': {
    params: 8.03e9, // meta-llama/Meta-Llama-3-8B
    files: [
      { quant: 'q4_k_m', bytes: 4.92 * GB, source: '[recall] bartowski/Meta-Llama-3-8B-Instruct-GGUF Q4_K_M 4.92GB' },
      { quant: 'q8_0', bytes: 8.54 * GB, source: '[recall] bartowski/Meta-Llama-3-8B-Instruct-GGUF Q8_0 8.54GB' },
      { quant: 'f16', bytes: 16.07 * GB, source: '[recall] bartowski/Meta-Llama-3-8B-Instruct-GGUF f16 16.07GB' },
    ],
  },
  'llama-3-70b': {
    params: 70.6e9, // meta-llama/Meta-Llama-3-70B
    files: [{ quant: 'q4_k_m', bytes: 42.52 * GB, source: '[recall] bartowski/Meta-Llama-3-70B-Instruct-GGUF Q4_K_M 42.52GB' }],
  },
  'llama-3.1-405b': {
    params: 406e9, // meta-llama/Llama-3.1-405B ("406B")
    files: [
      {
        quant: 'q4_k_m',
        bytes: (44.5 + 44.9 + 44.5 + 44.6 + 45 + 22.2) * GB,
        source: '[read] bullerwins/Meta-Llama-3.1-405B-Instruct-GGUF Q4_K_M, 6 parts: 44.5+44.9+44.5+44.6+45+22.2 GB',
      },
    ],
  },
  'qwen2.5-32b': {
    params: 32.8e9, // Qwen/Qwen2.5-32B-Instruct
    files: [{ quant: 'q4_k_m', bytes: 19.85 * GB, source: '[recall] bartowski/Qwen2.5-32B-Instruct-GGUF Q4_K_M 19.85GB' }],
  },
  'qwen2.5-7b': {
    params: 7.62e9, // Qwen/Qwen2.5-7B-Instruct
    files: [{ quant: 'q4_k_m', bytes: 4.68 * GB, source: '[recall] bartowski/Qwen2.5-7B-Instruct-GGUF Q4_K_M 4.68GB' }],
  },
  'mixtral-8x7b': {
    params: 46.7e9, // mistralai/Mixtral-8x7B-v0.1
    files: [
      // TheBloke's Dec-2023 Q4_K_M (26.44 GB) predates llama.cpp's per-layer ffn_down rule for
      // expert tensors and is ~7% smaller; current quantiser output is the reference here.
      { quant: 'q4_k_m', bytes: 26.49 * GiB, source: '[read] MaziyarPanahi/Mixtral-8x7B-Instruct-v0.1-GGUF Q4_K_M 26.49 (GiB), via localmodel.run' },
      { quant: 'q8_0', bytes: 46.22 * GiB, source: '[read] MaziyarPanahi/Mixtral-8x7B-Instruct-v0.1-GGUF Q8_0 46.22 (GiB), via localmodel.run' },
    ],
  },
  'gemma-2-27b': {
    params: 27.2e9, // google/gemma-2-27b-it
    files: [
      { quant: 'q4_k_m', bytes: 16.65 * GB, source: '[recall] bartowski/gemma-2-27b-it-GGUF Q4_K_M 16.65GB' },
      { quant: 'q8_0', bytes: 28.93 * GB, source: '[read] bartowski/gemma-2-27b-it-GGUF README: Q8_0 28.93GB' },
    ],
  },
  'phi-3-mini': {
    params: 3.82e9, // microsoft/Phi-3-mini-4k-instruct
    files: [{ quant: 'q4_k_m', bytes: 2.39 * GB, source: '[recall] microsoft/Phi-3-mini-4k-instruct-gguf q4 (Q4_K_M) 2.39GB' }],
  },
};

const within2 = (actual: number, expected: number) => Math.abs(actual - expected) / expected;

describe('header-only presets match the real families', () => {
  it('every preset has reference figures', () => {
    expect(Object.keys(REFERENCES).sort()).toEqual(PRESETS.map((p) => p.id).sort());
  });

  for (const preset of PRESETS) {
    const ref = REFERENCES[preset.id]!;
    it(`${preset.id}: parameters within 2% of ${ref.params / 1e9} B`, () => {
      const spec = presetSpec(preset, 'f16');
      expect(within2(parameterCount(spec), ref.params)).toBeLessThan(0.02);
    });
    for (const file of ref.files) {
      it(`${preset.id} ${file.quant}: tensor bytes within 2% of the real file (${file.source})`, () => {
        const { header } = encodeGgufHeader(presetSpec(preset, file.quant));
        expect(within2(header.dataSize, file.bytes)).toBeLessThan(0.02);
      });
    }
  }
});

describe('Q4_K_M per-tensor types follow llama.cpp’s mixing rule', () => {
  const types = (id: string) => new Map(encodeGgufHeader(presetSpec(findPreset(id), 'q4_k_m')).header.tensors.map((t) => [t.name, t.type.name]));

  it('use_more_bits picks the first and last eighth and every third layer between', () => {
    const more = Array.from({ length: 32 }, (_, i) => i).filter((i) => useMoreBits(i, 32));
    expect(more).toEqual([0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]);
  });

  it('llama-3-8b: Q6_K output and attn_v/ffn_down on more-bits layers, Q4_K elsewhere, F32 norms', () => {
    const t = types('llama-3-8b');
    expect(t.get('output.weight')).toBe('Q6_K');
    expect(t.get('token_embd.weight')).toBe('Q4_K');
    expect(t.get('blk.0.attn_v.weight')).toBe('Q6_K');
    expect(t.get('blk.4.attn_v.weight')).toBe('Q4_K');
    expect(t.get('blk.6.ffn_down.weight')).toBe('Q6_K');
    expect(t.get('blk.7.ffn_down.weight')).toBe('Q4_K');
    expect(t.get('blk.7.attn_q.weight')).toBe('Q4_K');
    expect(t.get('blk.7.attn_norm.weight')).toBe('F32');
    const counts: Record<string, number> = {};
    for (const v of t.values()) counts[v] = (counts[v] ?? 0) + 1;
    expect(counts).toEqual({ Q4_K: 193, Q6_K: 33, F32: 65 });
  });

  it('llama-3-70b (LLM_TYPE_70B): attn_v is at least Q5_K', () => {
    const t = types('llama-3-70b');
    expect(t.get('blk.10.attn_v.weight')).toBe('Q5_K');
    expect(t.get('blk.12.attn_v.weight')).toBe('Q6_K'); // (12 - 80/8) % 3 === 2
  });

  it('mixtral (8 experts): Q8_0 attn_k/attn_v, Q5_K attn_output, F32 router, 3-D expert tensors', () => {
    const t = types('mixtral-8x7b');
    expect(t.get('blk.5.attn_k.weight')).toBe('Q8_0');
    expect(t.get('blk.5.attn_v.weight')).toBe('Q8_0');
    expect(t.get('blk.5.attn_output.weight')).toBe('Q5_K');
    expect(t.get('blk.5.ffn_gate_inp.weight')).toBe('F32');
    expect(t.get('blk.0.ffn_down_exps.weight')).toBe('Q6_K');
    expect(t.get('blk.5.ffn_down_exps.weight')).toBe('Q4_K');
  });

  it('gemma-2 (tied embeddings): token_embd takes the output head’s Q6_K; qwen2 biases stay F32', () => {
    expect(types('gemma-2-27b').get('token_embd.weight')).toBe('Q6_K');
    expect(types('gemma-2-27b').has('output.weight')).toBe(false);
    expect(types('qwen2.5-32b').get('blk.0.attn_q.bias')).toBe('F32');
  });

  it('phi-3: fused attn_qkv counts as attn_v', () => {
    const t = types('phi-3-mini');
    expect(t.get('blk.0.attn_qkv.weight')).toBe('Q6_K');
    expect(t.get('blk.4.attn_qkv.weight')).toBe('Q4_K');
  });
});

describe('orchard testmodel gguf --shape', () => {
  const tmp = tempDir('orchard-presets-', 'all');

  const cli = orchardInProcess;

  it('writes every preset as a small, deterministic header-only file both readers accept', async () => {
    for (const preset of PRESETS) {
      const out = join(tmp.path, `${preset.id}.gguf`);
      const r1 = await cli('testmodel', 'gguf', '--shape', preset.id, '--header-only', '--out', out, '--json');
      const r2 = await cli('testmodel', 'gguf', '--shape', preset.id, '--header-only', '--out', out, '--json');
      expect(r1.code, r1.stderr).toBe(0);
      const j1 = JSON.parse(r1.stdout);
      expect(JSON.parse(r2.stdout).sha256).toBe(j1.sha256);
      expect(j1).toMatchObject({ preset: preset.id, quant: 'q4_k_m', headerOnly: true, layers: preset.layers });
      const h = await readGgufHeader(out);
      expect(h.hasData).toBe(false);
      expect(h.fileSize).toBeLessThan(256 * 1024); // even the 405B header is ~70 KB
      expect(h.dataSize).toBe(j1.tensorBytes);
      expect(metaString(h, 'general.architecture')).toBe(preset.architecture);
      expect(metaNumber(h, `${preset.architecture}.block_count`)).toBe(preset.layers);
      expect(metaNumber(h, 'general.file_type')).toBe(15); // LLAMA_FTYPE_MOSTLY_Q4_K_M
      const info = await readGgufFileInfo(out, { readTensorInfo: true, logWarnings: false });
      expect(info.tensorInfo?.length).toBe(h.tensors.length);
    }
  });

  it('honours --quant', async () => {
    const out = join(tmp.path, 'q8.gguf');
    const r = await cli('testmodel', 'gguf', '--shape', 'qwen2.5-7b', '--header-only', '--quant', 'q8_0', '--out', out, '--json');
    expect(r.code, r.stderr).toBe(0);
    const h = await readGgufHeader(out);
    expect(new Set(h.tensors.map((t) => t.type.name))).toEqual(new Set(['Q8_0', 'F32']));
    expect(metaNumber(h, 'general.file_type')).toBe(7);
  });
});
