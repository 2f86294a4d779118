import { type Command, Option } from 'commander';
import { UsageError } from '../../shared/errors.ts';
import { writeGguf } from '../../shared/gguf/writer.ts';
import { DEFAULT_LLAMA_TEST_SHAPE as D, type LlamaTestShape, llamaTestModelSpec, parameterCount, validateLlamaShape } from '../../shared/testmodel/llama.ts';
import { FAMILY_ARCHS } from '../../shared/testmodel/families.ts';
import { familyTestModelSpec, familyTestShape, parseFamilyArch } from '../../shared/testmodel/family-model.ts';
import { PRESET_IDS, PRESET_QUANTS, anyPresetSpec } from '../../shared/testmodel/presets.ts';
import type { PresetQuant } from '../../shared/testmodel/quant-mix.ts';
import type { TestModelType } from '../../shared/testmodel/quantize.ts';
import { loadVocab } from '../../shared/testmodel/vocab.ts';
import { formatBytes, parseInteger } from '../../shared/units.ts';
import { registerTestmodelMlx } from './testmodel-mlx.ts';

interface GgufFlags {
  out: string;
  layers: string;
  dim: string;
  ffn: string;
  heads: string;
  kvHeads: string;
  type: TestModelType;
  seed: string;
  ctx: string;
  shape?: string;
  arch?: string;
  quant?: PresetQuant;
  headerOnly?: boolean;
  json?: boolean;
}

/** Largest sizes accepted for generated models: keeps a typo from filling a disk. */
const MAX_DIM = 65536;
const SHAPE_FLAGS = ['layers', 'dim', 'ffn', 'heads', 'kvHeads', 'type', 'seed', 'ctx'] as const;

export function registerTestmodel(program: Command): void {
  const testmodel = program.command('testmodel').description('write deterministic test models');
  testmodel
    .command('gguf')
    .description(
      'write a llama-architecture GGUF with seeded random weights and a real tokenizer (same arguments → same bytes), ' +
        'or with --shape a header-only GGUF shaped like a real model',
    )
    .requiredOption('--out <file>', 'GGUF file to write (replaced atomically; nothing is left behind on error)')
    .option('--layers <n>', 'transformer blocks', String(D.layers))
    .option('--dim <n>', 'embedding width', String(D.dim))
    .option('--ffn <n>', 'feed-forward width', String(D.ffn))
    .option('--heads <n>', 'attention heads', String(D.heads))
    .option('--kv-heads <n>', 'key/value heads (grouped-query attention)', String(D.kvHeads))
    .addOption(new Option('--type <type>', 'weight type').choices(['f32', 'f16', 'q8_0']).default(D.type))
    .option('--seed <n>', 'random seed (0..4294967295)', String(D.seed))
    .option('--ctx <n>', 'context length written into the metadata', String(D.ctx))
    .addOption(new Option('--shape <preset>', `real model family (header-only): ${PRESET_IDS.join(', ')}`))
    .addOption(new Option('--arch <family>', `generate a small runnable model of this llama.cpp family (with experts): ${FAMILY_ARCHS.join(', ')}`))
    .addOption(new Option('--quant <quant>', 'quantisation of a --shape preset (default q4_k_m)').choices([...PRESET_QUANTS]))
    .option('--header-only', 'write metadata and tensor infos only, no tensor data')
    .option('--json', 'print the result as JSON')
    .action(async (flags: GgufFlags, cmd: Command) => {
      // Set for this run (flag or environment), as opposed to a default or the config file.
      const explicit = (k: string) => ['cli', 'env'].includes(cmd.getOptionValueSource(k) ?? '');
      if (flags.shape !== undefined) await writePresetModel(flags, flags.shape, explicit);
      else if (flags.arch !== undefined && flags.arch !== 'llama') await writeFamilyModel(flags, flags.arch, explicit);
      else await writeGeneratedModel(flags, explicit);
    });
  registerTestmodelMlx(testmodel);
}

