import type { CoordinatorClient } from '../../src/coordinator/api/client.ts';
import { CALIBRATION_PROMPT_TOKENS, calibrationRequest, engineRates } from '../../src/node/calibrate.ts';
import { windowContextTokens } from '../../src/shared/placement/decode-fit.ts';
import type { CalibrationEngine, EngineRates } from '../../src/node/calibration-engine.ts';
import { repricedTokensPerSecond, uncontendedRate, waitedFraction } from '../../src/shared/placement/calibration.ts';
import { planFixedSplit } from '../../src/shared/placement/fixed.ts';
import type { Plan } from '../../src/shared/placement/types.ts';
import { median } from '../lib/stats.ts';
import type { LanCluster, Seen } from './cluster.ts';
import { type LinkBytes, linkDelta } from './wire.ts';

/**
 * One scenario's measurements on a loaded model, and the planner's prediction for exactly the
 * layout that was loaded, from exactly what the coordinator's planner saw (calibrated node rates,
 * the links Orchard measured) plus the prompt length the engine reported.
 */

export interface LoadedLayout {
  readonly stages: readonly { node: string; firstLayer: number; lastLayer: number }[];
  readonly seconds: number;
  /** Seconds from the request to the first progress event of each phase (where a load spends its time). */
  readonly phases: Readonly<Record<string, number>>;
}

/** Coordinator.Load streamed to the end: the wall time and the stages (by node name) it placed. */
export async function timedLoad(client: CoordinatorClient, modelPath: string, name: string, ctx: number): Promise<LoadedLayout> {
  const t0 = performance.now();
  let stages: LoadedLayout['stages'] = [];
  const phases: Record<string, number> = {};
  for await (const p of client.stream('load', { modelPath, name, options: { ctx, cacheType: 'f16', parallel: 1, pin: [] }, engine: '' })) {
    phases[String(p.phase)] ??= Number(((performance.now() - t0) / 1000).toFixed(3));
    if (p.phase === 'failed') throw new Error(`load ${name}: ${String(p.message)}`);
    if (p.phase === 'ready') {
      const st = (p.model as { stages: { nodeName: string; firstLayer: number; lastLayer: number }[] }).stages;
      stages = st.map((s) => ({ node: String(s.nodeName), firstLayer: Number(s.firstLayer), lastLayer: Number(s.lastLayer) }));
    }
  }
  return { stages, seconds: (performance.now() - t0) / 1000, phases };
}

export async function unload(client: CoordinatorClient, name: string): Promise<void> {
  await client.unary('unload', { name }, 120_000);
}

interface Run {
  readonly ttftMs: number;
  readonly engineTokensPerSecond: number;
  readonly promptTokens: number;
  readonly enginePromptMs: number;
}

/** One greedy request through the coordinator: client-side time to first token, the engine's own rates. */
async function generate(client: CoordinatorClient, model: string, prompt: string, maxTokens: number): Promise<Run> {
  const t0 = performance.now();
  let first = 0;
  let done: Record<string, unknown> = {};
  for await (const ev of client.stream('generate', { model, prompt, maxTokens, temperature: 0, seed: '1' })) {
    // a one-token answer may arrive with the done event alone: the first token is then there
    if ((ev.event === 'token' || ev.event === 'done') && !first) first = performance.now();
    if (ev.event === 'done') done = ev.done as Record<string, unknown>;
  }
  const t = (done.timings ?? {}) as Record<string, unknown>;
  return { ttftMs: first - t0, engineTokensPerSecond: Number(t.predictedTokensPerSecond ?? 0), promptTokens: Number(done.promptTokens ?? 0), enginePromptMs: Number(t.promptMs ?? 0) };
}

/**
 * A prompt of about `words` words that shares no prefix with any other run (llama-server caches
 * prompts) and, as real prompts do, differs in length from the one before: two of one length in
 * a row let llama.cpp re-run the workers' graph instead of sending it (rpc-wire.ts).
 */
function freshPrompt(run: number, words: number): string {
  const w = ['orchard', 'apple', 'river', 'stone', 'cloud', 'ember', 'maple', 'quartz'];
  return `${run}: ${Array.from({ length: words + (run % 2) }, (_, i) => w[(i * 7 + run) % w.length]).join(' ')}`;
}

