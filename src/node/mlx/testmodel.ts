import { execFile } from 'node:child_process';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';
import { OrchardError, UsageError } from '../../shared/errors.ts';
import { mlxProcessEnv } from './env.ts';

const run = promisify(execFile);
const SCRIPT = join(dirname(fileURLToPath(import.meta.url)), 'mlx_testmodel.py');

export const MLX_TEST_ARCHS = ['llama', 'ministral3', 'qwen3_moe', 'deepseek_v3'] as const;
export type MlxTestArch = (typeof MLX_TEST_ARCHS)[number];

export interface MlxTestModelOptions {
  out: string;
  arch?: MlxTestArch;
  layers?: number;
  hidden?: number;
  heads?: number;
  kvHeads?: number;
  /** FFN width (dense layers and, for the MoE architectures, each expert). */
  intermediate?: number;
  /** Routed experts and experts per token (qwen3_moe, deepseek_v3); default 4 and 2. */
  experts?: number;
  activeExperts?: number;
  seed?: number;
}

export interface MlxTestModelResult {
  dir: string;
  arch: string;
  layers: number;
  hidden: number;
  vocab_size: number;
  /** Present for the MoE architectures. */
  experts?: number;
  active_experts?: number;
  /** sha256 per written file: same options → same hashes. */
  files: Record<string, string>;
}

/**
 * Write a deterministic tiny MLX model directory (float32 weights from MLX's seeded RNG through
 * mlx-lm's own model class and save helpers; a hand-written byte-level BPE tokenizer) using the
 * MLX venv's Python. Defaults: llama, 4 layers, hidden 64, 4 heads, seed 0.
 */
export async function writeMlxTestModel(python: string, o: MlxTestModelOptions): Promise<MlxTestModelResult> {
  const layers = o.layers ?? 4;
  const hidden = o.hidden ?? 64;
  const heads = o.heads ?? 4;
  if (!Number.isInteger(layers) || layers < 1 || layers > 256) throw new UsageError(`--layers must be 1..256, got ${layers}`);
  if (!Number.isInteger(hidden) || hidden < 8 || hidden > 8192) throw new UsageError(`--hidden must be 8..8192, got ${hidden}`);
  if (hidden % heads !== 0) throw new UsageError(`--hidden ${hidden} must be divisible by the head count ${heads}`);
  const args = [
    SCRIPT,
    '--out',
    resolve(o.out),
    '--arch',
    o.arch ?? 'llama',
    '--layers',
    String(layers),
    '--hidden',
    String(hidden),
    '--heads',
    String(heads),
    '--seed',
    String(o.seed ?? 0),
  ];
  if (o.kvHeads) args.push('--kv-heads', String(o.kvHeads));
  if (o.intermediate !== undefined) {
    if (!Number.isInteger(o.intermediate) || o.intermediate < 1 || o.intermediate > 65_536) throw new UsageError(`--intermediate must be 1..65536, got ${o.intermediate}`);
    args.push('--intermediate', String(o.intermediate));
  }
  const experts = o.experts ?? 4;
  const active = o.activeExperts ?? 2;
  if (!Number.isInteger(experts) || experts < 1 || experts > 512) throw new UsageError(`--experts must be 1..512, got ${experts}`);
  if (!Number.isInteger(active) || active < 1 || active > experts) throw new UsageError(`--active-experts must be 1..${experts}, got ${active}`);
  args.push('--experts', String(experts), '--active-experts', String(active));
  try {
    const { stdout } = await run(python, args, { env: { ...process.env, ...mlxProcessEnv() }, timeout: 300_000 });
    return JSON.parse(stdout.trim().split('\n').pop() ?? '') as MlxTestModelResult;
  } catch (err) {
    const e = err as { stderr?: string; message?: string };
    const why = (e.stderr || e.message || String(err)).trim().split('\n').slice(-1)[0];
    throw new OrchardError(`writing the MLX test model failed: ${why}`);
  }
}
