import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { afterAll, beforeAll, expect } from 'vitest';
import { statusJson } from '../../src/cli/commands/status.ts';
import { DEMO_CTX, demoBudgets, ensureDemoModel } from '../../src/cli/demo-model.ts';
import { measureCalibration } from '../../src/node/calibrate.ts';
import { DEFAULT_PLACEMENT_OPTIONS } from '../../src/shared/placement/types.ts';
import { readGgufHeader } from '../../src/shared/gguf/reader.ts';
import { modelProfile } from '../../src/shared/model/profile.ts';
import { JoinedCluster } from '../helpers/joined-cluster.ts';
import { describeWith, itWith, llamaEngines } from '../helpers/needs.ts';
import { orchard, sleep } from '../helpers/processes.ts';
import { tempDir } from '../helpers/temp-dir.ts';

/*
 * `orchard plan --prompt-tokens N` on a live joined cluster (issue #15: "predicts time to first
 * token") checked against the time to first token a user measures through the OpenAI API for a
 * prompt of exactly N tokens. Two agents whose budgets force a 2-stage split of the demo model;
 * the node numbers are measured on that model just before (as `orchard demo` does: a shared
 * machine's throughput follows its load) and handed to the agents; the links are the ones the
 * coordinator measured. Nothing here is fitted to the result: the prediction is the coordinator's
 * Plan answer printed by the CLI, the measurement the median of three fresh prompts (llama-server
 * caches prompts, so each run's ids differ from the first token on). Tolerance: 40 % here (see the check; the 25 % is bench:lan's).
 */

const engines = await llamaEngines();
const PROMPT_TOKENS = 256;
const RUNS = 3;
const dir = tempDir('orchard-plan-ttft-', 'all');

/**
 * A prompt of PROMPT_TOKENS tokens that shares no prefix with another run's (llama-server caches
 * prompts): BOS and words that are single tokens of the demo model's vocabulary, in a rotated order.
 */
function prompt(run: number): string {
  const w = ['apple', 'river', 'stone', 'cloud', 'water', 'light', 'house', 'green'];
  return Array.from({ length: PROMPT_TOKENS - 1 }, (_, i) => w[(i * 3 + run + 8) % w.length]).join(' ');
}