export interface Measured {
  readonly decodeTokensPerSecond: number;
  readonly ttftMs: number;
  readonly enginePromptMs: number;
  readonly promptTokens: number;
  /** Prompt tokens of the decode runs (median): with their --tokens, the context their tokens attended to. */
  readonly decodePromptTokens: number;
  readonly decodeRuns: readonly number[];
  readonly ttftRuns: readonly number[];
  /** What each node's link carried during the median TTFT run (`counters`' difference). */
  readonly ttftLinkBytes: LinkBytes | undefined;
  /** The calibration engine's windows next to them: decode rates beside the decode runs, prompt rates beside the TTFT runs. */
  readonly engine: { readonly decodeTokensPerSecond: readonly number[]; readonly promptTokensPerSecond: readonly number[]; readonly waitedFraction: readonly number[] };
}

/** The calibration engine kept up through the run, and the decode tokens of its decode windows (about a second's worth). */
export interface EngineSide {
  readonly engine: CalibrationEngine;
  readonly decodeTokens: number;
}

let runCounter = 0;
/**
 * Decode tokens of a prefill window: the prompt's rate is what counts; two, not one, so the
 * engine's decode time is never zero (llama-server divides by it for its decode rate).
 */
const PREFILL_WINDOW_TOKENS = 2;
let engineWindowCounter = 0;

/**
 * One calibration window (a fresh prompt of the calibration's length, uncached, then `tokens`
 * tokens): llama-server's rates without the time its threads waited for a core another process
 * held, as the calibration's own windows count them (calibration.ts `uncontendedRate`) — the plan
 * was priced with such figures, and raw ones moved ±17 % between minutes on an idle machine.
 */
async function engineWindow(e: EngineSide, tokens: number): Promise<EngineRates & { waited: number }> {
  const before = await e.engine.cpu();
  const rates = await e.engine.request(calibrationRequest(1000 + engineWindowCounter++, tokens));
  const waited = waitedFraction(before, await e.engine.cpu());
  return { ...rates, decode: uncontendedRate(rates.decode, waited), prompt: uncontendedRate(rates.prompt, waited), waited };
}

/**
 * The i-th pair of a cluster run and an engine window, one after the other, never together
 * (both want the same cores), in ABBA order so a steady drift weighs on both sides alike.
 */
async function pair<T, E>(i: number, cluster: () => Promise<T>, engine: () => Promise<E>): Promise<{ run: T; engine: E }> {
  if (i % 2 === 0) {
    const run = await cluster();
    return { run, engine: await engine() };
  }
  const e = await engine();
  return { run: await cluster(), engine: e };
}

/**
 * Decode: `runs` requests of `tokens` tokens after a short prompt, the engine's decode rate
 * (median). TTFT: `runs` requests of one token after a fresh prompt of ~`promptWords` words
 * (median client-side first-token time, through coordinator and agent as a user sees it), after
 * one unmeasured such request: each measured one then follows a request like itself, whose KV
 * llama-server first saves to its prompt cache (rpc-wire.ts), as the prediction assumes. Each
 * decode run is paired with a decode window of the calibration engine and each TTFT run with a
 * prefill window of it (a fresh prompt, as the calibration measures prefill): `engine`'s
 * medians price the scenario's prediction again (`repriced`).
 */
export async function measure(client: CoordinatorClient, model: string, o: { runs: number; tokens: number; promptWords: number; engine: EngineSide }, counters?: () => LinkBytes): Promise<Measured> {
  await generate(client, model, freshPrompt(runCounter++, 8), 4); // warm-up: first touch of every page
  const decode: Run[] = [];
  const engineDecode: number[] = [];
  const waited: number[] = [];
  for (let i = 0; i < o.runs; i++) {
    const p = await pair(i, () => generate(client, model, freshPrompt(runCounter++, 8), o.tokens), () => engineWindow(o.engine, o.engine.decodeTokens));
    decode.push(p.run);
    engineDecode.push(p.engine.decode);
    waited.push(p.engine.waited);
  }
  await generate(client, model, freshPrompt(runCounter++, o.promptWords), 1);
  const ttft: Run[] = [];
  const enginePrompt: number[] = [];
  const moved: (LinkBytes | undefined)[] = [];
  const timedTtft = async () => {
    const before = counters?.();
    const run = await generate(client, model, freshPrompt(runCounter++, o.promptWords), 1);
    moved.push(before && counters ? linkDelta(before, counters()) : undefined);
    return run;
  };
  for (let i = 0; i < o.runs; i++) {
    const p = await pair(i, timedTtft, () => engineWindow(o.engine, PREFILL_WINDOW_TOKENS));
    ttft.push(p.run);
    enginePrompt.push(p.engine.prompt);
    waited.push(p.engine.waited);
  }
  const ttftMs = median(ttft.map((r) => r.ttftMs));
  return {
    decodeTokensPerSecond: median(decode.map((r) => r.engineTokensPerSecond)),
    ttftMs,
    enginePromptMs: median(ttft.map((r) => r.enginePromptMs)),
    promptTokens: Math.round(median(ttft.map((r) => r.promptTokens))),
    decodePromptTokens: Math.round(median(decode.map((r) => r.promptTokens))),
    decodeRuns: decode.map((r) => r.engineTokensPerSecond),
    ttftRuns: ttft.map((r) => r.ttftMs),
    ttftLinkBytes: moved[ttft.findIndex((r) => r.ttftMs === ttftMs)] ?? moved[0],
    engine: { decodeTokensPerSecond: engineDecode, promptTokensPerSecond: enginePrompt, waitedFraction: waited },
  };
}

