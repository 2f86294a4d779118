import { spawn } from 'node:child_process';
import { rm } from 'node:fs/promises';
import { availableParallelism } from 'node:os';
import { join, resolve } from 'node:path';
import type { Command } from 'commander';
import { findLlamaBinaries } from '../../node/llama/binaries.ts';
import { OrchardError } from '../../shared/errors.ts';
import { readGgufHeader } from '../../shared/gguf/reader.ts';
import { modelProfile } from '../../shared/model/profile.ts';
import { formatBandwidth, formatBytes, parseInteger } from '../../shared/units.ts';
import { loadCalibration, measureCalibration, startCalibrationEngine } from '../../node/calibrate.ts';
import type { CalibrationEngine } from '../../node/calibration-engine.ts';
import { measuredUnderContention, median } from '../../shared/placement/calibration.ts';
import type { Calibration } from '../../shared/placement/cost.ts';
import { apiJson, apiSse } from '../api-client.ts';
import { measureAgreement } from '../demo-measure.ts';
import { DEMO_CTX, demoBudgets, ensureDemoModel } from '../demo-model.ts';
import { type LocalCluster, ORCHARD_BIN, startLocalCluster } from '../local-cluster.ts';
import { createProgress } from '../progress.ts';
import { placementJsonSchema, planJsonSchema, renderPlacementTable, renderPlanTable } from '../tables.ts';
import { processAlive } from '../../shared/process-alive.ts';
import { makeScratchDir } from '../../shared/scratch-dir.ts';

interface DemoFlags {
  model?: string;
  keep?: boolean;
  prompt: string;
  maxTokens: string;
  nodes: string;
  json?: boolean;
  /** false with --no-calibrate. */
  calibrate?: boolean;
}

const LOAD_PHASES = ['planning', 'starting-workers', 'starting-head', 'verifying', 'ready'];

/**
 * `orchard demo`: the whole system on one machine, no model download and no network. Builds the
 * engines if they are missing, generates (once; cached) a demo GGUF, starts a coordinator and
 * three node agents as child processes on 127.0.0.1 with memory limits that leave no choice but
 * a three-stage split, shows the plan, loads, streams a completion through the OpenAI API,
 * reports tokens/s and where the bytes went, and stops everything — also on Ctrl-C.
 */
export function registerDemo(program: Command): void {
  program
    .command('demo')
    .description('run a three-node cluster on this machine: plan, load, stream a completion through the OpenAI API, shut down')
    .option('--model <path>', 'use this GGUF instead of the generated demo model')
    .option('--keep', 'keep the cluster running after the demo (Ctrl-C stops it)')
    .option('--prompt <text>', 'completion prompt', 'Once upon a time')
    .option('--max-tokens <n>', 'tokens to generate', '48')
    .option('--nodes <n>', 'node agents to start (2–6)', '3')
    .option('--json', 'human output to stderr; one JSON summary (predicted and measured tokens/s first, then plan, placement, timings) on stdout')
    .option('--no-calibrate', 'plan with the machine\'s cached engine measurement instead of measuring the demo model now')
    .addHelpText(
      'after',
      `
Examples:
  $ orchard demo                       # generated model, three nodes
  $ orchard demo --model ~/models/llama-3.2-1b-q4_k_m.gguf --keep
  $ orchard demo --nodes 2 --max-tokens 16

Nothing outlives the demo: on exit or Ctrl-C the coordinator unloads the model, the agents stop
their engines and every process is gone. State lives in a temporary folder that is removed.`,
    )
    .action(async (flags: DemoFlags) => {
      await runDemo(flags);
    });
}

async function ensureEngines(): Promise<void> {
  try {
    await findLlamaBinaries();
    return;
  } catch {}
  process.stderr.write('llama.cpp engines are not built yet: running `orchard setup` (one time, a few minutes)…\n');
  const code = await new Promise<number | null>((res) => {
    const child = spawn(process.execPath, [ORCHARD_BIN, 'setup'], { stdio: ['ignore', 'inherit', 'inherit'] });
    child.once('exit', (c) => res(c));
  });
  if (code !== 0) throw new OrchardError(`orchard setup failed (exit ${code}); run it by hand to see why`);
  await findLlamaBinaries();
}

