import { spawn } from 'node:child_process';
import { readFile, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { connect } from '@nats-io/transport-node';
import { afterAll, beforeAll, expect } from 'vitest';
import { localCoordinatorClient } from '../../src/cli/credentials.ts';
import type { LlamaBinaries } from '../../src/node/llama/binaries.ts';
import { greedyTokenIds } from '../helpers/joined-cluster.ts';
import { natsConfigFiles, testNats } from '../helpers/nats.ts';
import { describeWith, itWith, llamaEngines, natsServer } from '../helpers/needs.ts';
import { ORACLE_PROMPT, plainLlamaTokens } from '../helpers/oracle.ts';
import { engineChildren, killGroup, ORCHARD_BIN, orchard, type Proc, readyLine, sleep, spawnProc } from '../helpers/processes.ts';
import { modelThatMustSplit } from '../helpers/split-model.ts';
import { tempDir } from '../helpers/temp-dir.ts';

/*
 * Failover between two coordinators on one real nats-server -js (started by the test; Debian's
 * 2.9 with ORCHARD_NATS_SERVER=/usr/sbin/nats-server), configured as a user configures theirs:
 * TLS and users from `orchard coordinator nats-config` (no client without a cluster certificate,
 * nodes admitted by role, so the agents that join later publish with no change to the server), the
 * coordinators on its `tls://` URL. Coordinator B shares A's cluster CA
 * (export-ca | import-ca over a pipe); three agents join A; a model split over ≥ 2 stages is loaded
 * and serves through both addresses (B relays gRPC and HTTP to A). SIGKILL A while requests run:
 * B must lead within 10 s on the very same engine processes (0 reloads), serve through its own
 * address, and A restarted on its state dir must come back as a standby that relays to B.
 */

const CTX = 2048;
const N_PREDICT = 32;
const engines = await llamaEngines();
const nats = natsServer();

interface Coordinator {
  p: Proc;
  grpc: string;
  http: string;
  stateDir: string;
  role: string;
}

describeWith([engines, nats], 'two coordinators on NATS: the standby takes over without reloading', () => {
  const dir = tempDir('orchard-failover-', 'all');
  const procs: Proc[] = [];
  let natsUrl: string;
  let stopNats: () => Promise<void> = async () => {};
  let env: NodeJS.ProcessEnv;
  let oracle: number[];
  let a: Coordinator;
  let b: Coordinator;
  const agents: Proc[] = [];

  const startCoordinator = async (name: string, stateDir: string): Promise<Coordinator> => {
    const p = spawnProc(name, [ORCHARD_BIN, 'coordinator', '--no-mdns', '--grpc-port', '0', '--http-port', '0', '--host', '127.0.0.1', '--state-dir', stateDir, '--nats', natsUrl, '--json'], { ...env, ORCHARD_COORDINATOR_STATE_DIR: stateDir });
    procs.push(p);
    const r = await readyLine(p);
    return { p, grpc: `127.0.0.1:${String(r.grpcPort)}`, http: `127.0.0.1:${String(r.httpPort)}`, stateDir, role: String(r.role) };
  };
  const status = async (c: Coordinator) => {
    const client = await localCoordinatorClient(c.grpc, c.stateDir);
    try {
      return (await client.unary('status', {}, 5000)) as { role: string; leader?: { grpc: string; http: string }; models: { name: string; state: string }[]; nodes: { state: string }[] };
    } finally {
      client.close();
    }
  };
  const generate = async (c: Coordinator): Promise<number[]> =>
    greedyTokenIds(await localCoordinatorClient(c.grpc, c.stateDir), { model: 'm8', prompt: ORACLE_PROMPT, maxTokens: N_PREDICT });
  /** An SSE completion over HTTP: the concatenated text, which a relay must pass through unchanged. */
  const httpCompletion = async (c: Coordinator): Promise<string> => {
    const r = await fetch(`http://${c.http}/v1/completions`, {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ model: 'm8', prompt: ORACLE_PROMPT, max_tokens: N_PREDICT, temperature: 0, stream: true }),
    });
    expect(r.status, await r.clone().text()).toBe(200);
    expect(r.headers.get('content-type')).toMatch(/text\/event-stream/);
    let text = '';
    for (const line of (await r.text()).split('\n')) {
      if (!line.startsWith('data: ') || line === 'data: [DONE]') continue;
      text += (JSON.parse(line.slice(6)) as { choices: { text?: string }[] }).choices[0]?.text ?? '';
    }
    return text;
  };
  const allEnginePids = async () => (await Promise.all(agents.map((p) => engineChildren(p.child.pid!)))).flat().sort((x, y) => x - y);

  beforeAll(async () => {
    const bins = (engines as { value: LlamaBinaries }).value;
    env = { ...process.env, ORCHARD_LLAMA_BIN_DIR: bins.binDir, ORCHARD_LOG_FORMAT: 'json', ORCHARD_LLAMA_SERVER_EXTRA_ARGS: '-t 1', ORCHARD_RPC_THREADS: '1' };
    const { include } = await natsConfigFiles(join(dir.path, 'a'), join(dir.path, 'nats-files'), env);
    const server = await testNats((nats as { value: string }).value, { include });
    stopNats = server.stop;
    natsUrl = server.url.replace(/^nats:/, 'tls:');
    const plain = await connect({ servers: server.url, reconnect: false, timeout: 5000 }).then((nc) => nc.close().then(() => 'connected'), String);
    expect(plain, 'a client without a cluster certificate got in').not.toBe('connected');
    const { model, budget } = await modelThatMustSplit(['--layers', '8', '--seed', '11'], CTX);
    a = await startCoordinator('coordinator A', join(dir.path, 'a'));
    expect(a.role).toBe('leader');

    // B becomes a coordinator of A's cluster: the CA travels over a pipe, never argv.
    const exporter = spawn(process.execPath, [ORCHARD_BIN, 'coordinator', 'export-ca', '--state-dir', a.stateDir], { env, stdio: ['ignore', 'pipe', 'inherit'] });
    const importer = spawn(process.execPath, [ORCHARD_BIN, 'coordinator', 'import-ca', '--state-dir', join(dir.path, 'b')], { env, stdio: ['pipe', 'inherit', 'pipe'] });
    exporter.stdout.pipe(importer.stdin);
    let importErr = '';
    importer.stderr.on('data', (c: Buffer) => (importErr += c.toString()));
    const code = await new Promise<number | null>((r) => importer.once('exit', r));
    expect(code, importErr).toBe(0);
    expect((await stat(join(dir.path, 'b', 'pki', 'ca.key'))).mode & 0o777).toBe(0o600);
    expect(await readFile(join(dir.path, 'b', 'pki', 'ca.crt'), 'utf8')).toBe(await readFile(join(a.stateDir, 'pki', 'ca.crt'), 'utf8'));
    b = await startCoordinator('coordinator B', join(dir.path, 'b'));
    expect(b.role).toBe('standby');

    const t = await orchard(['coordinator', 'token', '--uses', '3', '--ttl', '10m', '--state-dir', a.stateDir], env);
    expect(t.code, t.stderr).toBe(0);
    for (const name of ['alpha', 'bravo', 'charlie']) {
      const proc = spawnProc(`node ${name}`, [ORCHARD_BIN, 'node', '--no-mdns', '--grpc-port', '0', '--metrics-port', '0', '--bind', '127.0.0.1', '--name', name, '--budget', String(budget), '--state-dir', join(dir.path, name), '--models-dir', dir.path, '--json', '--join', a.grpc], { ...env, ORCHARD_NODE_TOKEN: t.stdout.trim() });
      procs.push(proc);
      agents.push(proc);
      await readyLine(proc);
    }
    oracle = await plainLlamaTokens(bins, { model, ctx: CTX, prompt: ORACLE_PROMPT, nPredict: N_PREDICT, threads: 2 });
    // The agents announce their addresses to A a moment after their ready lines.
    const deadline = Date.now() + 30_000;
    while ((await status(a)).nodes.filter((n) => n.state === 'NODE_STATE_UP').length < 3 && Date.now() < deadline) await sleep(250);
    // Loaded through the standby: the relay carries the streamed Load to the leader.
    const load = await orchard(['load', model, '--ctx', String(CTX), '--name', 'm8', '--coordinator', b.grpc], { ...env, ORCHARD_COORDINATOR_STATE_DIR: b.stateDir });
    expect(load.code, load.stderr).toBe(0);
  }, 300_000);

  afterAll(async () => {
    await Promise.all(procs.splice(0).map(killGroup));
    await stopNats();
  });

  itWith([engines, nats], 'both addresses serve; SIGKILL the leader mid-load → the standby leads within 10 s on the same engines; the old leader returns as a standby', async () => {
    const sa = await status(a);
    expect(sa.role).toBe('leader');
    expect(sa.models.find((m) => m.name === 'm8')?.state).toBe('ready');
    const sb = await status(b);
    expect(sb.role).toBe('standby');
    expect(sb.leader?.grpc).toBe(a.grpc);
    expect(sb.models.find((m) => m.name === 'm8')?.state).toBe('ready'); // the leader's view, relayed
    expect(await generate(a)).toEqual(oracle);
    expect(await generate(b)).toEqual(oracle);
    const viaA = await httpCompletion(a);
    expect(viaA.length).toBeGreaterThan(0);
    expect(await httpCompletion(b)).toBe(viaA);
    const pids = await allEnginePids();
    expect(pids.length).toBeGreaterThanOrEqual(2);

    // Requests keep running through B while A dies; those in flight through A's relay may fail.
    let running = true;
    const outcomes: { atMs: number; ok: boolean }[] = [];
    const load = (async () => {
      while (running) {
        const ok = await generate(b).then((t) => t.length === N_PREDICT, () => false);
        outcomes.push({ atMs: Date.now(), ok });
        if (!ok) await sleep(200);
      }
    })();
    await sleep(1500);
    const killedAt = Date.now();
    await killGroup(a.p);
    let ledAfterMs = -1;
    while (Date.now() - killedAt < 20_000) {
      const s = await status(b).catch(() => undefined);
      if (s?.role === 'leader' && s.models.find((m) => m.name === 'm8')?.state === 'ready') {
        ledAfterMs = Date.now() - killedAt;
        break;
      }
      await sleep(100);
    }
    await sleep(2000);
    running = false;
    await load;
    const after = outcomes.filter((o) => o.atMs > killedAt + ledAfterMs);
    console.log(`failover: B leads ${ledAfterMs} ms after the SIGKILL; ${outcomes.filter((o) => o.ok).length}/${outcomes.length} requests through B ok, ${after.filter((o) => o.ok).length}/${after.length} after it led`);
    expect(ledAfterMs, b.p.err.slice(-3000)).toBeGreaterThan(0);
    expect(ledAfterMs).toBeLessThan(10_000);
    expect(after.length).toBeGreaterThan(0);
    expect(after.every((o) => o.ok)).toBe(true);
    expect(await allEnginePids(), 'engines were restarted: that is a reload').toEqual(pids);
    expect(b.p.err).toMatch(/re-adopted a running instance/);
    expect(b.p.err).not.toMatch(/stopping an engine no model owns/);
    expect(await generate(b)).toEqual(oracle);

    // A comes back on its state dir: a standby that relays to B.
    a = await startCoordinator('coordinator A again', a.stateDir);
    expect(a.role).toBe('standby');
    const sa2 = await status(a);
    expect(sa2.role).toBe('standby');
    expect(sa2.leader?.grpc).toBe(b.grpc);
    expect(await generate(a)).toEqual(oracle);
    expect(await httpCompletion(a)).toBe(viaA);
    expect(await allEnginePids()).toEqual(pids);

    // The agents, joined after the server was configured, published their engine events on it.
    const events = await orchard(['events', '--json', '--since', '10m', '--coordinator', b.grpc], { ...env, ORCHARD_COORDINATOR_STATE_DIR: b.stateDir });
    expect(events.code, events.stderr).toBe(0);
    const fromAgents = new Set(events.stdout.split('\n').flatMap((l) => /"subject":"orchard\.[^.]+\.agent\.([^.]+)\.engine\.started"/.exec(l)?.[1] ?? []));
    expect(fromAgents.size).toBeGreaterThanOrEqual(2);
  }, 120_000);
});
