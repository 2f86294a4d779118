import { execFileSync } from 'node:child_process';
import { afterAll, beforeAll, expect } from 'vitest';
import type { LlamaBinaries } from '../../src/node/llama/binaries.ts';
import { describeWith, itWith, llamaEngines } from '../helpers/needs.ts';
import { JoinedCluster } from '../helpers/joined-cluster.ts';
import { ORACLE_PROMPT, plainLlamaTokens } from '../helpers/oracle.ts';
import { orchard, sleep } from '../helpers/processes.ts';
import { modelThatMustSplit } from '../helpers/split-model.ts';
import { tempDir } from '../helpers/temp-dir.ts';

/*
 * Membership changes on purpose, end to end with real processes on 127.0.0.1: a coordinator and
 * three agents whose budgets force a 2-stage plan of a generated 8-layer GGUF (one node spare).
 * `orchard node drain` of a stage's node under a small concurrent streaming load: the model moves
 * to the other two (load new and switch, or stop and re-place when memory does not allow both),
 * no request fails, every stream completes, the drained node runs no engine. Then a fourth, faster node with room for the whole
 * model joins: `orchard rebalance --dry-run` shows the predicted gain and changes nothing;
 * `orchard rebalance` moves the model onto it by load-new-then-switch.
 */

const CTX = 2048;
const N_PREDICT = 24;
const engines = await llamaEngines();
const dir = tempDir('orchard-moves-', 'all');

interface Status {
  nodes: { id: string; name: string; state: string; drained: boolean }[];
  models: { name: string; state: string; loadedAtMs?: number; recoveries?: number; predictedTokensPerSecond: number; stages: { nodeId: string; nodeName: string }[] }[];
}

/** Engine processes (llama-server, rpc-server) among a process's descendants. */
function enginesUnder(pid: number): string[] {
  const rows = execFileSync('ps', ['-eo', 'pid=,ppid=,args='], { encoding: 'utf8' })
    .trim()
    .split('\n')
    .map((l) => {
      const m = /^\s*(\d+)\s+(\d+)\s+(.*)$/.exec(l)!;
      return { pid: Number(m[1]), ppid: Number(m[2]), args: m[3]! };
    });
  const tree = [pid];
  for (let i = 0; i < tree.length; i++) for (const r of rows) if (r.ppid === tree[i]) tree.push(r.pid);
  return rows.filter((r) => tree.includes(r.pid) && /llama-server|rpc-server/.test(r.args)).map((r) => r.args);
}