type ClusterJson = { nodes: { state: string }[]; links?: { rtt_seconds: number; error: string | null }[] };

/** Poll `/v1/cluster` until `ready` says so or `timeoutMs` has passed; the last answer and whether it was ready. */
async function pollCluster(baseUrl: string, ready: (c: ClusterJson) => boolean, timeoutMs: number): Promise<{ c: ClusterJson; ready: boolean }> {
  const t0 = Date.now();
  for (;;) {
    const c = await apiJson<ClusterJson>({ baseUrl }, 'GET', '/v1/cluster');
    if (ready(c)) return { c, ready: true };
    if (Date.now() - t0 > timeoutMs) return { c, ready: false };
    await new Promise((r) => setTimeout(r, 200));
  }
}

async function waitForNodes(baseUrl: string, n: number, timeoutMs: number): Promise<void> {
  const { c, ready } = await pollCluster(baseUrl, (x) => x.nodes.filter((node) => node.state === 'up').length >= n, timeoutMs);
  if (!ready) throw new OrchardError(`only ${c.nodes.length} of ${n} nodes joined within ${timeoutMs / 1000} s`);
}

/**
 * The coordinator probes every ordered pair of up nodes within seconds of their coming up; a plan
 * made before that prices every hop at the planner's assumed 1 ms, ten times what a loopback
 * tunnel costs, so the demo plans once each direction is measured (or the wait runs out).
 */
async function waitForLinks(baseUrl: string, n: number, timeoutMs: number): Promise<{ wanted: number; measured: number; medianRttSeconds: number }> {
  const wanted = n * (n - 1);
  const rtts = (c: ClusterJson) => (c.links ?? []).filter((l) => l.error === null && l.rtt_seconds > 0).map((l) => l.rtt_seconds);
  const { c } = await pollCluster(baseUrl, (x) => rtts(x).length >= wanted, timeoutMs);
  const good = rtts(c);
  return { wanted, measured: Math.min(good.length, wanted), medianRttSeconds: median(good) };
}

/**
 * Ctrl-C / SIGTERM during the demo: the first signal aborts whatever step runs (then the same
 * clean shutdown as a normal exit), a second one SIGKILLs the cluster's process groups.
 */
function interruption(pids: () => readonly number[]) {
  const abort = new AbortController();
  let signals = 0;
  const onSignal = (sig: NodeJS.Signals) => {
    signals++;
    if (signals > 1) {
      process.stderr.write('second signal: killing the cluster now\n');
      for (const pid of pids()) {
        try {
          process.kill(-pid, 'SIGKILL');
        } catch {}
      }
      process.exit(130);
    }
    process.stderr.write(`\n${sig}: stopping the demo cluster…\n`);
    abort.abort(new OrchardError(`interrupted by ${sig}`));
  };
  process.on('SIGINT', onSignal);
  process.on('SIGTERM', onSignal);
  const interrupted = new Promise<never>((_, reject) => abort.signal.addEventListener('abort', () => reject(abort.signal.reason), { once: true }));
  interrupted.catch(() => {});
  return {
    signal: abort.signal,
    interrupted,
    orAbort: <T>(p: Promise<T>) => Promise.race([p, interrupted]),
    dispose() {
      process.off('SIGINT', onSignal);
      process.off('SIGTERM', onSignal);
    },
  };
}
type Interruption = ReturnType<typeof interruption>;

/** What the demo tells: human story on stderr (stdout too without --json), facts for the JSON summary. */
interface Story {
  readonly out: (s: string) => void;
  readonly summary: Record<string, unknown>;
}

