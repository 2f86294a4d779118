import { type Command, Option } from 'commander';
import { UsageError } from '../../shared/errors.ts';
import { writeGguf } from '../../shared/gguf/writer.ts';
import { DEFAULT_LLAMA_TEST_SHAPE as D, type LlamaTestShape, llamaTestModelSpec, parameterCount } from '../../shared/testmodel/llama.ts';
import type { TestModelType } from '../../shared/testmodel/quantize.ts';
import { loadVocab } from '../../shared/testmodel/vocab.ts';
import { formatBytes, parseInteger } from '../../shared/units.ts';

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
  json?: boolean;
}

/** Largest sizes accepted for generated (data-carrying) models: keeps typos from filling a disk. */
const MAX_DIM = 65536;

export function registerTestmodel(program: Command): void {
  const testmodel = program.command('testmodel').description('write deterministic test models');
  testmodel
    .command('gguf')
    .description('write a llama-architecture GGUF with seeded random weights and a real tokenizer (same arguments → same bytes)')
    .requiredOption('--out <file>', 'GGUF file to write (replaced atomically)')
    .option('--layers <n>', 'transformer blocks', String(D.layers))
    .option('--dim <n>', 'embedding width', String(D.dim))
    .option('--ffn <n>', 'feed-forward width', String(D.ffn))
    .option('--heads <n>', 'attention heads', String(D.heads))
    .option('--kv-heads <n>', 'key/value heads (grouped-query attention)', String(D.kvHeads))
    .addOption(new Option('--type <type>', 'weight type').choices(['f32', 'f16', 'q8_0']).default(D.type))
    .option('--seed <n>', 'random seed (uint32)', String(D.seed))
    .option('--ctx <n>', 'context length written into the metadata', String(D.ctx))
    .option('--json', 'print the result as JSON')
    .action(async (flags: GgufFlags) => {
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
      const vocab = await loadVocab();
      const spec = llamaTestModelSpec(shape, vocab); // validates the shape before any I/O
      const result = await writeGguf(flags.out, spec);
      const summary = {
        path: result.path,
        sha256: result.sha256,
        bytes: result.bytes,
        parameters: parameterCount(spec),
        tensors: spec.tensors.length,
        architecture: 'llama',
        ...shape,
        vocabSize: vocab.size,
      };
      if (flags.json) process.stdout.write(`${JSON.stringify(summary)}\n`);
      else {
        process.stdout.write(
          `wrote ${result.path}: ${formatBytes(result.bytes)}, ${(summary.parameters / 1e6).toFixed(1)} M parameters, sha256 ${result.sha256}\n`,
        );
      }
    });
  if (!testmodel.commands.length) throw new UsageError('testmodel has no subcommands');
}
