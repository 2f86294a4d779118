import { type Command, Option } from 'commander';
import { UsageError } from '../../shared/errors.ts';
import { addCredentialOptions, type CredentialFlags, coordinatorClient } from '../credentials.ts';

interface ReportWire {
  outcome?: { model?: string; outcome?: string; message?: string };
  apply?: boolean;
  gain?: number;
  gainNow?: number;
  fitsNow?: boolean;
  currentTokensPerSecond?: number;
  plannedTokensPerSecond?: number;
}

/** The stable JSON shape of `orchard rebalance --json`, one entry per ready model. */
export function rebalanceReportFromWire(w: ReportWire) {
  return {
    model: String(w.outcome?.model ?? ''),
    outcome: String(w.outcome?.outcome ?? ''),
    message: String(w.outcome?.message ?? ''),
    apply: !!w.apply,
    gain: Number(w.gain ?? 0),
    gainNow: w.fitsNow ? Number(w.gainNow ?? 0) : null,
    currentTokensPerSecond: Number(w.currentTokensPerSecond ?? 0),
    plannedTokensPerSecond: Number(w.plannedTokensPerSecond ?? 0),
  };
}

/**
 * `orchard rebalance [--dry-run]`: for each ready model, the predicted gain of re-planning it on
 * the nodes up now, and — unless --dry-run — the re-placement applied as load-new-then-switch
 * when it gains at least --min-gain and fits next to the running engines.
 */
export function registerRebalance(program: Command): void {
  addCredentialOptions(program.command('rebalance'))
    .description('show the predicted gain of re-planning each model on the nodes up now, and apply it (load new, switch, stop old) unless --dry-run')
    .option('--dry-run', 'only show the predicted gain and what would be done')
    .option('--model <name>', 'only this model')
    .option('--min-gain <percent>', 'apply only when predicted at least this much faster', '5')
    .addOption(new Option('--coordinator <host:port>', 'coordinator gRPC address (default 127.0.0.1:7420)').env('ORCHARD_COORDINATOR'))
    .option('--json', 'print [{model, outcome, message, apply, gain, gainNow, currentTokensPerSecond, plannedTokensPerSecond}]')
    .action(async (flags: CredentialFlags & { coordinator?: string; dryRun?: boolean; model?: string; minGain: string; json?: boolean }) => {
      const minGain = Number(flags.minGain);
      if (!Number.isFinite(minGain) || minGain < 0 || minGain > 1000) throw new UsageError(`invalid --min-gain "${flags.minGain}": a percentage such as 20`);
      const client = await coordinatorClient(flags);
      try {
        const r = await client.unary('rebalance', { dryRun: !!flags.dryRun, minGain: minGain / 100, model: flags.model ?? '' }, 30 * 60_000);
        const reports = ((r.models ?? []) as ReportWire[]).map(rebalanceReportFromWire);
        if (flags.json) {
          process.stdout.write(`${JSON.stringify(reports)}\n`);
          return;
        }
        if (reports.length === 0) process.stdout.write('no ready model\n');
        const pct = (g: number) => `${g >= 0 ? '+' : ''}${(100 * g).toFixed(0)} %`;
        for (const m of reports) {
          const tps = `${m.currentTokensPerSecond.toFixed(1)} → ${m.plannedTokensPerSecond.toFixed(1)} tok/s predicted (${pct(m.gain)})`;
          const what = m.outcome === 'switched' ? 'rebalanced' : flags.dryRun && m.apply ? 'would rebalance' : 'kept';
          process.stdout.write(`${m.model}: ${tps}; ${what}: ${m.message}\n`);
        }
      } finally {
        client.close();
      }
    });
}