async function demoModel(flags: DemoFlags, nodeCount: number, run: Interruption) {
  step('model');
  const modelPath = flags.model ? resolve(flags.model) : (await run.orAbort(ensureDemoModel())).path;
  const header = await readGgufHeader(modelPath);
  const profile = modelProfile(header);
  const ctx = Math.min(DEMO_CTX, profile.contextLength || DEMO_CTX);
  process.stderr.write(`${modelPath}: ${profile.arch}, ${profile.layerCount} layers, ${profile.weightType}\n`);
  return { modelPath, header, profile, ctx, budgets: demoBudgets(profile, nodeCount, { ctx, cacheType: 'f16' }) };
}
type DemoModel = Awaited<ReturnType<typeof demoModel>>;

function step(s: string): void {
  process.stderr.write(`\n▸ ${s}\n`);
}

/** Every engine shares this machine's cores: one thread each keeps them from fighting. */
function engineThreads(nodeCount: number): number {
  const env = process.env.ORCHARD_RPC_THREADS;
  return env ? parseInteger(env, 'ORCHARD_RPC_THREADS', 1, 1024) : Math.max(1, Math.floor(availableParallelism() / (nodeCount + 1)));
}

/**
 * The node numbers the demo's prediction rests on. By default the engine is measured now, on the
 * model the demo is about to split, and handed to the demo's agents (ORCHARD_CALIBRATION_FILE):
 * - now, because a shared machine's throughput follows its load: the same cached figure predicted
 *   19.7 tok/s here while the demo measured 22.9–30.1 at one time and 16.1 at another;
 * - on this model, because a CPU engine's read rate depends on the matrices' shape, not only on
 *   the bytes (1 thread here: dim-512 layers ~15–20 % slower per byte than the dim-1024
 *   calibration model, while a working set in or out of the 300 MiB L3 made no measurable
 *   difference). The demo then checks what it is about: the split, the hops and the head.
 * - and the engine stays up: after the streamed completion the demo alternates decode windows
 *   between it and the cluster (demo-measure.ts), so the prediction and the measurement it is
 *   checked against are taken in the same seconds.
 * That measurement is of one depth, so the part of a token's time that does not grow with the
 * bytes read comes from the machine's own two-depth calibration (cached; taken once if missing:
 * calibrate.ts): the demo model's bandwidth is bytes ÷ (seconds − that part), and the plan
 * charges the same part at the head.
 * Returns the measurement, its file for the agents and the engine, or, with --no-calibrate, the
 * machine's cached measurement (taken once if missing) and neither file nor engine.
 */
interface DemoCalibration {
  readonly calibration: Calibration;
  readonly file?: string;
  readonly engine?: CalibrationEngine;
  /** The demo model split in two, its first stage behind a loopback engine tunnel (not on macOS). */
  readonly tunnelled?: CalibrationEngine;
}

