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
 * Self-healing, end to end with real processes on 127.0.0.1: a coordinator and three agents whose
 * budgets force a 2-stage plan of a generated 8-layer GGUF, so one node is always spare. A blip
 * (an agent and its engines frozen with SIGSTOP for 3 s) must cost nothing: the in-flight greedy
 * stream pauses and ends with the oracle's tokens, nothing fails, nothing reloads. A worker
 * SIGKILLed mid-stream with room left: the instance recovers on the other two nodes and the
 * stream resumes with the oracle's tokens. Two of three nodes lost: the model no longer fits, is
 * failed naming the shortfall, and heals by itself when one node returns.
 */

const CTX = 2048;
const N_PREDICT = 48;
const engines = await llamaEngines();
const dir = tempDir('orchard-heal-', 'all');

interface Status {
  nodes: { id: string; name: string; state: string }[];
  models: { name: string; state: string; error?: string; loadedAtMs?: number; recoveries?: number; stages: { nodeId: string; nodeName: string }[] }[];
}

/** The process and every descendant (an agent's engines run in their own process groups). */
function processTree(pid: number): number[] {
  const rows = execFileSync('ps', ['-eo', 'pid=,ppid='], { encoding: 'utf8' })
    .trim()
    .split('\n')
    .map((l) => l.trim().split(/\s+/).map(Number) as [number, number]);
  const out = [pid];
  for (let i = 0; i < out.length; i++) for (const [p, pp] of rows) if (pp === out[i]) out.push(p);
  return out;
}

function signalTree(pids: readonly number[], sig: NodeJS.Signals): void {
  for (const p of pids) {
    try {
      process.kill(p, sig);
    } catch {
      // gone already
    }
  }
}

