import { readFile, rm, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { afterAll, beforeAll, expect } from 'vitest';
import type { LlamaBinaries } from '../../src/node/llama/binaries.ts';
import { describeWith, itWith, llamaEngines } from '../helpers/needs.ts';
import { ORACLE_PROMPT, plainLlamaTokens } from '../helpers/oracle.ts';
import { greedyTokenIds, type JoinedAgent, JoinedCluster } from '../helpers/joined-cluster.ts';
import { canConnectEndpoint, engineChildren, killGroup, orchard, type Proc, sleep } from '../helpers/processes.ts';
import { modelThatMustSplit } from '../helpers/split-model.ts';
import { tempDir } from '../helpers/temp-dir.ts';

/*
 * Coordinator restart without reload (file-backed instance store, no NATS): one coordinator,
 * three agents (static join), a model split over ≥ 2 stages. SIGKILL the coordinator; a new one
 * on the same state dir must serve the same model again within 5 s of listening, on the very
 * same engine processes (pids unchanged: nothing reloaded), with greedy tokens equal to one plain
 * llama-server. Then the negative: a stored instance that no longer matches what the agents run
 * (here its stored head pid is altered) is not adopted, and its engines are stopped.
 */

const CTX = 2048;
const N_PREDICT = 32;
const engines = await llamaEngines();

describeWith([engines], 'coordinator restart re-adopts running engines (file store)', () => {
  const dir = tempDir('orchard-restart-', 'all');
  let cluster: JoinedCluster;
  let env: NodeJS.ProcessEnv;
  let model: string;
  let coordinator: Proc;
  let coordAddr: string;
  let oracle: number[];
  const agents: JoinedAgent[] = [];

  const startCoordinator = async (label: string) => {
    await cluster.startCoordinator(['--no-nats'], label);
    return { p: cluster.coordinator!, addr: cluster.grpcAddress };
  };
  const status = async () => {
    const r = await orchard(['status', '--json', '--coordinator', coordAddr], env);
    expect(r.code, r.stderr).toBe(0);
    return JSON.parse(r.stdout) as { models: { name: string; state: string; stages: { endpoint: string }[] }[] };
  };
  const generate = async (): Promise<number[]> => greedyTokenIds(await cluster.client(), { model: 'm8', prompt: ORACLE_PROMPT, maxTokens: N_PREDICT });
  const allEnginePids = async () => (await Promise.all(agents.map((a) => engineChildren(a.proc.child.pid!)))).flat().sort((a, b) => a - b);

  beforeAll(async () => {
    const bins = (engines as { value: LlamaBinaries }).value;
    const engineEnv = { ...process.env, ORCHARD_LLAMA_BIN_DIR: bins.binDir, ORCHARD_LOG_FORMAT: 'json', ORCHARD_LLAMA_SERVER_EXTRA_ARGS: '-t 1', ORCHARD_RPC_THREADS: '1' };
    // The CLI on this machine trusts the coordinator by its state dir (CA, local admin key).
    cluster = new JoinedCluster({ dir: dir.path, env: engineEnv });
    env = cluster.env;
    const split = await modelThatMustSplit(['--layers', '8', '--seed', '11'], CTX);
    model = split.model;
    const budget = split.budget;
    ({ p: coordinator, addr: coordAddr } = await startCoordinator('coordinator'));
    await cluster.mintToken(3);
    for (const name of ['alpha', 'bravo', 'charlie']) agents.push(await cluster.startAgent(name, ['--budget', String(budget)]));
    oracle = await plainLlamaTokens(bins, { model, ctx: CTX, prompt: ORACLE_PROMPT, nPredict: N_PREDICT, threads: 2 });
    const load = await orchard(['load', model, '--ctx', String(CTX), '--name', 'm8', '--coordinator', coordAddr], env);
    expect(load.code, load.stderr).toBe(0);
  }, 240_000);

  afterAll(async () => {
    await cluster?.stop();
  });

  itWith([engines], 'SIGKILL → restart: a request sent at once waits for re-adoption (no error), served within 5 s of the agents answering, same engine processes, tokens equal the oracle', async () => {
    const before = (await status()).models.find((m) => m.name === 'm8')!;
    expect(before.state).toBe('ready');
    expect(before.stages.length).toBeGreaterThanOrEqual(2);
    expect(await generate()).toEqual(oracle);
    const pids = await allEnginePids();
    expect(pids.length).toBeGreaterThanOrEqual(2);
    const stored = JSON.parse(await readFile(join(dir.path, 'coord', 'instances.json'), 'utf8')) as { instances: Record<string, unknown> };
    expect(Object.keys(stored.instances)).toEqual(['m8']);

    await killGroup(coordinator); // SIGKILL: nothing gets to unload
    await sleep(1500); // agents notice the Watch streams drop; they must keep their engines
    expect(await allEnginePids()).toEqual(pids);

    // The agents are frozen while the new coordinator comes up, so a request arrives before any
    // node is back: it must wait for the re-adoption instead of failing with "no model named"
    // (a restart costs a pause, not an error). The engines keep running meanwhile.
    for (const a of agents) process.kill(a.proc.child.pid!, 'SIGSTOP');
    const t0 = Date.now();
    let thawAt = 0;
    let servedAfterThawMs = 0;
    let tokens: number[];
    try {
      ({ p: coordinator, addr: coordAddr } = await startCoordinator('coordinator 2'));
      const listeningAfterMs = Date.now() - t0;
      const first = generate();
      first.catch(() => {}); // awaited below; keeps an early rejection from being unhandled
      await sleep(2000);
      thawAt = Date.now();
      for (const a of agents) process.kill(a.proc.child.pid!, 'SIGCONT');
      tokens = await first;
      servedAfterThawMs = Date.now() - thawAt;
      console.log(`coordinator restart: listening after ${listeningAfterMs} ms; the first request (sent at once, agents frozen 2 s) done ${servedAfterThawMs} ms after the agents resumed`);
    } finally {
      for (const a of agents) process.kill(a.proc.child.pid!, 'SIGCONT');
    }
    expect(tokens).toEqual(oracle);
    // The budget is the coordinator's own work once the agents answer (dial, match, re-adopt).
    expect(servedAfterThawMs).toBeLessThan(5000);
    expect(await allEnginePids(), 'engines were restarted: that is a reload').toEqual(pids);
    const after = (await status()).models.find((m) => m.name === 'm8')!;
    expect(after.state).toBe('ready');
    expect(after.stages.map((s) => s.endpoint)).toEqual(before.stages.map((s) => s.endpoint));
    expect(coordinator.err).toMatch(/re-adopted a running instance/);
    expect(coordinator.err).not.toMatch(/stopping an engine no model owns/);
  }, 60_000);

  itWith([engines], 'a stored instance that no longer matches the agents is not adopted; its engines are stopped', async () => {
    const endpoints = (await status()).models.find((m) => m.name === 'm8')!.stages.map((s) => s.endpoint).filter(Boolean);
    // the check at the end can fail: every stage's endpoint (Unix socket or port) accepts now
    expect(endpoints.length).toBeGreaterThan(0);
    for (const e of endpoints) expect(await canConnectEndpoint(e), `${e} accepting`).toBe(true);
    await killGroup(coordinator);
    const path = join(dir.path, 'coord', 'instances.json');
    const file = JSON.parse(await readFile(path, 'utf8')) as { instances: Record<string, { value: { engines: { head: boolean; pid: number }[] } }> };
    const head = file.instances.m8!.value.engines.find((e) => e.head)!;
    head.pid += 100_000; // what a restarted head would look like
    await writeFile(path, JSON.stringify(file));

    ({ p: coordinator, addr: coordAddr } = await startCoordinator('coordinator 3'));
    const deadline = Date.now() + 15_000;
    while (Date.now() < deadline && (await allEnginePids()).length > 0) await sleep(250);
    expect(await allEnginePids()).toEqual([]);
    for (const e of endpoints) expect(await canConnectEndpoint(e), `${e} still accepting`).toBe(false);
    expect((await status()).models).toEqual([]);
    expect(coordinator.err).toMatch(/does not match what the agents run/);
    const stored = JSON.parse(await readFile(path, 'utf8')) as { instances: Record<string, unknown> };
    expect(stored.instances).toEqual({});
    await rm(path, { force: true });
  }, 60_000);
});
