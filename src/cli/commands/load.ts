import { resolve } from 'node:path';
import { type Command, Option } from 'commander';
import { OrchardError, UsageError } from '../../shared/errors.ts';
import { PARALLELISMS, type Parallelism } from '../../shared/placement/parallelism.ts';
import { formatBytes, parseInteger } from '../../shared/units.ts';
import { addCredentialOptions, type CredentialFlags, coordinatorClient } from '../credentials.ts';
import { parseHealMode } from '../../coordinator/instances/healing.ts';
import { createProgress } from '../progress.ts';

const LOAD_PHASES = ['planning', 'starting-workers', 'starting-head', 'verifying', 'ready'];

interface LoadFlags extends CredentialFlags {
  ctx: string;
  cacheType: string;
  parallel: string;
  name?: string;
  pin?: string[];
  coordinator?: string;
  json?: boolean;
  engine: string;
  heal?: string;
  parallelism: Parallelism;
  allowUntunnelledRdma?: boolean;
}

/** `orchard load MODEL.gguf`: returns when the model is ready (exit 0) or failed (exit 1, reason). */
export function registerLoad(program: Command): void {
  addCredentialOptions(program.command('load'))
    .description('load a model across the cluster (plan, start engines, verify); waits until ready')
    .argument('<model>', 'GGUF file or MLX model directory (absolute path as seen on the nodes; relative paths resolve here)')
    .option('--ctx <n>', 'context size in tokens', '4096')
    .option('--cache-type <t>', 'KV cache type: f16, q8_0, q4_0, f32, bf16', 'f16')
    .option('--parallel <n>', 'parallel sequences (llama-server slots)', '1')
    .option('--name <alias>', 'model name for generate/unload (default: the file name)')
    .option('--pin <node...>', 'nodes that must hold a stage (names or ids)')
    .option('--heal <mode>', 'auto: re-place the model when a node or engine is lost; off: fail it (default: the coordinator\'s --heal)')
    .addOption(new Option('--parallelism <p>', 'MLX layout over the ranks: pipeline, tensor (low-latency links only) or auto').choices([...PARALLELISMS]).default('auto'))
    .option('--allow-untunnelled-rdma', 'MLX: use JACCL (RDMA over Thunderbolt) when every pair of nodes has a link; its traffic bypasses the TLS tunnels')
    .option('--engine <e>', 'mlx, llama or auto (a directory with config.json → mlx, .gguf → llama)', 'auto')
    .addOption(new Option('--coordinator <host:port>', 'coordinator gRPC address (default 127.0.0.1:7420)').env('ORCHARD_COORDINATOR'))
    .option('--json', 'print progress events as JSON lines')
    .action(async (model: string, flags: LoadFlags) => {
      if (!['auto', 'mlx', 'llama'].includes(flags.engine)) throw new UsageError(`--engine must be mlx, llama or auto, got "${flags.engine}"`);
      const options = {
        ctx: parseInteger(flags.ctx, '--ctx', 16, 16_777_216),
        cacheType: flags.cacheType,
        parallel: parseInteger(flags.parallel, '--parallel', 1, 256),
        pin: flags.pin ?? [],
        parallelism: flags.parallelism,
        allowUntunnelledRdma: flags.allowUntunnelledRdma ?? false,
      };
      const client = await coordinatorClient(flags);
      const ac = new AbortController();
      const onSig = () => ac.abort();
      process.once('SIGINT', onSig);
      let last: Record<string, unknown> | undefined;
      // A bar over the load phases on a terminal; plain lines in pipes and logs.
      const bar = !flags.json && process.stderr.isTTY ? createProgress('load', LOAD_PHASES.length - 1) : undefined;
      try {
        for await (const p of client.stream('load', { modelPath: resolve(model), name: flags.name ?? '', options, engine: flags.engine === 'auto' ? '' : flags.engine, heal: parseHealMode(flags.heal) ?? '' }, ac.signal)) {
          last = p;
          if (flags.json) process.stdout.write(`${JSON.stringify(p)}\n`);
          else if (bar) bar.update(Math.max(0, LOAD_PHASES.indexOf(String(p.phase))), String(p.message));
          else if (p.phase !== 'failed') {
            // A failure is said once, by the error that ends the stream (or the line below).
            const total = Number(p.bytesTotal ?? 0);
            const size = total ? ` [${formatBytes(Number(p.bytesDone ?? 0))}/${formatBytes(total)}]` : '';
            process.stderr.write(`${Number(p.elapsedSeconds ?? 0).toFixed(1).padStart(6)} s  ${String(p.phase).padEnd(16)} ${String(p.message)}${size}\n`);
          }
        }
      } finally {
        bar?.stop(last?.phase === 'ready' ? `ready in ${Number(last.elapsedSeconds ?? 0).toFixed(1)} s` : 'failed');
        process.off('SIGINT', onSig);
        client.close();
      }
      if (last?.phase !== 'ready') throw new OrchardError(`load failed: ${String(last?.message ?? 'no result from the coordinator')}`);
      if (!flags.json) {
        const m = last!.model as Record<string, unknown>;
        process.stdout.write(`${String(m.name)} ready on ${(m.stages as unknown[]).length} stage(s)\n`);
      }
    });
}