async function ensureCalibration(nodeCount: number, m: DemoModel, fresh: boolean, stateRoot: string, story: Story, run: Interruption, keep: (e: CalibrationEngine) => void): Promise<DemoCalibration> {
  step('engine calibration');
  const threads = engineThreads(nodeCount);
  let out: DemoCalibration;
  let machine = await loadCalibration(threads);
  if (!machine) {
    process.stderr.write(`measuring this machine's engine with ${threads} thread(s) at two depths (once; cached)…\n`);
    machine = await run.orAbort(measureCalibration(threads));
  }
  if (fresh) {
    process.stderr.write(`measuring this machine's engine on ${m.modelPath} with ${threads} thread(s)…\n`);
    const engine = await run.orAbort(startCalibrationEngine(threads, process.env, { model: m.modelPath }));
    keep(engine);
    // Where the calibration measures a boundary (not macOS), the demo model's own, beside the engine.
    const tunnelled = machine.boundary ? await run.orAbort(startCalibrationEngine(threads, process.env, { model: m.modelPath, rpcServers: 2, tunnelledStages: 1 })) : undefined;
    if (tunnelled) keep(tunnelled);
    process.stderr.write(`calibration engine: pids ${engine.pids.join(', ')}${tunnelled ? `; split behind a loopback tunnel: ${tunnelled.pids.join(', ')}` : ''} (up until the demo ends)\n`);
    const file = join(stateRoot, 'calibration.json');
    // One depth, the demo's own model: what a token costs whatever it reads is the machine's (its two-depth fit).
    const decodeFixedSecondsPerToken = machine.decodeFixedSecondsPerToken;
    // And what a boundary costs beyond the probe is the machine's too; the split engine measures it
    // again beside the cluster (compareDecode), where it matters on a shared machine.
    const boundaryOverheadSeconds = machine.boundaryOverheadSeconds;
    // And decode attention's rate (the machine's two prompt lengths), so the demo model's bandwidth is taken without it, as the machine's is.
    const attention = machine.decodeAttentionFlopsPerSecond;
    const calibration = await run.orAbort(
      measureCalibration(threads, process.env, {
        engine,
        file,
        decodeFixedSecondsPerToken,
        ...(boundaryOverheadSeconds !== undefined ? { boundaryOverheadSeconds } : {}),
        ...(attention !== undefined ? { decodeAttentionFlopsPerSecond: attention } : {}),
      }),
    );
    out = { calibration, file, engine, ...(tunnelled ? { tunnelled } : {}) };
  } else {
    out = { calibration: machine };
  }
  const c = out.calibration;
  process.stderr.write(
    `${threads} thread(s): decode ${formatBandwidth(c.effectiveBandwidthBytesPerSecond)} effective + ${(c.decodeFixedSecondsPerToken * 1000).toFixed(1)} ms per token (median of ${c.windows} windows of ${c.decodeTokensPerWindow} tokens, ±${(c.decodeSpread * 100).toFixed(0)} %), ` +
      (c.boundaryOverheadSeconds !== undefined ? `+ ${(c.boundaryOverheadSeconds * 1000).toFixed(2)} ms per tunnelled boundary beyond the link probe, ` : '') +
      `prefill ${(c.prefillFlopsPerSecond / 1e9).toFixed(1)} GFLOP/s; other processes used ${c.competingCores.toFixed(2)} of ${c.cores} cores (measured ${new Date(c.measuredAtSeconds * 1000).toISOString()})\n`,
  );
  story.summary.calibration = c;
  return out;
}

async function startDemoCluster(m: DemoModel, nodeCount: number, stateRoot: string, calibrationFile: string | undefined, run: Interruption): Promise<LocalCluster> {
  step(`cluster: a coordinator and ${nodeCount} node agents on 127.0.0.1`);
  const threads = String(engineThreads(nodeCount));
  const env: NodeJS.ProcessEnv = {
    ORCHARD_RPC_THREADS: threads,
    ORCHARD_CALIBRATION_FILE: calibrationFile ?? '',
    ORCHARD_LLAMA_SERVER_EXTRA_ARGS: process.env.ORCHARD_LLAMA_SERVER_EXTRA_ARGS ?? `-t ${threads}`,
    ORCHARD_API_KEY: '',
    ORCHARD_API_KEY_FILE: '',
  };
  const cluster = await run.orAbort(startLocalCluster({ nodes: m.budgets, stateRoot, env }));
  for (const [i, n] of cluster.nodes.entries()) {
    process.stderr.write(`  ${n.name}: memory limit ${formatBytes(m.budgets[i]!.budgetBytes)}, gRPC 127.0.0.1:${String(n.ready.grpcPort)}, pid ${n.pid}\n`);
  }
  process.stderr.write(`  coordinator: OpenAI API ${cluster.httpUrl}/v1, gRPC ${cluster.grpcAddress}, pid ${cluster.coordinator.pid}\n`);
  await run.orAbort(waitForNodes(cluster.httpUrl, nodeCount, 20_000));
  const links = await run.orAbort(waitForLinks(cluster.httpUrl, nodeCount, 30_000));
  if (links.wanted > 0) process.stderr.write(
    links.measured === links.wanted
      ? `  links: ${links.measured} measured over the tunnels, round trip ${(links.medianRttSeconds * 1000).toFixed(2)} ms (median)\n`
      : `  links: ${links.measured} of ${links.wanted} measured within 30 s; the plan assumes the default hop cost for the others\n`,
  );
  return cluster;
}

