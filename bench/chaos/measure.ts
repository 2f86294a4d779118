import { sleep } from '../lib/cluster.ts';
import { enginePids } from './engines.ts';
import { type Load, type Stream, startLoad } from './load.ts';
import { type Chaos, modelStatus, type Scenario, type ScenarioKind, waitReady } from './scenarios.ts';

/**
 * One scenario under the steady load, measured from the clients' side, the coordinator's metrics
 * and the process table, then judged against the goal of its kind.
 */
export interface Baseline {
  /** Engine processes of the placement right after the load (a CPU head runs its own rpc-server too). */
  readonly engines: number;
  /** Greedy tokens of an undisturbed warm run. */
  readonly reference: readonly number[];
  /** …and of the first request after a load (cold prompt cache: llama.cpp's greedy tokens can differ on this random model). */
  readonly coldReference: readonly number[];
  readonly downAfterSeconds: number;
  readonly tokens: number;
  readonly loadSeconds: number;
}

async function metric(http: string, name: string): Promise<number> {
  const text = await (await fetch(`http://${http}/metrics`)).text();
  return text
    .split('\n')
    .filter((l) => l.startsWith(`${name}{`))
    .reduce((t, l) => t + Number(l.slice(l.lastIndexOf(' ') + 1)), 0);
}

const agentPids = (c: Chaos) => c.cluster.nodes.map((n) => n.proc.child.pid!);

/** The pause the clients saw: the longest gap between tokens (any client) from `fromMs` on. */
function longestGapMs(arrivals: readonly number[], fromMs: number): number {
  const times = [fromMs, ...arrivals.filter((t) => t >= fromMs)].sort((a, b) => a - b);
  return times.slice(1).reduce((m, t, i) => Math.max(m, t - times[i]!), 0);
}

function streamFigures(load: Load, faultMs: number, b: Baseline) {
  const same = (x: Stream, ref: readonly number[]) => x.tokens.join() === ref.join();
  const spanning = load.streams.filter((x) => x.startMs < faultMs && x.endMs > faultMs && !x.failed);
  // In flight at the fault: tokens before it and after it (parallel 1: the others wait in the queue).
  const interrupted = spanning.filter((x) => x.times.some((t) => t < faultMs) && x.times.some((t) => t >= faultMs));
  const failed = load.streams.filter((x) => x.failed);
  return {
    requestsFailed: failed.length,
    requestsFailedMidStream: failed.filter((x) => x.tokens.length > 0).length,
    requestsTotal: load.streams.length,
    streamsSpanningFault: spanning.length,
    streamsInFlightAtFault: interrupted.length,
    streamsResumedIdentical: interrupted.filter((x) => same(x, b.reference)).length,
    streamsInFlightEqualColdRun: interrupted.filter((x) => same(x, b.coldReference)).length,
    streamsDiffering: load.streams.filter((x) => !x.failed && !same(x, b.reference)).length,
    firstErrors: [...new Set(failed.map((x) => x.error ?? ''))].slice(0, 3),
  };
}

function goalMet(s: Scenario, r: Record<string, number>, b: Baseline): { goal: string; met: boolean } {
  const clean = r.orphanEngines === 0;
  // A cut link sends no reset: the coordinator knows the node is lost only after the grace (a
  // shorter cut is a blip), so the pause may be that much longer.
  const bound = b.loadSeconds + 5 + (s.lossNeedsGrace ? b.downAfterSeconds : 0);
  const kind: ScenarioKind = s.kind;
  switch (kind) {
    case 'blip':
      return { goal: '0 failed, 0 reloads, 0 orphans', met: clean && r.requestsFailed === 0 && r.reloads === 0 && r.enginesReplaced === 0 };
    case 'degraded':
      return { goal: '0 failed, 0 reloads, 0 orphans', met: clean && r.requestsFailed === 0 && r.reloads === 0 };
    case 'node-loss':
      return {
        goal: `0 failed, resumed streams identical, serving within load time + 5 s${s.lossNeedsGrace ? ' + the down-after grace' : ''} (${bound.toFixed(1)} s), 0 orphans`,
        met: clean && r.requestsFailed === 0 && r.streamsResumedIdentical === r.streamsInFlightAtFault && r.recoverySeconds! <= bound,
      };
    case 'drain':
      return { goal: '0 failed, nothing left on the drained node, 0 orphans', met: clean && r.requestsFailed === 0 && r.stagesLeftOnDrainedNode === 0 };
    case 'coordinator':
      return { goal: '0 reloads, serving within 5 s of the new coordinator listening, 0 orphans', met: clean && r.enginesReplaced === 0 && r.reloads === 0 && r.servingAfterReadySeconds! <= 5 };
  }
}

export async function runScenario(c: Chaos, s: Scenario, b: Baseline): Promise<Record<string, unknown>> {
  const http = c.cluster.httpAddress;
  const before = { resumed: await metric(http, 'orchard_streams_resumed_total'), reloads: (await modelStatus(c)).recoveries, engines: enginePids(agentPids(c)) };
  const load = startLoad(c.cluster, c.model, b.tokens);
  await sleep(2000);
  const faultMs = Date.now();
  const extra = (await s.fault(c)) ?? {};
  await waitReady(c, 120_000);
  await sleep(3000);
  await load.stop();
  await sleep(1000);
  const after = { resumed: await metric(http, 'orchard_streams_resumed_total'), reloads: (await modelStatus(c)).recoveries, engines: enginePids(agentPids(c)) };
  // A restarted coordinator starts its counters at 0.
  const counted = (a: number, z: number) => (z >= a ? z - a : z);
  const { coordinatorReadyAtMs, ...rest } = extra;
  const r: Record<string, number> = {
    recoverySeconds: longestGapMs(load.arrivals, faultMs) / 1000,
    streamsResumed: counted(before.resumed, after.resumed),
    reloads: counted(before.reloads, after.reloads),
    enginesReplaced: after.engines.filter((p) => !before.engines.includes(p)).length,
    orphanEngines: Math.max(0, after.engines.length - b.engines),
    ...rest,
  };
  if (coordinatorReadyAtMs) r.servingAfterReadySeconds = ((load.arrivals.filter((t) => t >= coordinatorReadyAtMs).sort((x, y) => x - y)[0] ?? Number.POSITIVE_INFINITY) - coordinatorReadyAtMs) / 1000;
  const figures = streamFigures(load, faultMs, b);
  const judged = goalMet(s, { ...r, requestsFailed: figures.requestsFailed, streamsResumedIdentical: figures.streamsResumedIdentical, streamsInFlightAtFault: figures.streamsInFlightAtFault, requestsTotal: figures.requestsTotal }, b);
  return { scenario: s.name, kind: s.kind, ...r, ...figures, ...judged };
}
