import { join } from 'node:path';
import { connect, type NatsConnection } from '@nats-io/transport-node';
import { afterAll, beforeAll, expect } from 'vitest';
import { localCoordinatorClient } from '../../src/cli/credentials.ts';
import { eventSubject, eventsPrefix, OrchardEvent } from '../../src/shared/events.ts';
import type { LlamaBinaries } from '../../src/node/llama/binaries.ts';
import { testNats } from '../helpers/nats.ts';
import { describeWith, itWith, llamaEngines, natsServer } from '../helpers/needs.ts';
import { ORACLE_PROMPT } from '../helpers/oracle.ts';
import { killGroup, ORCHARD_BIN, orchard, type Proc, readyLine, sleep, spawnProc } from '../helpers/processes.ts';
import { modelThatMustSplit } from '../helpers/split-model.ts';
import { tempDir } from '../helpers/temp-dir.ts';

/*
 * The event bus end to end on a real nats-server -js: a coordinator (`--nats URL`, --heal off so a
 * lost node fails the model in one step) and two agents joined with a token; a model that must be
 * split over both is loaded, generates once, then one agent is SIGKILLed. Every event a live
 * subscriber sees parses with the one schema (src/shared/events.ts) and came on the subject that
 * schema says; they arrive in the order things happened; and `orchard events --json` prints the
 * same stored events (everything but heartbeats) in the same order.
 */

const CTX = 2048;
const engines = await llamaEngines();
const nats = natsServer();