async function showPlan(cluster: LocalCluster, m: DemoModel, nodeCount: number, story: Story, run: Interruption): Promise<void> {
  step('plan');
  const client = cluster.client();
  let planText: string;
  try {
    const r = await run.orAbort(client.unary('plan', { modelPath: m.modelPath, options: { ctx: m.ctx, cacheType: 'f16', parallel: 1, pin: [] } }));
    planText = String(r.planJson ?? '');
  } finally {
    client.close();
  }
  const plan = planJsonSchema.parse(JSON.parse(planText));
  Object.assign(story.summary, { model: m.modelPath, budgets: m.budgets, plan, predictedTokensPerSecond: plan.predicted.tokensPerSecond });
  story.out(`\nPlan for ${m.profile.name ?? m.modelPath} (${m.profile.layerCount} layers, ctx ${m.ctx}) on ${nodeCount} nodes:\n${renderPlanTable(plan)}`);
}

async function loadDemo(cluster: LocalCluster, m: DemoModel, story: Story, run: Interruption): Promise<void> {
  step('load');
  const bar = createProgress('load', LOAD_PHASES.length - 1);
  const tLoad = Date.now();
  let loaded: Record<string, unknown> | undefined;
  try {
    for await (const p of apiSse({ baseUrl: cluster.httpUrl }, '/v1/cluster/models', { model: m.modelPath, name: 'orchard-demo', ctx: m.ctx }, run.signal)) {
      if (p.phase === 'done') loaded = p.model as Record<string, unknown>;
      else bar.update(Math.max(0, LOAD_PHASES.indexOf(String(p.phase))), String(p.message ?? p.phase));
    }
  } finally {
    bar.stop(loaded ? `ready in ${((Date.now() - tLoad) / 1000).toFixed(1)} s` : 'failed');
  }
  if (!loaded) throw new OrchardError('the load ended without a result');
  story.summary.loadSeconds = (Date.now() - tLoad) / 1000;
}

/** Stream a completion through the OpenAI API, printing tokens as they come; report the rates. */
async function streamCompletion(cluster: LocalCluster, prompt: string, maxTokens: number, story: Story, run: Interruption): Promise<void> {
  step(`generate: POST /v1/completions (stream), ${maxTokens} tokens`);
  story.out(`\n${prompt}`);
  const tGen = Date.now();
  let firstAt = 0;
  let chunks = 0;
  let usage: Record<string, unknown> | undefined;
  let timings: Record<string, unknown> | undefined;
  let finish = '';
  let text = '';
  const body = { model: 'orchard-demo', prompt, max_tokens: maxTokens, temperature: 0, stream: true, stream_options: { include_usage: true } };
  for await (const c of apiSse({ baseUrl: cluster.httpUrl }, '/v1/completions', body, run.signal)) {
    const choice = (c.choices as { text?: string; finish_reason?: string | null }[])[0];
    if (choice?.text) {
      if (!firstAt) firstAt = Date.now();
      chunks++;
      story.out(choice.text);
      text += choice.text;
    }
    if (choice?.finish_reason) finish = choice.finish_reason;
    if (c.usage) {
      usage = c.usage as Record<string, unknown>;
      timings = (c.orchard as { timings?: Record<string, unknown> } | undefined)?.timings;
    }
  }
  const tEnd = Date.now();
  story.out('\n\n');
  const completion = Number(usage?.completion_tokens ?? chunks);
  const wallRate = firstAt && tEnd > firstAt && completion > 1 ? (completion - 1) / ((tEnd - firstAt) / 1000) : 0;
  story.out(
    `${completion} tokens (finish: ${finish || '?'}), prompt ${String(usage?.prompt_tokens ?? '?')} tokens; ` +
      `decode ${Number(timings?.predicted_tokens_per_second ?? 0).toFixed(1)} tok/s (engine), ${wallRate.toFixed(1)} tok/s (client, after the first token); ` +
      `first token after ${firstAt ? firstAt - tGen : 0} ms\n`,
  );
  const streamed = Number(timings?.predicted_tokens_per_second ?? 0);
  Object.assign(story.summary, { measuredTokensPerSecond: streamed, streamedTokensPerSecond: streamed, text, finishReason: finish, usage, timings, clientTokensPerSecond: wallRate, firstTokenMs: firstAt ? firstAt - tGen : null });
}

