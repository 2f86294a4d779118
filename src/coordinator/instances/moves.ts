import { setTimeout as sleep } from 'node:timers/promises';
import { errorMessage } from '../../shared/errors.ts';
import type { Logger } from '../../shared/log.ts';
import { CoordinatorError } from '../errors.ts';
import type { NodeEntry } from '../membership/registry.ts';
import type { EngineGroup, EngineStream, LoadContext } from './driver.ts';
import { failureSignal, type Instance } from './instance.ts';
import { PlanDoesNotFitError } from './planner-adapter.ts';
import { AUTO_REBALANCE_MIN_GAIN, type CandidatePlan, decideRebalance, type RebalanceDecision, type RebalanceMode } from './rebalance.ts';
import type { PlacementResult } from './types.ts';

/**
 * Membership changes on purpose (`orchard node drain`, `orchard rebalance`): a ready instance
 * moves by load-new-then-switch. It is planned on the nodes it may use with its running engines
 * still counted (the planner's reservations), the new engines start and are verified next to the
 * old ones (`inst.staged`), new requests go to them at the switch, in-flight streams get a grace
 * period to end on the old engines and the rest resume on the new ones (request.ts), then the old
 * engines stop: no pause and no failed request. When memory does not allow both at once a drain
 * falls back to the recovery path (stop, re-place without the node: a pause, requests wait and
 * streams resume); a rebalance is not applied.
 */
export interface MoveHost {
  readonly log: Logger;
  node(nodeId: string): NodeEntry | undefined;
  nodes(): readonly NodeEntry[];
  /** Instances, ready or not. */
  instances(): readonly Instance[];
  /** Plan the instance on the nodes it may use now (up, not drained); `ignoringItself`: as if it held nothing. */
  plan(inst: Instance, ignoringItself: boolean): Promise<PlacementResult>;
  /** A new engine group for the instance; `gone` hears of its engines while it is staged. */
  newGroup(inst: Instance, gone: (reason: string) => void): EngineGroup;
  /** The instance changed (status event, instance store). */
  changed(inst: Instance): void;
  /** Stop the instance's engines and re-place it through the recovery path; resolves once it serves again. */
  reload(inst: Instance, reason: string): Promise<void>;
}

/** How long --rebalance auto waits after a node joins or returns before weighing the models (they often come together). */
const AUTO_REBALANCE_DELAY_MS = 5000;

/**
 * The runtime's moves: the drained nodes (no new placement on them until undrained), one move
 * at a time (drains and rebalances queue behind each other), and --rebalance auto.
 */
export class PlacementMoves {
  readonly #drained = new Set<string>();
  #moving: Promise<unknown> = Promise.resolve();
  #auto: NodeJS.Timeout | undefined;

  constructor(
    private readonly mode: RebalanceMode,
    private readonly host: MoveHost,
  ) {}

  isDrained(nodeId: string): boolean {
    return this.#drained.has(nodeId);
  }

  drainedNodes(): readonly string[] {
    return [...this.#drained];
  }

  /** `orchard node drain`: the node takes no new placement, and every instance on it moves to the other nodes. */
  async drain(node: string): Promise<{ nodeId: string; name: string; moved: MoveOutcome[] }> {
    const n = this.#find(node);
    this.#drained.add(n.nodeId);
    this.host.log.info({ node: n.profile.name }, 'node drained: no new placement on it');
    const moved = await this.#oneAtATime(() => drainInstances(this.host, n.nodeId, `node ${n.profile.name}`));
    return { nodeId: n.nodeId, name: n.profile.name, moved };
  }

  /** `orchard node drain --undo`: placements may use the node again (models move back only by a rebalance). */
  undrain(node: string): { nodeId: string; name: string } {
    const n = this.#find(node);
    this.#drained.delete(n.nodeId);
    this.nodeArrived();
    return { nodeId: n.nodeId, name: n.profile.name };
  }

  /** `orchard rebalance`: the predicted gain of re-planning each ready model; applied unless `dryRun`. */
  rebalance(o: { readonly dryRun: boolean; readonly minGain: number; readonly model?: string | undefined }): Promise<RebalanceReport[]> {
    return this.#oneAtATime(() => rebalanceInstances(this.host, o));
  }

  /** A node joined, came back or was undrained: with --rebalance auto, weigh every model shortly. */
  nodeArrived(): void {
    if (this.mode !== 'auto') return;
    clearTimeout(this.#auto);
    this.#auto = setTimeout(() => {
      this.rebalance({ dryRun: false, minGain: AUTO_REBALANCE_MIN_GAIN }).then(
        (r) => this.host.log.info({ rebalance: r.map((x) => ({ model: x.model, outcome: x.outcome, gain: x.decision.gain, message: x.message })) }, 'automatic rebalance'),
        (err: unknown) => this.host.log.warn({ err: errorMessage(err) }, 'automatic rebalance failed'),
      );
    }, AUTO_REBALANCE_DELAY_MS);
    this.#auto.unref();
  }