describeWith([engines], 'membership changes on purpose: drain and rebalance', () => {
  let env: NodeJS.ProcessEnv;
  let model: string;
  let coordAddr: string;
  let budget: number;
  let cluster: JoinedCluster;
  let oracle: number[];
  const agents = () => cluster.agents;

  const status = async (): Promise<Status> => {
    const r = await orchard(['status', '--json', '--coordinator', coordAddr], env);
    expect(r.code, r.stderr).toBe(0);
    return JSON.parse(r.stdout) as Status;
  };
  const m8 = async () => (await status()).models.find((m) => m.name === 'm8')!;

  const startAgent = (name: string, extra: string[]) => cluster.startAgent(name, extra);

  beforeAll(async () => {
    const bins = engines.ok ? (engines.value as LlamaBinaries) : undefined;
    if (!bins) return;
    env = { ...process.env, ORCHARD_LLAMA_BIN_DIR: bins.binDir, ORCHARD_LOG_FORMAT: 'json', ORCHARD_LLAMA_SERVER_EXTRA_ARGS: '-t 1', ORCHARD_RPC_THREADS: '1' };
    ({ model, budget } = await modelThatMustSplit(['--layers', '8', '--seed', '7'], CTX));
    cluster = new JoinedCluster({ dir: dir.path, env });
    await cluster.startCoordinator();
    ({ env, grpcAddress: coordAddr } = cluster);
    await cluster.mintToken(4);
    // The same modest bandwidth everywhere, so the fast node of the rebalance test stands out.
    for (const name of ['alpha', 'bravo', 'charlie']) await startAgent(name, ['--budget', String(budget), '--bandwidth', '50']);
    oracle = await plainLlamaTokens(bins, { model, ctx: CTX, prompt: ORACLE_PROMPT, nPredict: N_PREDICT, threads: 2 });
    await cluster.waitUp(3);
    const load = await orchard(['load', model, '--ctx', String(CTX), '--name', 'm8', '--coordinator', coordAddr], env);
    expect(load.code, load.stderr).toBe(0);
  }, 240_000);

  afterAll(async () => {
    await cluster?.stop();
  });

  /**
   * `clients` concurrent clients streaming greedy requests one after another until `until`
   * settles (at most `cap` each): every request's outcome.
   */
  async function streamingLoad(clients: number, cap: number, until: Promise<unknown>): Promise<{ tokens: number[]; error?: string }[]> {
    let done = false;
    void until.finally(() => {
      done = true;
    });
    const results: { tokens: number[]; error?: string }[] = [];
    const client = await cluster.client();
    try {
      await Promise.all(
        Array.from({ length: clients }, async () => {
          for (let i = 0; i < cap && !done; i++) {
            const tokens: number[] = [];
            try {
              for await (const ev of client.stream('generate', { model: 'm8', prompt: ORACLE_PROMPT, maxTokens: N_PREDICT, temperature: 0 })) {
                if (ev.event === 'token') tokens.push(...((ev.token as { tokenIds?: number[] }).tokenIds ?? []).map(Number));
              }
              results.push({ tokens });
            } catch (err) {
              results.push({ tokens, error: (err as Error).message });
            }
          }
        }),
      );
    } finally {
      client.close();
    }
    return results;
  }

  itWith([engines], 'orchard node drain under a streaming load: the model moves to the other nodes, no request fails, nothing is left on the drained node', async () => {
    const before = await m8();
    const drained = before.stages[0]!.nodeName; // a worker stage
    const drainedAgent = agents().get(drained)!;
    expect(enginesUnder(drainedAgent.proc.child.pid!).length, 'the drained node runs an rpc-server before').toBeGreaterThan(0);
    let release: () => void = () => {};
    const drainDone = new Promise<void>((r) => {
      release = r;
    });
    const load = streamingLoad(3, 30, drainDone);
    await sleep(1500); // the load is flowing
    const t0 = Date.now();
    const r = await orchard(['node', 'drain', drained, '--json', '--coordinator', coordAddr], env);
    const drainSeconds = (Date.now() - t0) / 1000;
    release();
    const results = await load;
    expect(r.code, r.stderr).toBe(0);
    const out = JSON.parse(r.stdout) as { name: string; moved: { model: string; outcome: string; message: string }[] };
    expect(out.name).toBe(drained);
    expect(out.moved.map((m) => m.model)).toEqual(['m8']);
    console.info(`drain answered: ${r.stdout.trim()}`);
    const failed = results.filter((x) => x.error !== undefined);
    expect(failed, JSON.stringify(failed.slice(0, 3))).toEqual([]);
    // Every stream completes; identity with the oracle is counted, not asserted: when memory does
    // not allow load-new-then-switch the drain re-places the model (outcome "reloaded"), and the
    // planner's layout here (every layer on one worker, a head with none) flips this random
    // model's near-tie at token 7 for some streams — measured, open (see the report of issue #13).
    for (const x of results) expect(x.tokens).toHaveLength(N_PREDICT);
    const identical = results.filter((x) => x.tokens.every((t, i) => t === oracle[i])).length;
    const after = await m8();
    expect(after.state).toBe('ready');
    expect(after.stages.map((s) => s.nodeName)).not.toContain(drained);
    expect(after.loadedAtMs, 'the model was placed again').not.toBe(before.loadedAtMs);
    expect((await status()).nodes.find((n) => n.name === drained)?.drained).toBe(true);
    expect(enginesUnder(drainedAgent.proc.child.pid!), 'the drained node runs no engine').toEqual([]);
    console.info(`drain: ${drained} drained in ${drainSeconds.toFixed(1)} s (${out.moved[0]!.outcome}: ${out.moved[0]!.message}); ${results.length} requests under load, 0 failed, ${identical} equal to the oracle`);

    const undo = await orchard(['node', 'drain', drained, '--undo', '--coordinator', coordAddr], env);
    expect(undo.code, undo.stderr).toBe(0);
    expect((await status()).nodes.find((n) => n.name === drained)?.drained).toBe(false);
  }, 240_000);

  itWith([engines], 'a faster node joins: orchard rebalance --dry-run shows the predicted gain and changes nothing; orchard rebalance moves the model onto it', async () => {
    const before = await m8();
    await startAgent('delta', ['--budget', String(4 * budget), '--bandwidth', '400']);
    for (let i = 0; i < 50 && (await status()).nodes.find((n) => n.name === 'delta')?.state !== 'up'; i++) await sleep(200);

    const dry = await orchard(['rebalance', '--dry-run', '--json', '--coordinator', coordAddr], env);
    expect(dry.code, dry.stderr).toBe(0);
    const [plan] = JSON.parse(dry.stdout) as { model: string; outcome: string; apply: boolean; gain: number; gainNow: number | null; currentTokensPerSecond: number; plannedTokensPerSecond: number; message: string }[];
    expect(plan).toMatchObject({ model: 'm8', outcome: 'kept', apply: true });
    expect(plan!.gain).toBeGreaterThanOrEqual(0.2);
    expect(plan!.plannedTokensPerSecond).toBeGreaterThan(plan!.currentTokensPerSecond);
    expect((await m8()).loadedAtMs, 'a dry run changes nothing').toBe(before.loadedAtMs);

    const applied = await orchard(['rebalance', '--json', '--coordinator', coordAddr], env);
    expect(applied.code, applied.stderr).toBe(0);
    const [done] = JSON.parse(applied.stdout) as { outcome: string; message: string }[];
    expect(done!.outcome, done!.message).toBe('switched');
    const after = await m8();
    expect(after.state).toBe('ready');
    expect(after.stages.map((s) => s.nodeName)).toContain('delta');
    expect(after.predictedTokensPerSecond).toBeGreaterThan(before.predictedTokensPerSecond);
    const [r] = await streamingLoad(1, 1, new Promise(() => {}));
    expect(r).toEqual({ tokens: oracle });
    for (const s of before.stages) {
      if (!after.stages.some((x) => x.nodeName === s.nodeName)) expect(enginesUnder(agents().get(s.nodeName)!.proc.child.pid!), `${s.nodeName} runs no engine`).toEqual([]);
    }
    console.info(`rebalance: predicted ${plan!.currentTokensPerSecond.toFixed(1)} → ${plan!.plannedTokensPerSecond.toFixed(1)} tok/s (+${(100 * plan!.gain).toFixed(0)} %); applied: ${done!.message}`);
  }, 240_000);
});
