import { type Command, Option } from 'commander';
import { OrchardError } from '../../shared/errors.ts';
import { parseInteger } from '../../shared/units.ts';
import { findMlxEnv } from '../../node/mlx/env.ts';
import { writeMlxTestModel } from '../../node/mlx/testmodel.ts';

interface MlxFlags {
  out: string;
  arch: 'llama' | 'ministral3';
  layers: string;
  hidden: string;
  heads: string;
  kvHeads?: string;
  seed: string;
  json?: boolean;
}

/** `orchard testmodel mlx`: a deterministic tiny MLX model directory (needs the MLX venv). */
export function registerTestmodelMlx(testmodel: Command): void {
  testmodel
    .command('mlx')
    .description(
      'write a tiny MLX model directory (config.json, model.safetensors + index, byte-level BPE tokenizer) ' +
        'with seeded weights; same arguments → same bytes. Needs `orchard setup --mlx`.',
    )
    .requiredOption('--out <dir>', 'model directory to write')
    .addOption(new Option('--arch <arch>', 'mlx-lm model type').choices(['llama', 'ministral3']).default('llama'))
    .option('--layers <n>', 'transformer blocks', '4')
    .option('--hidden <n>', 'hidden size', '64')
    .option('--heads <n>', 'attention heads', '4')
    .option('--kv-heads <n>', 'key/value heads (default: --heads)')
    .option('--seed <n>', 'random seed', '0')
    .option('--json', 'print the result as JSON')
    .action(async (flags: MlxFlags) => {
      const layers = parseInteger(flags.layers, '--layers', 1, 256);
      const hidden = parseInteger(flags.hidden, '--hidden', 8, 8192);
      const heads = parseInteger(flags.heads, '--heads', 1, 256);
      const kvHeads = flags.kvHeads === undefined ? undefined : parseInteger(flags.kvHeads, '--kv-heads', 1, 256);
      const seed = parseInteger(flags.seed, '--seed', 0, 2 ** 31 - 1);
      const env = await findMlxEnv();
      if (!env) throw new OrchardError('the MLX environment is not set up: run `orchard setup --mlx` first');
      const r = await writeMlxTestModel(env.python, { out: flags.out, arch: flags.arch, layers, hidden, heads, kvHeads, seed });
      if (flags.json) {
        process.stdout.write(`${JSON.stringify(r)}\n`);
        return;
      }
      process.stdout.write(`wrote ${r.dir}: ${r.arch}, ${r.layers} layers, hidden ${r.hidden}, vocab ${r.vocab_size}\n`);
      for (const [name, sha] of Object.entries(r.files)) process.stdout.write(`  ${name.padEnd(30)} ${sha}\n`);
    });
}