  close(): void {
    clearTimeout(this.#auto);
  }

  #find(node: string): NodeEntry {
    const n = this.host.nodes().find((x) => x.nodeId === node || x.profile.name === node);
    if (!n) throw new CoordinatorError('NOT_FOUND', `no node named ${node} (give its name as \`orchard status\` shows it, or its id)`);
    return n;
  }

  #oneAtATime<T>(fn: () => Promise<T>): Promise<T> {
    const run = this.#moving.then(fn, fn);
    this.#moving = run.catch(() => {});
    return run;
  }
}

/** How long in-flight streams may finish on the old engines after a switch before they resume on the new ones. */
export const SWITCH_GRACE_MS = 5000;

export interface MoveOutcome {
  readonly model: string;
  /** switched: load-new-then-switch; reloaded: stopped and re-placed (a pause); kept: not moved (see message). */
  readonly outcome: 'switched' | 'reloaded' | 'kept';
  readonly message: string;
}

/** Move every instance off a node; the caller has already excluded the node from planning. */
export async function drainInstances(host: MoveHost, nodeId: string, label: string): Promise<MoveOutcome[]> {
  const on = host.instances().filter((i) => i.stages.some((s) => s.nodeId === nodeId) || i.group.engines.some((e) => e.nodeId === nodeId));
  const out: MoveOutcome[] = [];
  for (const inst of on) out.push(await drainOne(host, inst, label));
  return out;
}

async function drainOne(host: MoveHost, inst: Instance, label: string): Promise<MoveOutcome> {
  const why = `${label} is drained`;
  if (inst.state !== 'ready') return { model: inst.name, outcome: 'kept', message: `${inst.name} is ${inst.state}: ${inst.state === 'recovering' ? 'its re-placement leaves the node out' : 'not moved'}` };
  if (inst.staged) return { model: inst.name, outcome: 'kept', message: `${inst.name} is already moving` };
  let plan: PlacementResult;
  try {
    plan = await host.plan(inst, false);
  } catch (err) {
    if (!(err instanceof PlanDoesNotFitError)) throw err;
    // Not next to the running engines: does it fit once they are stopped?
    await host.plan(inst, true).catch((e: unknown) => {
      throw new CoordinatorError('FAILED_PRECONDITION', `cannot drain: ${inst.name} does not fit on the other nodes (${errorMessage(e)}); it keeps running`);
    });
    host.log.warn({ model: inst.name, err: errorMessage(err) }, 'drain: no room for the new placement next to the running one; stopping and re-placing (a pause)');
    await host.reload(inst, why);
    return { model: inst.name, outcome: 'reloaded', message: `${inst.name} was stopped and re-placed (no room to load it next to the running engines): ${stagesText(inst)}` };
  }
  await stageAndSwitch(host, inst, plan, why);
  return { model: inst.name, outcome: 'switched', message: `${inst.name} now runs on ${stagesText(inst)}` };
}

export interface RebalanceReport extends MoveOutcome {
  readonly decision: RebalanceDecision;
  readonly currentTokensPerSecond: number;
  readonly plannedTokensPerSecond: number;
}