describeWith([engines], 'orchard plan --prompt-tokens on a live cluster', () => {
  let cluster: JoinedCluster;
  let model: string;
  /** How much of its windows the calibration engine waited for a core: its rates, and so the plan, are without those waits. */
  let waited = 0;

  beforeAll(async () => {
    const binDir = engines.ok ? engines.value.binDir : '';
    const base = { ...process.env, ORCHARD_LLAMA_BIN_DIR: binDir, ORCHARD_LOG_FORMAT: 'json', ORCHARD_LLAMA_SERVER_EXTRA_ARGS: '-t 1', ORCHARD_RPC_THREADS: '1' };
    model = (await ensureDemoModel(base)).path;
    const calibration = join(dir.path, 'calibration.json');
    // One depth on the demo model: the fixed seconds per token are the planner's assumed head
    // overhead (this test is about the prompt; a two-depth calibration would add half a minute).
    const decodeFixedSecondsPerToken = DEFAULT_PLACEMENT_OPTIONS.headOverheadSeconds;
    waited = (await measureCalibration(1, base, { model, file: calibration, decodeFixedSecondsPerToken })).waitedFraction;
    const budgets = demoBudgets(modelProfile(await readGgufHeader(model)), 2, { ctx: DEMO_CTX, cacheType: 'f16' });
    cluster = new JoinedCluster({ dir: dir.path, env: { ...base, ORCHARD_CALIBRATION_FILE: calibration } });
    await cluster.startCoordinator();
    await cluster.mintToken(2);
    for (const [i, name] of ['alpha', 'bravo'].entries()) await cluster.startAgent(name, ['--budget', String(budgets[i]!.budgetBytes)]);
    // Plan once the coordinator has measured the link both ways (it probes when a node comes up).
    const client = await cluster.client();
    try {
      for (const until = Date.now() + 30_000; Date.now() < until; await sleep(250)) {
        const links = (statusJson(await client.unary('status', {}, 5000)) as { links: { rttSeconds: number | null; bytesPerSecond: number | null }[] }).links;
        if (links.filter((l) => l.rttSeconds && l.bytesPerSecond).length === 2) break;
      }
    } finally {
      client.close();
    }
  }, 120_000);

  afterAll(async () => {
    await cluster?.stop();
  });

  itWith(
    [engines],
    'the predicted time to first token is within 40 % of the one measured through /v1/completions (25 %: bench:lan)',
    async () => {
      // The CLI's live plan for the prompt, before the load (a Plan counts loaded models against the budgets).
      const plan = await orchard(['plan', model, '--ctx', String(DEMO_CTX), '--prompt-tokens', String(PROMPT_TOKENS), '--json', '--coordinator', cluster.grpcAddress], cluster.env);
      expect(plan.code, plan.stderr).toBe(0);
      const p = JSON.parse(plan.stdout) as { stages: { node: string; firstLayer: number; lastLayer: number }[]; predicted: { promptTokens: number; ttftSeconds: number } };
      expect(p.predicted.promptTokens).toBe(PROMPT_TOKENS);
      const load = await orchard(['load', model, '--ctx', String(DEMO_CTX), '--name', 'demo', '--coordinator', cluster.grpcAddress], cluster.env);
      expect(load.code, load.stderr).toBe(0);
      const status = await orchard(['status', '--json', '--coordinator', cluster.grpcAddress], cluster.env);
      const loaded = (JSON.parse(status.stdout) as { models: { stages: { nodeName: string; firstLayer: number; lastLayer: number }[] }[] }).models[0]!;
      expect(p.stages).toHaveLength(2);
      expect(loaded.stages.map((s) => `${s.nodeName}:${s.firstLayer}-${s.lastLayer}`)).toEqual(p.stages.map((s) => `${s.node}:${s.firstLayer}-${s.lastLayer}`));
      const key = (await readFile(join(cluster.stateDir, 'admin-key'), 'utf8')).trim();
      const ttft = async (run: number): Promise<{ ms: number; promptTokens: number; enginePromptMs: number }> => {
        const t0 = performance.now();
        const res = await fetch(`http://${cluster.httpAddress}/v1/completions`, {
          method: 'POST',
          headers: { authorization: `Bearer ${key}`, 'content-type': 'application/json' },
          body: JSON.stringify({ model: 'demo', prompt: prompt(run), max_tokens: 1, temperature: 0, stream: true, stream_options: { include_usage: true } }),
        });
        if (res.status !== 200) throw new Error(`/v1/completions answered ${res.status}: ${await res.text()}`);
        let first = 0;
        let text = '';
        const decoder = new TextDecoder();
        for await (const chunk of res.body as unknown as AsyncIterable<Uint8Array>) {
          text += decoder.decode(chunk, { stream: true });
          // the first token: the first chunk with a choice (headers may come before it)
          if (!first && text.includes('"choices":[{')) first = performance.now();
        }
        const usage = text
          .split('\n\n')
          .filter((e) => e.startsWith('data: {'))
          .map((e) => JSON.parse(e.slice(6)) as { usage?: { prompt_tokens: number }; orchard?: { timings: { prompt_ms: number } } })
          .find((c) => c.usage);
        return { ms: first - t0, promptTokens: usage?.usage?.prompt_tokens ?? -1, enginePromptMs: usage?.orchard?.timings.prompt_ms ?? -1 };
      };
      await ttft(-1); // warm-up: first touch of every page on both nodes
      const runs: Awaited<ReturnType<typeof ttft>>[] = [];
      for (let i = 0; i < RUNS; i++) runs.push(await ttft(i));
      for (const r of runs) expect(r.promptTokens).toBe(PROMPT_TOKENS);

      const measured = runs.map((r) => r.ms).sort((a, b) => a - b)[1]!;
      // The plan prices the engine with its cores free (calibration.ts uncontendedRate); the cluster
      // runs minutes later on the same shared machine, so it is held to the calibration's own share of
      // the cores — what the prediction was compared with before the calibration took the waits out.
      const predicted = (p.predicted.ttftSeconds * 1000) / (1 - waited);
      console.log(`plan --prompt-tokens ${PROMPT_TOKENS}: predicted ${(p.predicted.ttftSeconds * 1000).toFixed(0)} ms (${predicted.toFixed(0)} at the calibration's ${(100 * waited).toFixed(0)} % wait), measured ${runs.map((r) => r.ms.toFixed(0)).join(' / ')} ms (median ${measured.toFixed(0)}; the engine's own prompt time ${runs.map((r) => r.enginePromptMs.toFixed(0)).join(' / ')} ms)`);
      // The 25 % is judged by bench:lan (shaped links, idle machine). Here, on 2 cores where
      // the tunnels' relay processes, the agents and the coordinator share the CPU with the stages,
      // the two-stage prompt measured 18-37 % slower than the calibration-priced prediction on an idle
      // machine (the calibration engine alone: ~300 ms for these 256 tokens, the prediction 308-335 ms,
      // the cluster's engine 380-420 ms; bench/README.md, orchard demo): an unmodelled cost of this
      // box, not of a Mac with free cores. The bound keeps the prediction honest to within that.
      expect(Math.abs(measured - predicted) / predicted).toBeLessThanOrEqual(0.4);
    },
    120_000,
  );
});