describeWith([engines], 'self-healing: liveness, re-placement, resumed streams', () => {
  let cluster: JoinedCluster;
  let model: string;
  let coordHttp: string;
  let budget: number;
  let oracle: number[];
  const agents = () => cluster.agents;
  const status = () => cluster.status<Status>();

  beforeAll(async () => {
    const bins = engines.ok ? (engines.value as LlamaBinaries) : undefined;
    if (!bins) return;
    const env = { ...process.env, ORCHARD_LLAMA_BIN_DIR: bins.binDir, ORCHARD_LOG_FORMAT: 'json', ORCHARD_LLAMA_SERVER_EXTRA_ARGS: '-t 1', ORCHARD_RPC_THREADS: '1' };
    ({ model, budget } = await modelThatMustSplit(['--layers', '8', '--seed', '7'], CTX));
    cluster = new JoinedCluster({ dir: dir.path, env });
    // A short suspect threshold so the blip is surely seen as one; the grace (down-after) is the default.
    await cluster.startCoordinator(['--suspect-after', '1000']);
    coordHttp = cluster.httpAddress;
    // Three first joins; an agent restarted later keeps its certificate and needs no token.
    await cluster.mintToken(3);
    for (const name of ['alpha', 'bravo', 'charlie']) await startAgent(name);
    oracle = await plainLlamaTokens(bins, { model, ctx: CTX, prompt: ORACLE_PROMPT, nPredict: N_PREDICT, threads: 2 });
    await cluster.waitUp(3);
    const load = await orchard(['load', model, '--ctx', String(CTX), '--name', 'm8', '--coordinator', cluster.grpcAddress], cluster.env);
    expect(load.code, load.stderr).toBe(0);
  }, 240_000);

  afterAll(async () => {
    await cluster?.stop();
  });

  /** A node's state from the coordinator's HTTP /status (cheap: `orchard status` starts a CLI process). */
  const nodeStateOverHttp = async (nodeId: string): Promise<string | undefined> => {
    const s = (await (await fetch(`http://${coordHttp}/status`)).json()) as { nodes: { profile: { nodeId: string }; state: string }[] };
    return s.nodes.find((x) => x.profile.nodeId === nodeId)?.state.replace('NODE_STATE_', '').toLowerCase();
  };

  /** A greedy stream of N_PREDICT tokens; `onToken(n)` runs after the n-th token. */
  async function stream(onToken: (n: number) => Promise<void> | void): Promise<{ tokens: number[]; maxGapMs: number; gapAfter: number; error?: Error }> {
    const client = await cluster.client();
    const tokens: number[] = [];
    let last = Date.now();
    let maxGapMs = 0;
    let gapAfter = 0;
    try {
      for await (const ev of client.stream('generate', { model: 'm8', prompt: ORACLE_PROMPT, maxTokens: N_PREDICT, temperature: 0 })) {
        if (ev.event !== 'token') continue;
        const now = Date.now();
        if (now - last > maxGapMs) [maxGapMs, gapAfter] = [now - last, tokens.length];
        last = now;
        tokens.push(...((ev.token as { tokenIds?: number[] }).tokenIds ?? []).map(Number));
        await onToken(tokens.length);
      }
      return { tokens, maxGapMs, gapAfter };
    } catch (err) {
      return { tokens, maxGapMs, gapAfter, error: err as Error };
    } finally {
      client.close();
    }
  }

  itWith([engines], 'a worker frozen for 3 s (SIGSTOP, agent and engines) is a blip: the stream pauses, nothing fails, nothing reloads', async () => {
    const before = (await status()).models.find((m) => m.name === 'm8')!;
    expect(before.state).toBe('ready');
    const worker = [...agents().values()].find((a) => a.nodeId === before.stages[0]!.nodeId)!;
    const frozen = processTree(worker.proc.child.pid!);
    expect(frozen.length, 'the worker runs its rpc-server').toBeGreaterThan(1);
    let sawSuspect = false;
    const r = await stream(async (n) => {
      if (n !== 3) return;
      // The thaw runs on a timer, not after the polling: on a loaded machine one poll can take
      // seconds, and a freeze that outlasts the grace period is a death, not a blip.
      signalTree(frozen, 'SIGSTOP');
      const thawed = sleep(3000).then(() => signalTree(frozen, 'SIGCONT'));
      try {
        const until = Date.now() + 3000;
        while (Date.now() < until && !sawSuspect) {
          sawSuspect = (await nodeStateOverHttp(worker.nodeId)) === 'suspect';
          await sleep(100);
        }
      } finally {
        await thawed;
      }
    });
    expect(r.error).toBeUndefined();
    expect(sawSuspect, 'the frozen node turned suspect: the blip was seen').toBe(true);
    expect(r.maxGapMs, 'the stream paused across the freeze').toBeGreaterThan(2500);
    expect(r.tokens).toEqual(oracle);
    await sleep(1500);
    const after = await status();
    const m = after.models.find((x) => x.name === 'm8')!;
    expect(m.state).toBe('ready');
    expect(m.loadedAtMs, 'no reload').toBe(before.loadedAtMs);
    expect(after.nodes.find((x) => x.id === worker.nodeId)?.state).toBe('up');
  }, 60_000);
  /** Start (or restart, same state dir = same node id) an agent that joins the coordinator. */
  async function startAgent(name: string): Promise<void> {
    await cluster.startAgent(name, ['--budget', String(budget)]);
  }

  async function waitFor<T>(what: string, fn: () => Promise<T | undefined>, timeoutMs: number): Promise<T> {
    const until = Date.now() + timeoutMs;
    for (;;) {
      const v = await fn();
      if (v !== undefined) return v;
      if (Date.now() > until) throw new Error(`timed out waiting for ${what}`);
      await sleep(300);
    }
  }

  const metric = async (name: string): Promise<number> => {
    const text = await (await fetch(`http://${coordHttp}/metrics`)).text();
    return text
      .split('\n')
      .filter((l) => l.startsWith(`${name}{`) && l.includes('model="m8"'))
      .reduce((t, l) => t + Number(l.slice(l.lastIndexOf(' ') + 1)), 0);
  };

  itWith([engines], 'a worker agent SIGKILLed mid-stream with room left: recovering → ready on the others, the stream resumes with the undisturbed run\'s tokens', async () => {
    const before = (await status()).models.find((m) => m.name === 'm8')!;
    const victimName = before.stages[0]!.nodeName; // a worker stage, not the head
    const victim = agents().get(victimName)!;
    let killedAt = 0;
    try {
      const r = await stream((n) => {
        if (n === 3) {
          killedAt = Date.now();
          process.kill(victim.proc.child.pid!, 'SIGKILL');
        }
      });
      const resumedAfterS = (Date.now() - killedAt) / 1000;
      expect(r.error, r.error?.message).toBeUndefined();
      // Greedy output equals an undisturbed run: the new head replays the delivered tokens one
      // decode step at a time (the agent's relay), so a near-tie cannot flip the way a one-batch
      // prefill of prompt + delivered tokens did here (token 7 of 48, in some runs). The message
      // names the resume point (the longest pause): CI flipped token 7 once more in session 14.
      expect(r.tokens, `resumed after ${r.gapAfter} delivered tokens`).toEqual(oracle);
      const after = (await status()).models.find((m) => m.name === 'm8')!;
      expect(after.state).toBe('ready');
      expect(after.recoveries).toBe(1);
      expect(after.stages.some((s) => s.nodeName === victimName)).toBe(false);
      expect(await metric('orchard_streams_resumed_total')).toBe(1);
      expect(await metric('orchard_instance_recoveries_total')).toBe(1);
      console.info(`self-heal: ${victimName} SIGKILLed; stream finished ${resumedAfterS.toFixed(1)} s later, pause ${(r.maxGapMs / 1000).toFixed(1)} s after token ${r.gapAfter}, identical to an undisturbed run`);
    } finally {
      await startAgent(victimName); // back for the next test, also when an expectation failed
    }
  }, 120_000);

  itWith([engines], 'a model that no longer fits → failed naming the shortfall and the lost nodes; it heals by itself when a node returns', async () => {
    await waitFor('3 nodes up', async () => ((await status()).nodes.filter((n) => n.state === 'up').length === 3 ? true : undefined), 20_000);
    const before = (await status()).models.find((m) => m.name === 'm8')!;
    const lost = before.stages.map((s) => s.nodeName);
    for (const name of lost) process.kill(agents().get(name)!.proc.child.pid!, 'SIGKILL');
    const failed = await waitFor('m8 failed', async () => (await status()).models.find((m) => m.name === 'm8' && m.state === 'failed'), 60_000);
    expect(failed.error).toMatch(/needs [\d.]+ \w*B more: bring back/);
    for (const name of lost) expect(failed.error).toContain(name);
    const refused = await stream(() => {});
    expect(refused.error?.message).toMatch(/needs [\d.]+ \w*B more/);

    await startAgent(lost[0]!);
    const healed = await waitFor('m8 ready again', async () => (await status()).models.find((m) => m.name === 'm8' && m.state === 'ready'), 90_000);
    expect(healed.recoveries).toBe(2);
    const r = await stream(() => {});
    expect(r.error).toBeUndefined();
    expect(r.tokens).toEqual(oracle);
    await startAgent(lost[1]!);
  }, 180_000);
});