/**
 * The planner's prediction for the layout that was loaded, for a prompt of `promptTokens` and
 * `outputTokens` (1: a one-token request that follows one like it, what `measure` times for TTFT;
 * a decode run's prompt and --tokens for decode: the context its tokens attend to, cost.ts
 * decodeContextTokens).
 */
export function predict(seen: Seen, layout: LoadedLayout, promptTokens: number, outputTokens = 1): Plan {
  return planFixedSplit(seen.profile, seen.nodes, layout.stages, { ...seen.options, promptTokens, outputTokens });
}

/** Seconds per token a plan's stages spend in decode attention (beyond their reads: cost.ts). */
function attentionSecondsOf(plan: Plan): number {
  return plan.stages.reduce((t, s) => t + Math.max(0, s.secondsPerToken - s.readBytesPerToken / s.bandwidthBytesPerSecond), 0);
}

/**
 * The scenario's prediction priced again with the calibration engine's rates of its own minutes
 * (`measure`'s engine medians, turned into the cost model's node numbers on the engine's model
 * as the calibration does: engineRates, with the calibration's fixed seconds per token, which the
 * plan charges at the head): decode as `orchard demo` does (repricedTokensPerSecond:
 * the same stages, hops and head cost), TTFT by the same cost model on the same layout with every
 * node's rates replaced — the nodes share this machine and its one calibration.
 */
export function repriced(
  seen: Seen,
  layout: LoadedLayout,
  decodePlan: Plan,
  m: Measured,
  engine: { readonly header: Parameters<typeof engineRates>[0]; readonly decodeFixedSecondsPerToken: number; readonly decodeTokens: number; readonly decodeAttentionFlopsPerSecond?: number | undefined },
) {
  // The engine's windows paid attention at their own context (the calibration's prompt and their tokens): out of the bandwidth, as the calibration takes it.
  const attention = engine.decodeAttentionFlopsPerSecond ? { flopsPerSecond: engine.decodeAttentionFlopsPerSecond, contextTokens: windowContextTokens(CALIBRATION_PROMPT_TOKENS, engine.decodeTokens) } : undefined;
  const rates = engineRates(engine.header, median(m.engine.decodeTokensPerSecond), median(m.engine.promptTokensPerSecond), engine.decodeFixedSecondsPerToken, CALIBRATION_PROMPT_TOKENS, attention);
  const nodes = seen.nodes.map((n) => ({ ...n, bandwidthBytesPerSecond: rates.effectiveBandwidthBytesPerSecond, prefillFlopsPerSecond: rates.prefillFlopsPerSecond }));
  const ttft = planFixedSplit(seen.profile, nodes, layout.stages, { ...seen.options, promptTokens: m.promptTokens, outputTokens: 1 }).predicted.ttftSeconds;
  return {
    tokensPerSecond: repricedTokensPerSecond(decodePlan, rates.effectiveBandwidthBytesPerSecond, undefined, attentionSecondsOf(decodePlan)),
    ttftSeconds: ttft,
    effectiveBandwidthBytesPerSecond: rates.effectiveBandwidthBytesPerSecond,
    prefillFlopsPerSecond: rates.prefillFlopsPerSecond,
  };
}

/** The cluster's links as measured now (rtt, payload rate), by node names. */
export function measuredLinks(c: LanCluster): { from: string; to: string; rttMs: number; megabytesPerSecond: number }[] {
  const names = new Map(c.handle.membership.registry.nodes().map((n) => [n.nodeId, n.profile.name]));
  return c.handle.links.matrix.list().map((l) => ({ from: names.get(l.from) ?? l.from, to: names.get(l.to) ?? l.to, rttMs: l.rttSeconds * 1000, megabytesPerSecond: l.bytesPerSecond / 1e6 }));
}
