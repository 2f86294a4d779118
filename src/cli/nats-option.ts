import { type Command, Option } from 'commander';
import type { NatsSetting } from '../coordinator/nats/cluster-state.ts';
import { UsageError } from '../shared/errors.ts';

/**
 * `--nats URL` / `--no-nats`, shared by `orchard up` and `orchard coordinator`: a NATS server (or
 * comma-separated servers of one cluster) holds the cluster's state; neither flag = start a local
 * `nats-server -js` when one is installed, else the file store; `--no-nats` = the file store.
 */
export function addNatsOptions(cmd: Command): Command {
  return cmd
    .addOption(new Option('--nats <url>', 'NATS server(s) with JetStream for the cluster state (default: a local nats-server if installed)').env('ORCHARD_NATS_URL'))
    .addOption(new Option('--no-nats', 'keep the cluster state in the state dir only (one coordinator), even if nats-server is installed'));
}

/** commander gives a string (--nats URL), false (--no-nats) or undefined (neither). */
export function natsSetting(value: string | boolean | undefined): NatsSetting {
  if (value === false) return {};
  if (typeof value === 'string') {
    for (const u of value.split(',')) {
      if (!/^(nats|tls):\/\/[^\s/]+$/.test(u) && !/^[^\s/:]+:\d+$/.test(u)) throw new UsageError(`invalid --nats "${u}": give nats://HOST:PORT (several: comma-separated)`);
    }
    return { url: value };
  }
  return { local: true };
}