/** Weigh re-planning every ready instance (or one); apply what the decision says unless `dryRun`. */
export async function rebalanceInstances(host: MoveHost, o: { readonly dryRun: boolean; readonly minGain: number; readonly model?: string | undefined }): Promise<RebalanceReport[]> {
  const chosen = host.instances().filter((i) => i.state === 'ready' && !i.staged && (!o.model || i.name === o.model));
  if (o.model && chosen.length === 0) throw new CoordinatorError('FAILED_PRECONDITION', `no ready model named "${o.model}"`);
  const out: RebalanceReport[] = [];
  for (const inst of chosen) {
    const current = inst.predictedTokensPerSecond;
    const ideal = await candidate(host, inst, true);
    const alongside = await candidate(host, inst, false);
    const decision = decideRebalance({ currentTokensPerSecond: current, currentStages: inst.stages, ideal: ideal.candidate, alongside: alongside.candidate, minGain: o.minGain });
    const report = { decision, currentTokensPerSecond: current, plannedTokensPerSecond: 'tokensPerSecond' in ideal.candidate ? ideal.candidate.tokensPerSecond : 0 };
    if (!decision.apply || o.dryRun || !alongside.plan) {
      out.push({ ...report, model: inst.name, outcome: 'kept', message: decision.reason });
      continue;
    }
    await stageAndSwitch(host, inst, alongside.plan, `${inst.name} is rebalanced`);
    out.push({ ...report, model: inst.name, outcome: 'switched', message: `${decision.reason}; now on ${stagesText(inst)}` });
  }
  return out;
}

async function candidate(host: MoveHost, inst: Instance, ignoringItself: boolean): Promise<{ candidate: CandidatePlan; plan?: PlacementResult }> {
  try {
    const plan = await host.plan(inst, ignoringItself);
    return { candidate: { tokensPerSecond: plan.predictedTokensPerSecond, stages: plan.stages }, plan };
  } catch (err) {
    if (err instanceof PlanDoesNotFitError || err instanceof CoordinatorError) return { candidate: { doesNotFit: errorMessage(err) } };
    throw err;
  }
}

function stagesText(inst: Instance): string {
  return inst.stages.map((s) => `${s.nodeName} [${s.firstLayer}-${s.lastLayer}]`).join(', ');
}

/** Start and verify `plan` next to the running engines, switch to it, stop the old engines. */
async function stageAndSwitch(host: MoveHost, inst: Instance, plan: PlacementResult, why: string): Promise<void> {
  let aborted = '';
  const group = host.newGroup(inst, (reason) => {
    aborted ||= reason;
  });
  inst.staged = group;
  const t0 = Date.now();
  const assertLoading = () => {
    if (aborted) throw new CoordinatorError('UNAVAILABLE', `moving ${inst.name}: ${aborted}`);
    if (inst.state !== 'ready' || inst.staged !== group) throw new CoordinatorError('UNAVAILABLE', `moving ${inst.name} was abandoned: it is ${inst.state}${inst.error ? ` (${inst.error})` : ''}`);
  };
  try {
    const nodes = plan.stages.map((s) => {
      const n = host.node(s.nodeId);
      if (n?.state !== 'up') throw new CoordinatorError('UNAVAILABLE', `node ${s.nodeName} (${s.nodeId}) is no longer up`);
      return n;
    });
    const bytesTotal = plan.stages.reduce((t, s) => t + s.bytes.weights, 0);
    const load: LoadContext = {
      plan,
      nodes,
      bytesTotal,
      progress: (phase, message) => host.log.info({ model: inst.name, phase, why }, message),
      assertLoading,
      elapsedSeconds: () => (Date.now() - t0) / 1000,
    };
    await group.start(load);
    group.verify(load);
    assertLoading();
  } catch (err) {
    if (inst.staged === group) inst.staged = undefined;
    await group.stop();
    throw err;
  }
  const old = switchTo(host, inst, group, plan, why);
  // In-flight streams end on the old engines if they can; the rest resume on the new ones.
  const oldCalls = old.calls;
  const until = Date.now() + SWITCH_GRACE_MS;
  while (oldCalls.some((c) => inst.calls.has(c)) && Date.now() < until) await sleep(100);
  for (const c of oldCalls) if (inst.calls.has(c)) c.cancel();
  await old.group.stop();
  host.log.info({ model: inst.name, why, seconds: (Date.now() - t0) / 1000, stages: stagesText(inst) }, 'model instance moved');
}

/**
 * New requests go to `group` from now on. The epoch moves on at once, so a stream on the old
 * engines that breaks during the grace period resumes instead of failing.
 */
function switchTo(host: MoveHost, inst: Instance, group: EngineGroup, plan: PlacementResult, why: string): { group: EngineGroup; calls: EngineStream[] } {
  const old = { group: inst.group, calls: [...inst.calls] };
  inst.group = group;
  inst.staged = undefined;
  inst.stages = [...plan.stages];
  inst.predictedTokensPerSecond = plan.predictedTokensPerSecond;
  inst.loadedAtMs = Date.now();
  inst.epoch++;
  inst.markFailed(why);
  Object.assign(inst, failureSignal());
  host.changed(inst);
  return old;
}