/** --shape: a header-only GGUF shaped like a real model family. */
async function writePresetModel(flags: GgufFlags, shapeId: string, explicit: (k: string) => boolean): Promise<void> {
  const quant = flags.quant ?? 'q4_k_m';
  const { summary, spec } = anyPresetSpec(shapeId, quant);
  if (!flags.headerOnly) throw new UsageError('--shape presets are header-only (real sizes are gigabytes): add --header-only');
  const conflicting = SHAPE_FLAGS.filter(explicit);
  if (conflicting.length > 0) {
    throw new UsageError(`--shape sets the model's shape; drop ${conflicting.map((k) => `--${k.replace(/[A-Z]/g, (c) => `-${c.toLowerCase()}`)}`).join(', ')}`);
  }
  const result = await writeGguf(flags.out, spec, { headerOnly: true });
  const { id, source, architecture, layers, dim, ffn, heads, kvHeads, ctx, vocab, experts, expertsUsed } = summary;
  report(flags.json, {
    ...written(result, spec),
    headerOnly: true,
    preset: id,
    source,
    quant,
    architecture,
    layers,
    dim,
    ffn,
    heads,
    kvHeads,
    ctx,
    vocabSize: vocab,
    ...(experts ? { experts, expertsUsed } : {}),
  });
}

/** A small llama GGUF with seeded random weights and the real tokenizer. */
async function writeGeneratedModel(flags: GgufFlags, explicit: (k: string) => boolean): Promise<void> {
  if (explicit('quant')) throw new UsageError('--quant applies to --shape presets; generated models take --type');
  const shape: LlamaTestShape = {
    layers: parseInteger(flags.layers, '--layers', 1, 1024),
    dim: parseInteger(flags.dim, '--dim', 1, MAX_DIM),
    ffn: parseInteger(flags.ffn, '--ffn', 1, 4 * MAX_DIM),
    heads: parseInteger(flags.heads, '--heads', 1, 1024),
    kvHeads: parseInteger(flags.kvHeads, '--kv-heads', 1, 1024),
    ctx: parseInteger(flags.ctx, '--ctx', 1, 2 ** 24),
    seed: parseInteger(flags.seed, '--seed', 0, 0xffffffff),
    type: flags.type,
  };
  validateLlamaShape(shape); // before the vocabulary is loaded or any file is touched
  const vocab = await loadVocab();
  const spec = llamaTestModelSpec(shape, vocab);
  const result = await writeGguf(flags.out, spec, { headerOnly: !!flags.headerOnly });
  report(flags.json, {
    ...written(result, spec),
    headerOnly: !!flags.headerOnly,
    architecture: 'llama',
    ...shape,
    vocabSize: vocab.size,
  });
}

/** --arch: a small runnable model of a MoE (or newer dense) family, the real tensor table at toy size. */
async function writeFamilyModel(flags: GgufFlags, archName: string, explicit: (k: string) => boolean): Promise<void> {
  const arch = parseFamilyArch(archName);
  const fixed = (['dim', 'ffn', 'heads', 'kvHeads', 'quant'] as const).filter(explicit);
  if (fixed.length > 0) throw new UsageError(`--arch models have a fixed small shape; only --layers, --type, --seed and --ctx apply (drop --${fixed.join(', --')})`);
  const layers = parseInteger(flags.layers, '--layers', 2, 64);
  const seed = parseInteger(flags.seed, '--seed', 0, 0xffffffff);
  const shape = { ...familyTestShape(arch, layers), ctx: parseInteger(flags.ctx, '--ctx', 1, 2 ** 24) };
  const vocab = await loadVocab();
  const spec = familyTestModelSpec(shape, vocab, flags.type, seed);
  const result = await writeGguf(flags.out, spec, { headerOnly: !!flags.headerOnly });
  const { dim, heads, kvHeads, experts, expertsUsed, sharedExperts, ctx } = shape;
  report(flags.json, { ...written(result, spec), headerOnly: !!flags.headerOnly, architecture: arch, layers, dim, heads, kvHeads, experts, expertsUsed, sharedExperts, ctx, seed, type: flags.type, vocabSize: vocab.size });
}

/** What every summary says about the file written. */
function written(result: Awaited<ReturnType<typeof writeGguf>>, spec: Parameters<typeof parameterCount>[0]) {
  return { path: result.path, sha256: result.sha256, bytes: result.bytes, parameters: parameterCount(spec), tensorBytes: result.header.dataSize, tensors: spec.tensors.length };
}

interface Summary {
  readonly path: string;
  readonly bytes: number;
  readonly parameters: number;
  readonly sha256: string;
  readonly headerOnly: boolean;
  readonly [more: string]: unknown;
}

function report(json: boolean | undefined, summary: Summary): void {
  if (json) {
    process.stdout.write(`${JSON.stringify(summary)}\n`);
    return;
  }
  const kind = summary.headerOnly ? ' (header only)' : '';
  process.stdout.write(
    `wrote ${summary.path}${kind}: ${formatBytes(summary.bytes)}, ${(summary.parameters / 1e9).toFixed(3)} B parameters, sha256 ${summary.sha256}\n`,
  );
}
