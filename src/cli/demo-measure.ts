import { loadavg } from 'node:os';
import { z } from 'zod';
import { engineRates } from '../node/calibrate.ts';
import type { CalibrationEngine } from '../node/calibration-engine.ts';
import { completionBody } from '../node/generate.ts';
import { OrchardError } from '../shared/errors.ts';
import { anotherWindow, median, relativeSpread, repricedTokensPerSecond, type WindowPolicy, windowTokens } from '../shared/placement/calibration.ts';
import { boundaryOverhead } from '../shared/placement/decode-fit.ts';
import { apiSse } from './api-client.ts';

/**
 * The demo's two numbers, measured together. The prediction rests on the engine's speed on this
 * machine and the measurement is the cluster's speed on it; on a machine shared with other work
 * both follow its load from second to second. Taken one after the other, 10 s apart, the
 * calibration and the demo's one completion were barely correlated (README, `orchard demo`); taken
 * as alternating windows they moved together (correlation 0.85 over 12 pairs of 48 tokens at load
 * average ~4). So after the streamed completion the demo alternates windows of the same request
 * — the demo's prompt, greedy, the same number of tokens, the body the agents send — between the
 * cluster (through the OpenAI API, llama-server's own decode rate on the head) and the
 * calibration engine (llama-server with the same flags on the whole model, one node), in ABBA
 * order so a steady drift weighs on both alike. Each side's figure is its windows' median; the
 * plan's decode prediction is priced again with the bandwidth the engine's median gives
 * (repricedTokensPerSecond: the same stages, hops and head cost). With a tunnelled engine (the
 * demo model split in two, its first stage behind a loopback engine tunnel, as the calibration
 * measures the boundary overhead), its windows join the rotation and every worker boundary is
 * priced again with the overhead its median gives beside the engine's (decode-fit.ts
 * boundaryOverhead): on this shared 2-vCPU machine a boundary's wake-ups drift with the load as
 * much as the bandwidth does (0.3–2.5 ms within one session).
 */
export const DEMO_WINDOWS: WindowPolicy = { min: 3, max: 7, budgetSeconds: 15 };

const planCostSchema = z.object({
  stages: z.array(z.object({ role: z.string(), readBytesPerToken: z.number().positive(), secondsPerToken: z.number().positive() }).loose()).min(1),
  predicted: z.object({ secondsPerToken: z.number().positive() }).loose(),
});

export interface DecodeAgreement {
  readonly predictedTokensPerSecond: number;
  readonly measuredTokensPerSecond: number;
  readonly windowTokens: number;
  /** Each round: the cluster's, the calibration engine's and (when measured) the tunnelled engine's decode tokens/s. */
  readonly windows: readonly { readonly cluster: number; readonly engine: number; readonly tunnelled?: number }[];
  readonly engineTokensPerSecond: number;
  readonly effectiveBandwidthBytesPerSecond: number;
  /** With a tunnelled engine: its median and the boundary overhead it gives beside the engine's. */
  readonly tunnelledTokensPerSecond?: number;
  readonly boundaryOverheadSeconds?: number;
  /** The link probe's median round trip over the tunnelled engine's tunnel, one probe a round. */
  readonly probeRttSeconds?: number;
  /** ±spread of each side's windows around its median. */
  readonly spread: { readonly cluster: number; readonly engine: number };
  readonly loadAverage1m: { readonly start: number; readonly end: number };
}

/** One streamed completion through the cluster's OpenAI API: the head engine's decode rate. */
async function clusterWindow(baseUrl: string, model: string, prompt: string, tokens: number, signal: AbortSignal): Promise<number> {
  const body = { model, prompt, max_tokens: tokens, temperature: 0, stream: true, stream_options: { include_usage: true } };
  let rate = 0;
  for await (const c of apiSse({ baseUrl }, '/v1/completions', body, signal)) {
    const t = (c.orchard as { timings?: { predicted_tokens_per_second?: number } } | undefined)?.timings;
    if (t?.predicted_tokens_per_second) rate = t.predicted_tokens_per_second;
  }
  if (!(rate > 0)) throw new OrchardError('the cluster reported no decode rate');
  return rate;
}

/**
 * Alternate decode windows between the cluster and `engine` (see above) and return both medians
 * and the plan priced with the engine's. `promptTokensPerSecond` is the calibration's (a decode
 * window's prompt is cached, so it says nothing about prefill).
 */