/**
 * The demo's two numbers: with the calibration engine up, both from alternating windows
 * (demo-measure.ts); without (--no-calibrate), the plan's prediction and the streamed completion.
 */
async function compareDecode(cluster: LocalCluster, m: DemoModel, prompt: string, cal: DemoCalibration, story: Story, run: Interruption): Promise<void> {
  if (cal.engine) {
    step('measure: decode windows, alternating between the cluster and the calibration engine');
    const a = await run.orAbort(
      measureAgreement({
        baseUrl: cluster.httpUrl,
        model: 'orchard-demo',
        prompt,
        plan: story.summary.plan,
        header: m.header,
        engine: cal.engine,
        engineTokensPerSecond: cal.calibration.decodeTokensPerSecond,
        promptTokensPerSecond: cal.calibration.promptTokensPerSecond,
        decodeFixedSecondsPerToken: cal.calibration.decodeFixedSecondsPerToken,
        ...(cal.tunnelled ? { tunnelled: { engine: cal.tunnelled, plannedOverheadSeconds: cal.calibration.boundaryOverheadSeconds ?? 0 } } : {}),
        signal: run.signal,
      }),
    );
    process.stderr.write(
      `${a.windows.length} window rounds of ${a.windowTokens} tokens (cluster / one engine${a.tunnelledTokensPerSecond !== undefined ? ' / split behind a tunnel' : ''}, tok/s): ${a.windows.map((w) => [w.cluster, w.engine, ...(w.tunnelled !== undefined ? [w.tunnelled] : [])].map((x) => x.toFixed(1)).join('/')).join(', ')}; ` +
        (a.boundaryOverheadSeconds !== undefined ? `boundary overhead ${(a.boundaryOverheadSeconds * 1000).toFixed(2)} ms; ` : '') +
        `load average ${a.loadAverage1m.start.toFixed(2)}→${a.loadAverage1m.end.toFixed(2)}\n`,
    );
    Object.assign(story.summary, {
      predictedTokensPerSecond: a.predictedTokensPerSecond,
      measuredTokensPerSecond: a.measuredTokensPerSecond,
      planPredictedTokensPerSecond: story.summary.predictedTokensPerSecond,
      agreement: a,
    });
  }
  const c = cal.calibration;
  story.summary.contended = measuredUnderContention(c, c.cores);
  if (story.summary.contended) {
    // Measured here at load average 12–15: the cluster's windows ran 1.3–2× the single engine's,
    // where at load average ~4 they were even; a pipeline of mostly sleeping processes gets a
    // larger share of busy cores than one process doing all the work.
    story.out(
      `note: other processes used ${c.competingCores.toFixed(2)} of ${c.cores} cores while the engine was measured; on a machine this busy the split and the single engine get different shares of the cores, so the comparison below says more about the scheduler than about the cost model\n`,
    );
  }
  const predicted = Number(story.summary.predictedTokensPerSecond ?? 0);
  const measured = Number(story.summary.measuredTokensPerSecond ?? 0);
  if (predicted > 0 && measured > 0) {
    story.out(`predicted ${predicted.toFixed(1)} tok/s, measured ${measured.toFixed(1)} tok/s (${(((measured - predicted) / predicted) * 100).toFixed(0)}%)\n`);
  }
}

async function showPlacement(cluster: LocalCluster, story: Story): Promise<void> {
  step('where the bytes went');
  const models = await apiJson<{ data: { id: string; orchard: unknown }[] }>({ baseUrl: cluster.httpUrl }, 'GET', '/v1/models');
  const demo = models.data.find((m) => m.id === 'orchard-demo');
  if (demo) {
    const placement = placementJsonSchema.parse(demo.orchard);
    story.summary.placement = placement;
    story.out(renderPlacementTable(placement));
  }
}