describeWith([engines, nats], 'cluster events on NATS: load, generate, node loss', () => {
  const dir = tempDir('orchard-events-', 'all');
  const procs: Proc[] = [];
  let server: Awaited<ReturnType<typeof testNats>>;
  let env: NodeJS.ProcessEnv;
  let coordAddr: string;
  let clusterId: string;
  let watcher: NatsConnection;
  const live: { subject: string; event: OrchardEvent }[] = [];
  const invalid: string[] = [];
  const agents: Record<string, Proc> = {};

  const start = (name: string, args: string[], procEnv: NodeJS.ProcessEnv = env) => {
    const p = spawnProc(name, args, procEnv);
    procs.push(p);
    return p;
  };
  const waitFor = async (what: string, pred: (e: OrchardEvent) => boolean, ms = 40_000) => {
    const deadline = Date.now() + ms;
    while (Date.now() < deadline) {
      const hit = live.find((l) => pred(l.event));
      if (hit) return hit.event;
      await sleep(100);
    }
    throw new Error(`no ${what} event; saw ${live.map((l) => l.event.kind).join(', ')}`);
  };

  beforeAll(async () => {
    const bins = (engines as { value: LlamaBinaries }).value;
    server = await testNats((nats as { value: string }).value);
    const stateDir = join(dir.path, 'coord');
    env = { ...process.env, ORCHARD_LLAMA_BIN_DIR: bins.binDir, ORCHARD_LOG_FORMAT: 'json', ORCHARD_LLAMA_SERVER_EXTRA_ARGS: '-t 1', ORCHARD_RPC_THREADS: '1', ORCHARD_COORDINATOR_STATE_DIR: stateDir };
    const { model, budget } = await modelThatMustSplit(['--layers', '8', '--seed', '11'], CTX);
    const coordinator = start('coordinator', [ORCHARD_BIN, 'coordinator', '--no-mdns', '--grpc-port', '0', '--http-port', '0', '--host', '127.0.0.1', '--state-dir', stateDir, '--nats', server.url, '--heal', 'off', '--json']);
    const ready = await readyLine(coordinator);
    coordAddr = `127.0.0.1:${String(ready.grpcPort)}`;
    clusterId = String(ready.clusterId);
    watcher = await connect({ servers: server.url });
    watcher.subscribe(`${eventsPrefix(clusterId)}.>`, {
      callback: (_err, m) => {
        const r = OrchardEvent.safeParse(JSON.parse(m.string()));
        if (r.success) live.push({ subject: m.subject, event: r.data });
        else invalid.push(`${m.subject}: ${r.error.issues[0]?.message}`);
      },
    });
    const t = await orchard(['coordinator', 'token', '--uses', '2', '--ttl', '10m'], env);
    expect(t.code, t.stderr).toBe(0);
    for (const name of ['alpha', 'bravo']) {
      agents[name] = start(`node ${name}`, [ORCHARD_BIN, 'node', '--no-mdns', '--grpc-port', '0', '--metrics-port', '0', '--bind', '127.0.0.1', '--name', name, '--budget', String(budget), '--state-dir', join(dir.path, name), '--models-dir', dir.path, '--json', '--join', coordAddr], { ...env, ORCHARD_NODE_TOKEN: t.stdout.trim() });
      await readyLine(agents[name]!);
    }
    await waitFor('node.up bravo', (e) => e.kind === 'node.up' && e.name === 'bravo');
    const load = await orchard(['load', model, '--ctx', String(CTX), '--name', 'm8', '--coordinator', coordAddr], env);
    expect(load.code, load.stderr).toBe(0);
  }, 240_000);

  afterAll(async () => {
    await watcher?.close();
    await Promise.all(procs.splice(0).map(killGroup));
    await server?.stop();
  });

  itWith([engines, nats], 'load, generate and node loss arrive in order with the documented subjects and schemas; orchard events --json prints them', async () => {
    const client = await localCoordinatorClient(coordAddr, join(dir.path, 'coord'));
    try {
      for await (const ev of client.stream('generate', { model: 'm8', prompt: ORACLE_PROMPT, maxTokens: 8, temperature: 0 })) void ev;
    } finally {
      client.close();
    }
    await waitFor('request.outcome', (e) => e.kind === 'request.outcome');
    await killGroup(agents.bravo!); // the agent and its engines: the node is lost
    await waitFor('node.down bravo', (e) => e.kind === 'node.down' && e.name === 'bravo');
    await waitFor('m8 failed', (e) => e.kind === 'instance.state' && e.model === 'm8' && e.state === 'failed');

    expect(invalid).toEqual([]);
    for (const l of live) {
      expect(l.subject).toBe(eventSubject(l.event));
      expect(l.event.cluster).toBe(clusterId);
      expect(l.event.source.role).toBe('coordinator');
    }
    const kinds = live.map((l) => l.event);
    const at = (what: string, pred: (e: OrchardEvent) => boolean) => {
      const i = kinds.findIndex(pred);
      expect(i, what).toBeGreaterThanOrEqual(0);
      return i;
    };
    const order = [
      at('alpha up', (e) => e.kind === 'node.up' && e.name === 'alpha'),
      at('bravo up', (e) => e.kind === 'node.up' && e.name === 'bravo'),
      at('loading', (e) => e.kind === 'instance.state' && e.state === 'loading'),
      at('planning progress', (e) => e.kind === 'instance.progress' && e.phase === 'planning'),
      at('an engine started', (e) => e.kind === 'engine.started'),
      at('ready', (e) => e.kind === 'instance.state' && e.state === 'ready'),
      at('request ok', (e) => e.kind === 'request.outcome' && e.outcome === 'ok' && e.model === 'm8'),
      at('bravo suspect', (e) => e.kind === 'node.suspect' && e.name === 'bravo'),
      at('bravo down', (e) => e.kind === 'node.down' && e.name === 'bravo'),
    ];
    expect(order).toEqual([...order].sort((a, b) => a - b));
    // The model fails after the loss, from whichever is seen first: the node going down or the
    // head's engine exiting once its worker is gone (then engine.exited comes before it).
    const failed = at('failed', (e) => e.kind === 'instance.state' && e.state === 'failed');
    expect(failed).toBeGreaterThan(order[6]!);
    if (failed < order[8]!) expect(kinds.slice(order[6]!, failed).some((e) => e.kind === 'engine.exited' && !e.expected)).toBe(true);
    const ready = kinds[order[5]!] as Extract<OrchardEvent, { kind: 'instance.state' }>;
    expect(new Set(ready.nodes)).toEqual(new Set(['alpha', 'bravo']));
    expect(kinds.filter((e) => e.kind === 'engine.started').length).toBeGreaterThanOrEqual(2);
    // Heartbeats are live only: on their own subject, one per node, at the heartbeat pace.
    expect(live.some((l) => l.event.kind === 'node.heartbeat' && l.subject === `${eventsPrefix(clusterId)}.heartbeat.${l.event.nodeId}`)).toBe(true);

    const r = await orchard(['events', '--json', '--since', '10m', '--coordinator', coordAddr], env);
    expect(r.code, r.stderr).toBe(0);
    const printed = r.stdout.trim().split('\n').map((l) => JSON.parse(l) as { subject: string; seq: number } & Record<string, unknown>);
    const stored = live.filter((l) => l.event.kind !== 'node.heartbeat');
    // The CLI may run after more events (alpha's heartbeats are not stored; nothing else happens).
    expect(printed.map((p) => p.subject).slice(0, stored.length)).toEqual(stored.map((l) => l.subject));
    expect(printed.slice(0, stored.length).map(({ subject: _s, seq: _q, ...e }) => e)).toEqual(stored.map((l) => l.event));
    const seqs = printed.map((p) => p.seq);
    expect(seqs).toEqual([...seqs].sort((a, b) => a - b));
    const text = await orchard(['events', '--since', '10m', '--coordinator', coordAddr], env);
    expect(text.code, text.stderr).toBe(0);
    expect(text.stdout).toMatch(/node\.[0-9a-f-]+\.down\s+bravo down/);
  }, 180_000);
});