export async function measureAgreement(o: {
  readonly baseUrl: string;
  readonly model: string;
  readonly prompt: string;
  readonly plan: unknown;
  readonly header: Parameters<typeof engineRates>[0];
  readonly engine: CalibrationEngine;
  readonly engineTokensPerSecond: number;
  readonly promptTokensPerSecond: number;
  /** The calibration's fixed seconds per token: the engine's windows are priced with it, as the plan's head is. */
  readonly decodeFixedSecondsPerToken: number;
  /**
   * The demo model split in two, its first stage tunnelled (calibrate.ts), with the boundary
   * overhead the plan was priced with and the probe's round trip over its tunnel.
   */
  readonly tunnelled?: { readonly engine: CalibrationEngine; readonly plannedOverheadSeconds: number };
  readonly signal: AbortSignal;
  readonly policy?: WindowPolicy;
}): Promise<DecodeAgreement> {
  const plan = planCostSchema.parse(o.plan);
  const tokens = windowTokens(o.engineTokensPerSecond);
  const engineBody = completionBody({ prompt: o.prompt, maxTokens: tokens, temperature: 0, topP: 0, seed: 0, stop: [] });
  const sides: (() => Promise<number>)[] = [
    () => clusterWindow(o.baseUrl, o.model, o.prompt, tokens, o.signal),
    async () => (await o.engine.request(engineBody, o.signal)).decode,
    ...(o.tunnelled ? [async () => (await o.tunnelled!.engine.request(engineBody, o.signal)).decode] : []),
  ];
  const start = loadavg()[0] ?? 0;
  const t0 = performance.now();
  const rounds: number[][] = [];
  const probes: number[] = [];
  const policy = o.policy ?? { ...DEMO_WINDOWS, budgetSeconds: (DEMO_WINDOWS.budgetSeconds * sides.length) / 2 };
  while (anotherWindow(policy, rounds.length, (performance.now() - t0) / 1000)) {
    // ABC then CBA: a steady drift weighs on every side alike.
    const order = sides.map((_, i) => i);
    if (rounds.length % 2 === 1) order.reverse();
    const round: number[] = [];
    for (const i of order) round[i] = await sides[i]!();
    rounds.push(round);
    // The probe's round trip over the tunnel, once a round, beside the windows it is taken from.
    if (o.tunnelled?.engine.probeRttSeconds) probes.push(await o.tunnelled.engine.probeRttSeconds());
  }
  const windows = rounds.map(([cluster, engine, tunnelled]) => ({ cluster: cluster!, engine: engine!, ...(tunnelled !== undefined ? { tunnelled } : {}) }));
  const clusterRates = windows.map((w) => w.cluster);
  const engineRatesMeasured = windows.map((w) => w.engine);
  const engineTokensPerSecond = median(engineRatesMeasured);
  const bandwidth = engineRates(o.header, engineTokensPerSecond, o.promptTokensPerSecond, o.decodeFixedSecondsPerToken).effectiveBandwidthBytesPerSecond;
  // With a tunnelled engine: its median, the probe's, and the boundary overhead they give beside the engine's.
  let tunnelled: { tunnelledTokensPerSecond: number; boundaryOverheadSeconds: number; probeRttSeconds: number } | undefined;
  if (o.tunnelled) {
    const tunnelledTokensPerSecond = median(windows.map((w) => w.tunnelled!));
    const probeRttSeconds = probes.length ? median(probes) : 0;
    const boundaryOverheadSeconds = boundaryOverhead({ decodeTokensPerSecond: engineTokensPerSecond }, { decodeTokensPerSecond: tunnelledTokensPerSecond }, probeRttSeconds);
    tunnelled = { tunnelledTokensPerSecond, boundaryOverheadSeconds, probeRttSeconds };
  }
  const boundary = o.tunnelled && tunnelled ? { plannedSeconds: o.tunnelled.plannedOverheadSeconds, measuredSeconds: tunnelled.boundaryOverheadSeconds } : undefined;
  return {
    predictedTokensPerSecond: repricedTokensPerSecond(plan, bandwidth, boundary),
    measuredTokensPerSecond: median(clusterRates),
    windowTokens: tokens,
    windows,
    engineTokensPerSecond,
    effectiveBandwidthBytesPerSecond: bandwidth,
    ...tunnelled,
    spread: { cluster: relativeSpread(clusterRates), engine: relativeSpread(engineRatesMeasured) },
    loadAverage1m: { start, end: loadavg()[0] ?? 0 },
  };
}
