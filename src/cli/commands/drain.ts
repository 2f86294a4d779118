import { type Command, Option } from 'commander';
import { addCredentialOptions, type CredentialFlags, coordinatorClient } from '../credentials.ts';

interface MoveWire {
  model?: string;
  outcome?: string;
  message?: string;
}

/**
 * `orchard node drain NODE [--undo]`: the coordinator moves every model off the node (load the new
 * placement next to the old one, switch, stop the old engines; or stop and re-place when memory
 * does not allow both) and keeps new placements off it until `--undo`. Waits until the moves are
 * done: a model load can take minutes.
 */
export function registerDrain(node: Command): void {
  // `orchard node` has --json of its own; commander gives it to the parent wherever it stands.
  const parentJson = () => node.opts<{ json?: boolean }>().json;
  addCredentialOptions(node.command('drain'))
    .description('move every model off a node and keep new placements off it (no failed request when the other nodes can hold the models)')
    .argument('<node>', 'node name (as `orchard status` shows it) or id')
    .option('--undo', 'let placements use the node again (models move back only by `orchard rebalance`)')
    .addOption(new Option('--coordinator <host:port>', 'coordinator gRPC address (default 127.0.0.1:7420)').env('ORCHARD_COORDINATOR'))
    .option('--json', 'print {nodeId, name, moved: [{model, outcome, message}]}')
    .action(async (name: string, flags: CredentialFlags & { coordinator?: string; undo?: boolean; json?: boolean }) => {
      const client = await coordinatorClient(flags);
      try {
        const r = await client.unary('drain', { node: name, undo: !!flags.undo }, 30 * 60_000);
        const moved = ((r.moved ?? []) as MoveWire[]).map((m) => ({ model: String(m.model ?? ''), outcome: String(m.outcome ?? ''), message: String(m.message ?? '') }));
        if (flags.json || parentJson()) {
          process.stdout.write(`${JSON.stringify({ nodeId: r.nodeId, name: r.name, moved })}\n`);
          return;
        }
        if (flags.undo) process.stdout.write(`node ${String(r.name)} takes placements again\n`);
        else process.stdout.write(`node ${String(r.name)} drained${moved.length === 0 ? ': it ran no model' : ''}\n`);
        for (const m of moved) process.stdout.write(`  ${m.model}: ${m.outcome} — ${m.message}\n`);
      } finally {
        client.close();
      }
    });
}