async function keepRunning(cluster: LocalCluster, story: Story, run: Interruption): Promise<void> {
  story.out(
    `\nThe cluster keeps running (Ctrl-C stops it):\n` +
      `  curl ${cluster.httpUrl}/v1/completions -H 'content-type: application/json' -d '{"model":"orchard-demo","prompt":"Hello","max_tokens":16}'\n` +
      `  orchard chat --url ${cluster.httpUrl} --model orchard-demo\n` +
      `  orchard status --coordinator ${cluster.grpcAddress}\n`,
  );
  await run.interrupted.catch(() => {});
}

/** Stop the cluster, remove its state, and say whether any process outlived it. */
async function shutdownDemo(cluster: LocalCluster | undefined, stateRoot: string | undefined, t0: number): Promise<void> {
  const pids = cluster?.pids() ?? [];
  if (cluster) {
    process.stderr.write('\n▸ shutdown: unloading, stopping engines and agents\n');
    await cluster.stop();
  }
  if (stateRoot) await rm(stateRoot, { recursive: true, force: true });
  const left = pids.filter(processAlive);
  if (left.length > 0) process.stderr.write(`warning: processes still running: ${left.join(', ')}\n`);
  else if (cluster) process.stderr.write(`stopped ${pids.length} processes; total ${((Date.now() - t0) / 1000).toFixed(1)} s\n`);
}

async function runDemo(flags: DemoFlags): Promise<void> {
  const nodeCount = parseInteger(flags.nodes, '--nodes', 2, 6);
  const maxTokens = parseInteger(flags.maxTokens, '--max-tokens', 1, 4096);
  const t0 = Date.now();
  // With --json the human-readable story goes to stderr and stdout carries one summary object.
  const story: Story = { out: (s) => (flags.json ? process.stderr : process.stdout).write(s), summary: {} };
  let cluster: LocalCluster | undefined;
  let stateRoot: string | undefined;
  // The calibration engines it keeps up beside the cluster (the whole model; its split behind a tunnel).
  const engines: CalibrationEngine[] = [];
  const run = interruption(() => [...(cluster?.pids() ?? []), ...engines.flatMap((e) => e.pids)]);
  try {
    step('engines');
    await run.orAbort(ensureEngines());
    const bins = await findLlamaBinaries();
    process.stderr.write(`llama.cpp ${bins.llamaCppVersion}: ${bins.binDir}\n`);
    const model = await demoModel(flags, nodeCount, run);
    stateRoot = await makeScratchDir('orchard-demo-');
    const cal = await ensureCalibration(nodeCount, model, flags.calibrate !== false, stateRoot, story, run, (e) => engines.push(e));
    cluster = await startDemoCluster(model, nodeCount, stateRoot, cal.file, run);
    await showPlan(cluster, model, nodeCount, story, run);
    await loadDemo(cluster, model, story, run);
    await streamCompletion(cluster, flags.prompt, maxTokens, story, run);
    await compareDecode(cluster, model, flags.prompt, cal, story, run);
    await showPlacement(cluster, story);
    if (flags.keep) await keepRunning(cluster, story, run);
  } catch (err) {
    if (!run.signal.aborted) throw err;
  } finally {
    for (const e of engines) e.stop();
    await shutdownDemo(cluster, stateRoot, t0);
    run.dispose();
  }
  if (run.signal.aborted) process.exitCode = 130;
  else if (flags.json) {
    // The two numbers the demo is about come first: predicted (the plan) and measured (the engine).
    const { predictedTokensPerSecond, measuredTokensPerSecond, ...rest } = story.summary;
    process.stdout.write(`${JSON.stringify({ predictedTokensPerSecond, measuredTokensPerSecond, ...rest, totalSeconds: (Date.now() - t0) / 1000 })}\n`);
  }
}
