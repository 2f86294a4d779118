import { type Command, Option } from 'commander';
import { OrchardError } from '../../shared/errors.ts';
import { parseInteger } from '../../shared/units.ts';
import { findMlxEnv } from '../../node/mlx/env.ts';
import { MLX_TEST_ARCHS, type MlxTestArch, writeMlxTestModel } from '../../node/mlx/testmodel.ts';

interface MlxFlags {
  out: string;
  arch: MlxTestArch;
  layers: string;
  hidden: string;
  heads: string;
  kvHeads?: string;
  intermediate?: string;
  experts: string;
  activeExperts: string;
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
    .addOption(new Option('--arch <arch>', 'mlx-lm model type').choices([...MLX_TEST_ARCHS]).default('llama'))
    .option('--layers <n>', 'transformer blocks', '4')
    .option('--hidden <n>', 'hidden size', '64')
    .option('--heads <n>', 'attention heads', '4')
    .option('--kv-heads <n>', 'key/value heads (default: --heads)')
    .option('--intermediate <n>', 'FFN width (for qwen3_moe and deepseek_v3: each expert\'s)')
    .option('--experts <n>', 'routed experts (qwen3_moe, deepseek_v3; deepseek_v3 adds MLA, a shared expert and a dense first layer)', '4')
    .option('--active-experts <n>', 'experts per token', '2')
    .option('--seed <n>', 'random seed', '0')
    .option('--json', 'print the result as JSON')
    .action(async (flags: MlxFlags) => {
      const layers = parseInteger(flags.layers, '--layers', 1, 256);
      const hidden = parseInteger(flags.hidden, '--hidden', 8, 8192);
      const heads = parseInteger(flags.heads, '--heads', 1, 256);
      const kvHeads = flags.kvHeads === undefined ? undefined : parseInteger(flags.kvHeads, '--kv-heads', 1, 256);
      const intermediate = flags.intermediate === undefined ? undefined : parseInteger(flags.intermediate, '--intermediate', 1, 65_536);
      const experts = parseInteger(flags.experts, '--experts', 1, 512);
      const activeExperts = parseInteger(flags.activeExperts, '--active-experts', 1, experts);
      const seed = parseInteger(flags.seed, '--seed', 0, 2 ** 31 - 1);
      const env = await findMlxEnv();
      if (!env) throw new OrchardError('the MLX environment is not set up: run `orchard setup --mlx` first');
      const r = await writeMlxTestModel(env.python, { out: flags.out, arch: flags.arch, layers, hidden, heads, kvHeads, intermediate, experts, activeExperts, seed });
      if (flags.json) {
        process.stdout.write(`${JSON.stringify(r)}\n`);
        return;
      }
      const moe = r.experts ? `, ${r.active_experts} of ${r.experts} experts per token` : '';
      process.stdout.write(`wrote ${r.dir}: ${r.arch}, ${r.layers} layers, hidden ${r.hidden}, vocab ${r.vocab_size}${moe}\n`);
      for (const [name, sha] of Object.entries(r.files)) process.stdout.write(`  ${name.padEnd(30)} ${sha}\n`);
    });
}
