import { availableParallelism } from 'node:os';
import cliProgress from 'cli-progress';
import { type Command, Option } from 'commander';
import { createLogger, type Logger } from '../../shared/log.ts';
import { parseInteger } from '../../shared/units.ts';
import { type BuildEvents, setupLlama } from '../../node/llama/build.ts';
import { type BuildProgress, progressFraction } from '../../node/llama/build-config.ts';
import { checkExternalBinaries } from '../../node/llama/external.ts';
import { describeMlx, setupMlx } from './setup-mlx.ts';
import { describeTunnelRelay, setupTunnelRelay } from './setup-tunnel.ts';
import { describeNats, setupNats } from './setup-nats.ts';

interface SetupFlags {
  json?: boolean;
  force?: boolean;
  binDir?: string;
  jobs?: string;
  mlx?: boolean;
  nats?: boolean;
}

interface SetupOutput {
  llamaServer: string;
  rpcServer: string;
  llamaCppVersion: string;
  binDir: string;
  cached: boolean;
  buildSeconds: number;
  options: Record<string, string>;
  /** build: compiled now; cache: found a previous build; external: --bin-dir / ORCHARD_LLAMA_BIN_DIR. */
  source: 'build' | 'cache' | 'external';
}

export function registerSetup(program: Command): void {
  program
    .command('setup')
    .description('build or locate the inference engines (llama.cpp llama-server and ggml-rpc-server with RPC)')
    .option('--json', 'print the result as JSON on stdout')
    .option('--force', 'rebuild even if a cached build exists')
    .addOption(new Option('--bin-dir <dir>', 'use existing llama.cpp binaries from DIR after checking they support RPC').env('ORCHARD_LLAMA_BIN_DIR'))
    .option('--jobs <n>', 'parallel compile jobs (default: number of CPUs)')
    .option('--mlx', 'also create the pinned MLX Python venv (mlx, mlx-lm) for the MLX engine')
    .option('--nats', 'also build nats-server with Go (the coordinator starts it for events and shared state) unless one is installed')
    .addHelpText(
      'after',
      '\nBuilds from the llama.cpp source shipped inside node-llama-cpp into a per-user cache\n' +
        '($ORCHARD_CACHE_DIR, else ~/Library/Caches/orchard on macOS, $XDG_CACHE_HOME/orchard or ~/.cache/orchard elsewhere).\n' +
        'A second run finds the cache and returns at once.',
    )
    .action(async (flags: SetupFlags) => {
      const jobs = flags.jobs === undefined ? availableParallelism() : parseInteger(flags.jobs, '--jobs', 1, 1024);
      const log = createLogger('setup');
      const binDir = flags.binDir;
      let out: SetupOutput;
      if (binDir) {
        const ext = await checkExternalBinaries(binDir);
        out = { ...ext, cached: false, buildSeconds: 0, options: {}, source: 'external' };
      } else {
        const reporter = progressReporter(log);
        try {
          const r = await setupLlama({ force: !!flags.force, jobs, events: reporter.events });
          out = { ...r, source: r.cached ? 'cache' : 'build' };
        } finally {
          reporter.stop();
        }
      }
      const mlx = await setupMlx(!!flags.mlx, !!flags.force && !!flags.mlx, log);
      const nats = await setupNats(!!flags.nats, !!flags.force && !!flags.nats, log);
      const tunnelRelay = await setupTunnelRelay(!!flags.force, log);
      if (flags.json) {
        process.stdout.write(`${JSON.stringify({ ...out, mlx, nats, tunnelRelay })}\n`);
        return;
      }
      const how = out.source === 'external' ? 'existing binaries, RPC supported' : out.cached ? 'cached' : `built in ${formatSeconds(out.buildSeconds)}`;
      process.stdout.write(
        `llama.cpp ${out.llamaCppVersion} (${how})\n` + `  llama-server     ${out.llamaServer}\n` + `  ggml-rpc-server  ${out.rpcServer}\n`,
      );
      process.stdout.write(describeMlx(mlx) + describeNats(nats) + describeTunnelRelay(tunnelRelay));
    });
}

function formatSeconds(s: number): string {
  const m = Math.floor(s / 60);
  return m > 0 ? `${m}m${Math.round(s - m * 60)}s` : `${s.toFixed(1)}s`;
}

/**
 * A progress bar on a terminal; otherwise (CI, pipes) a log line when the build crosses another
 * 10 % or every 30 s, so a log shows it is alive without drowning in ninja lines.
 */
function progressReporter(log: Logger): { events: BuildEvents; stop(): void } {
  const tty = !!process.stderr.isTTY;
  let bar: cliProgress.SingleBar | undefined;
  let lastDecile = -1;
  let lastAt = 0;
  const started = Date.now();
  const events: BuildEvents = {
    phase(name, detail) {
      bar?.stop();
      bar = undefined;
      log.info({ phase: name }, `${name}${detail ? `: ${detail}` : ''}`);
    },
    waiting(holder) {
      log.info({ holder }, `another orchard setup (pid ${holder.pid} on ${holder.host}) is building; waiting for it`);
    },
    progress(p: BuildProgress) {
      const frac = progressFraction(p);
      const [value, total] = 'percent' in p ? [p.percent, 100] : [p.done, p.total];
      if (tty) {
        if (!bar) {
          bar = new cliProgress.SingleBar(
            { stream: process.stderr, format: 'building llama.cpp [{bar}] {percentage}% | {value}/{total} | {duration_formatted}', hideCursor: true },
            cliProgress.Presets.shades_classic,
          );
          bar.start(total, value);
        }
        bar.setTotal(total);
        bar.update(value);
        return;
      }
      const decile = Math.floor(frac * 10);
      const now = Date.now();
      if (decile > lastDecile || now - lastAt >= 30_000) {
        lastDecile = decile;
        lastAt = now;
        log.info({ done: value, total, elapsedSeconds: Math.round((now - started) / 1000) }, `building llama.cpp ${value}/${total} (${Math.round(frac * 100)}%)`);
      }
    },
  };
  return {
    events,
    stop() {
      bar?.stop();
    },
  };
}
