import { DeliverPolicy, jetstream, type JsMsg } from '@nats-io/jetstream';
import { connect, type NatsConnection } from '@nats-io/transport-node';
import { type Command, Option } from 'commander';
import { errorMessage, OrchardError, UsageError } from '../../shared/errors.ts';
import { describeEvent, eventStreamName, eventsPrefix, type OrchardEvent, parseEvent } from '../../shared/events.ts';
import { natsClientTls } from '../../shared/pki/nats-tls.ts';
import { addCredentialOptions, type CredentialFlags, coordinatorClient, natsClientIdentity } from '../credentials.ts';
import { parseTtl } from './cluster-credentials.ts';

interface EventsFlags extends CredentialFlags {
  coordinator?: string;
  nats?: string;
  cluster?: string;
  since: string;
  follow?: boolean;
  heartbeats?: boolean;
  json?: boolean;
}

/**
 * `orchard events`: the cluster's events from its JetStream stream (subjects and schemas:
 * src/shared/events.ts, docs/events.md). The NATS address and cluster id come from the
 * coordinator's status unless given; a coordinator with the file store has no events.
 */
export function registerEvents(program: Command): void {
  addCredentialOptions(program.command('events'))
    .description('print the cluster events (node up/suspect/down, engines, loads, model states, recoveries, requests) kept on NATS')
    .addOption(new Option('--coordinator <host:port>', 'coordinator gRPC address, asked for the NATS address and cluster id').env('ORCHARD_COORDINATOR'))
    .addOption(new Option('--nats <url>', 'NATS server(s) to read from (default: the one the coordinator uses)').env('ORCHARD_NATS_URL'))
    .option('--cluster <id>', 'cluster id (default: the coordinator’s)')
    .option('--since <duration>', 'start this long ago (30s, 10m, 24h)', '10m')
    .option('--follow', 'keep printing new events until interrupted')
    .option('--heartbeats', 'with --follow, also print the nodes’ heartbeats (live only: the stream does not keep them)')
    .option('--json', 'one JSON object per line: {subject, seq, …event}')
    .action(async (flags: EventsFlags) => {
      const sinceMs = parseTtl(flags.since);
      if (sinceMs === undefined) throw new UsageError('--since needs a duration such as 10m');
      if (flags.heartbeats && !flags.follow) throw new UsageError('--heartbeats needs --follow (heartbeats are not kept)');
      const { url, cluster } = await source(flags);
      const nc = await connectAsAdmin(url, flags);
      try {
        await printEvents(nc, cluster, Date.now() - sinceMs, flags);
      } finally {
        await nc.close();
      }
    });
}

/**
 * With the cluster's credentials when we hold them (the coordinator's own server requires them);
 * a plain `nats://` server without TLS refuses a TLS client, and is read without.
 */
async function connectAsAdmin(url: string, flags: EventsFlags): Promise<NatsConnection> {
  const identity = await natsClientIdentity(flags);
  const open = (tls: boolean) => connect({ servers: url.split(','), name: 'orchard-events', ...(tls && identity ? { tls: natsClientTls(identity) } : {}) });
  try {
    return await open(true).catch((err: unknown) => {
      if (identity && /does not support 'tls'/.test(errorMessage(err))) return open(false);
      throw err;
    });
  } catch (err) {
    throw new OrchardError(`cannot reach NATS at ${url}: ${errorMessage(err)}`);
  }
}

async function source(flags: EventsFlags): Promise<{ url: string; cluster: string }> {
  if (flags.nats && flags.cluster) return { url: flags.nats, cluster: flags.cluster };
  const client = await coordinatorClient(flags);
  try {
    const s = await client.unary('status', {}, 5000);
    const store = (s.stateStore ?? {}) as { backend?: string; location?: string };
    if (store.backend !== 'nats' && !flags.nats) {
      throw new OrchardError('this coordinator keeps its state in a file and publishes no events: run it with NATS (`--nats URL`, or install nats-server: `orchard setup --nats`)');
    }
    return { url: flags.nats ?? String(store.location), cluster: flags.cluster ?? String(s.clusterId) };
  } finally {
    client.close();
  }
}

/** Print the stored events since `startMs` in stream order; with --follow keep going. */
async function printEvents(nc: NatsConnection, cluster: string, startMs: number, flags: EventsFlags): Promise<void> {
  const print = (subject: string, seq: number | undefined, e: OrchardEvent) => {
    if (flags.json) process.stdout.write(`${JSON.stringify({ subject, ...(seq === undefined ? {} : { seq }), ...e })}\n`);
    else process.stdout.write(`${new Date(e.atMs).toISOString().slice(11, 23)}  ${subject.slice(eventsPrefix(cluster).length + 1).padEnd(34)} ${describeEvent(e)}\n`);
  };
  if (flags.heartbeats) {
    nc.subscribe(`${eventsPrefix(cluster)}.heartbeat.*`, {
      callback: (_err, m) => {
        const e = parseEvent(m.string());
        if (e) print(m.subject, undefined, e);
      },
    });
  }
  const js = jetstream(nc);
  const consumer = await js.consumers.get(eventStreamName(cluster), { deliver_policy: DeliverPolicy.StartTime, opt_start_time: new Date(startMs).toISOString() }).catch((err: unknown) => {
    throw new OrchardError(`no event stream for cluster ${cluster} on this NATS server: ${(err as Error).message}`);
  });
  // Without --follow: stop once caught up with what was stored when we started.
  if (!flags.follow && (await consumer.info()).num_pending === 0) return;
  const messages = await consumer.consume();
  const stop = () => void messages.close();
  process.once('SIGINT', stop);
  process.once('SIGTERM', stop);
  for await (const m of messages as AsyncIterable<JsMsg>) {
    const e = parseEvent(m.string());
    if (e) print(m.subject, m.seq, e);
    if (!flags.follow && m.info.pending === 0) break;
  }
  await messages.close();
}
