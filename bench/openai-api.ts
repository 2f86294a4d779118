/**
 * What the OpenAI API path costs, measured side by side in one run on the demo model:
 *   A: plain llama-server (one process, no RPC), its native /completion stream
 *   B: Orchard, one stage  (coordinator → agent → llama-server) via POST /v1/completions
 *   C: Orchard, three stages (llama.cpp RPC split over three local agents) via the same API
 * Each: greedy, 64 tokens, 5 runs after one warm-up; client-side time to first token and decode
 * tokens/s (after the first token), plus the engine's own decode rate. Prints JSON with ratios.
 * On one machine every process shares the same cores, so C says little about a real cluster;
 * B/A isolates Orchard's relay + SSE overhead.
 *
 *   node --import tsx bench/openai-api.ts
 */
import { spawn } from 'node:child_process';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { DEMO_CTX, demoBudgets, ensureDemoModel } from '../src/cli/demo-model.ts';
import { type LocalCluster, startLocalCluster } from '../src/cli/local-cluster.ts';
import { completionBody } from '../src/node/generate.ts';
import { findLlamaBinaries } from '../src/node/llama/binaries.ts';
import { pickFreePort } from '../src/node/ports.ts';
import { readGgufHeader } from '../src/shared/gguf/reader.ts';
import { modelProfile } from '../src/shared/model/profile.ts';
import { ssePayloads } from '../src/shared/sse.ts';
import { median } from './lib/stats.ts';

const RUNS = 5;
const TOKENS = 64;
const PROMPT = 'Once upon a time, in a land far away,';

interface Sample {
  ttftMs: number;
  clientTps: number;
  engineTps: number;
}

/** Stream one request; `tokenOf` says how many tokens an event carries, `engineOf` reads the engine rate. */
async function measure(url: string, body: unknown, tokenOf: (j: Record<string, unknown>) => number, engineOf: (j: Record<string, unknown>) => number | undefined): Promise<Sample> {
  const t0 = performance.now();
  const res = await fetch(url, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify(body) });
  if (!res.ok || !res.body) throw new Error(`${url}: HTTP ${res.status} ${await res.text()}`);
  let first = 0;
  let last = 0;
  let tokens = 0;
  let engine = 0;
  for await (const p of ssePayloads(res.body as AsyncIterable<Uint8Array>)) {
    if (p === '[DONE]') continue;
    const j = JSON.parse(p) as Record<string, unknown>;
    const n = tokenOf(j);
    if (n > 0) {
      const now = performance.now();
      if (!first) first = now;
      last = now;
      tokens += n;
    }
    engine = engineOf(j) ?? engine;
  }
  return { ttftMs: first - t0, clientTps: tokens > 1 ? (tokens - 1) / ((last - first) / 1000) : 0, engineTps: engine };
}

function summarize(samples: Sample[]) {
  return { ttftMs: median(samples.map((s) => s.ttftMs)), clientTokensPerSecond: median(samples.map((s) => s.clientTps)), engineTokensPerSecond: median(samples.map((s) => s.engineTps)) };
}

async function series(fn: () => Promise<Sample>): Promise<Sample[]> {
  await fn(); // warm-up
  const out: Sample[] = [];
  for (let i = 0; i < RUNS; i++) out.push(await fn());
  return out;
}

const tmp = await mkdtemp(join(tmpdir(), 'orchard-bench-api-'));
const env = { ...process.env, ORCHARD_CACHE_DIR: process.env.ORCHARD_CACHE_DIR ?? join(tmp, 'cache'), ORCHARD_RPC_THREADS: '1', ORCHARD_LLAMA_SERVER_EXTRA_ARGS: '-t 1' };
const bins = await findLlamaBinaries(env);
const model = (await ensureDemoModel(env)).path;
const profile = modelProfile(await readGgufHeader(model));
const clusters: LocalCluster[] = [];
const port = await pickFreePort('127.0.0.1');
const plain = spawn(bins.llamaServer, ['-m', model, '--host', '127.0.0.1', '--port', String(port), '-c', String(DEMO_CTX), '-np', '1', '-t', '1', '--no-webui'], { stdio: 'ignore', detached: true });
try {
  for (let i = 0; i < 600; i++) {
    if (await fetch(`http://127.0.0.1:${port}/health`).then((r) => r.ok, () => false)) break;
    await new Promise((r) => setTimeout(r, 100));
  }
  const plainSamples = await series(() =>
    measure(
      `http://127.0.0.1:${port}/completion`,
      // The body Orchard's agent sends for the same request (B and C below): same sampling, same cache use.
      completionBody({ prompt: PROMPT, maxTokens: TOKENS, temperature: 0, topP: 0, seed: 0, stop: [] }),
      (j) => (typeof j.content === 'string' && j.content !== '' ? 1 : 0),
      (j) => (j.timings as { predicted_per_second?: number } | undefined)?.predicted_per_second,
    ),
  );
  process.kill(-plain.pid!, 'SIGKILL');

  const results: Record<string, ReturnType<typeof summarize>> = { plainLlamaServer: summarize(plainSamples) };
  for (const stages of [1, 3]) {
    const budgets = stages === 1 ? [{ name: 'solo', budgetBytes: 4 * 2 ** 30 }] : demoBudgets(profile, 3, { ctx: DEMO_CTX, cacheType: 'f16' });
    const c = await startLocalCluster({ nodes: budgets, stateRoot: join(tmp, `s${stages}`), env });
    clusters.push(c);
    for (let i = 0; i < 100; i++) {
      const s = (await (await fetch(`${c.httpUrl}/v1/cluster`)).json()) as { nodes: { state: string }[] };
      if (s.nodes.filter((n) => n.state === 'up').length === budgets.length) break;
      await new Promise((r) => setTimeout(r, 100));
    }
    const load = await fetch(`${c.httpUrl}/v1/cluster/models`, { method: 'POST', body: JSON.stringify({ model, name: 'm', ctx: DEMO_CTX }) });
    if (!load.ok) throw new Error(`load: ${await load.text()}`);
    const samples = await series(() =>
      measure(
        `${c.httpUrl}/v1/completions`,
        { model: 'm', prompt: PROMPT, max_tokens: TOKENS, temperature: 0, stream: true, stream_options: { include_usage: true } },
        (j) => ((j.choices as { text?: string }[] | undefined)?.[0]?.text ? 1 : 0),
        (j) => (j.orchard as { timings?: { predicted_tokens_per_second?: number } } | undefined)?.timings?.predicted_tokens_per_second,
      ),
    );
    results[stages === 1 ? 'orchardOneStage' : 'orchardThreeStages'] = summarize(samples);
    await c.stop();
  }
  const a = results.plainLlamaServer!;
  const b = results.orchardOneStage!;
  const c3 = results.orchardThreeStages!;
  process.stdout.write(
    `${JSON.stringify(
      {
        bench: 'openai-api',
        model: { path: model, layers: profile.layerCount },
        runs: RUNS,
        tokens: TOKENS,
        results,
        ratios: {
          oneStageClientVsPlain: b.clientTokensPerSecond / a.clientTokensPerSecond,
          oneStageTtftVsPlain: b.ttftMs / a.ttftMs,
          threeStagesClientVsOneStage: c3.clientTokensPerSecond / b.clientTokensPerSecond,
        },
      },
      null,
      2,
    )}\n`,
  );
} finally {
  try {
    process.kill(-plain.pid!, 'SIGKILL');
  } catch {}
  for (const c of clusters) await c.stop();
  await rm(tmp, { recursive: true, force: true });
}
