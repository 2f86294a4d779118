import { readFile } from 'node:fs/promises';
import { resolve } from 'node:path';
import type { Command } from 'commander';
import type { CoordinatorClient } from '../../coordinator/api/client.ts';
import { addCredentialOptions, type CredentialFlags, coordinatorClient } from '../credentials.ts';
import { OrchardError, UsageError } from '../../shared/errors.ts';
import { CACHE_TYPES, type CacheType } from '../../shared/memory/kv.ts';
import { type ModelProfile, weightTraffic } from '../../shared/model/profile.ts';
import { readModelProfile } from '../../shared/model/read-profile.ts';
import { parseNodesFile } from '../../shared/placement/nodes-file.ts';
import { parseParallelism } from '../../shared/placement/parallelism.ts';
import { planPlacement } from '../../shared/placement/planner.ts';
import { isMlxProfile } from '../../shared/model/mlx-profile.ts';
import { OBJECTIVES, type Objective, type Plan, familyPlacementOptions } from '../../shared/placement/types.ts';
import { formatBytes, parseInteger } from '../../shared/units.ts';
import { planJsonSchema, renderPlanTable } from '../tables.ts';

interface PlanFlags extends CredentialFlags {
  nodes?: string;
  parallelism?: string;
  coordinator?: string;
  ctx?: string;
  cacheType?: string;
  parallel?: string;
  pin?: string[];
  hopMs?: string;
  promptTokens?: string;
  objective?: string;
  json?: boolean;
}

const GiB = 2 ** 30;
const gib = (b: number) => (b / GiB).toFixed(1);

export function registerPlan(program: Command): void {
  addCredentialOptions(program.command('plan'))
    .description('plan which node holds which layers of a model (memory math + bandwidth cost model)')
    .argument('<model>', 'GGUF model file or MLX model directory (only headers are read; header-only files work)')
    .option('--nodes <file>', 'NODES.json: [{name, memoryBytes, bandwidthBytesPerSecond | chip, wiredLimitBytes?, budgetBytes?}]')
    .option('--coordinator <host:port>', 'without --nodes: plan for the live cluster of this coordinator (default $ORCHARD_COORDINATOR or 127.0.0.1:7420)')
    .option('--ctx <n>', 'context size in tokens (KV cells, as llama.cpp -c)', '4096')
    .option('--cache-type <t>', `KV cache type: ${CACHE_TYPES.join(', ')}`, 'f16')
    .option('--parallel <n>', 'parallel sequences (server slots, unified KV cache)', '1')
    .option('--pin <node...>', 'nodes that must hold a stage')
    .option('--parallelism <p>', 'MLX over several ranks (live cluster): pipeline, tensor or auto (auto decides from the measured links and says why)', 'auto')
    .option('--hop-ms <ms>', 'cost of one stage boundary per token in ms (nodes may override with hopSeconds)', '1')
    .option('--prompt-tokens <n>', 'also predict time to first token for a prompt of this many tokens', '0')
    .option('--objective <o>', `what placement minimises: ${OBJECTIVES.join(', ')} (ttft and balanced need --prompt-tokens)`, 'decode')
    .option('--json', 'print the plan as JSON on stdout')
    .action(async (modelPath: string, flags: PlanFlags, cmd: Command) => {
      const ctx = parseInteger(flags.ctx ?? '4096', '--ctx', 1, 16 * 1024 * 1024);
      const parallel = parseInteger(flags.parallel ?? '1', '--parallel', 1, 4096);
      const cacheType = (flags.cacheType ?? 'f16').toLowerCase();
      const hopMs = Number(flags.hopMs ?? '1');
      if (!/^\s*\d+(\.\d+)?\s*$/.test(flags.hopMs ?? '1') || !Number.isFinite(hopMs)) {
        throw new UsageError(`invalid --hop-ms "${flags.hopMs}": give milliseconds ≥ 0, e.g. 1 or 0.3`);
      }
      if (!(CACHE_TYPES as readonly string[]).includes(cacheType)) {
        throw new UsageError(`invalid --cache-type "${flags.cacheType}": use one of ${CACHE_TYPES.join(', ')}`);
      }
      const promptTokens = parseInteger(flags.promptTokens ?? '0', '--prompt-tokens', 0, 16 * 1024 * 1024);
      const objective = (flags.objective ?? 'decode') as Objective;
      if (!OBJECTIVES.includes(objective)) throw new UsageError(`invalid --objective "${flags.objective}": use one of ${OBJECTIVES.join(', ')}`);
      if (objective !== 'decode' && promptTokens === 0) throw new UsageError(`--objective ${objective} needs --prompt-tokens N (the prompt length to optimise for)`);
      if (!flags.nodes) {
        // The coordinator plans with its own costs (measured links); silently ignoring --hop-ms would mislead.
        for (const f of ['hopMs']) {
          if (cmd.getOptionValueSource(f) === 'cli') throw new UsageError(`--${f.replace(/[A-Z]/g, (c) => `-${c.toLowerCase()}`)} applies to --nodes plans only; the live cluster is planned by the coordinator`);
        }
        const client = await coordinatorClient(flags);
        const address = client.address;
        const plan = await livePlan(client, resolve(modelPath), { ctx, cacheType, parallel, pin: flags.pin ?? [], parallelism: parseParallelism(flags.parallelism) }, { promptTokens, objective });
        // The coordinator opens the model; the header here only names it when this machine has it too.
        const profile = await readModelProfile(resolve(modelPath)).catch(() => undefined);
        const model = profile?.name ?? modelPath;
        if (flags.json) {
          process.stdout.write(`${JSON.stringify(toJson(plan, model, profile))}\n`);
        } else {
          const what = profile ? `${model} (${profile.arch}, ${profile.layerCount} layers, ${profile.weightType})` : model;
          process.stdout.write(render(plan, `${what}, ctx ${ctx}, KV ${cacheType} — live cluster at ${address}`, profile));
        }
        if (!plan.fits) process.exitCode = 1;
        return;
      }
      if (cmd.getOptionValueSource('parallelism') === 'cli') throw new UsageError('--parallelism applies to live-cluster plans (the coordinator decides it from the measured links); --nodes plans are pipelines');
      let text: string;
      try {
        text = await readFile(flags.nodes, 'utf8');
      } catch (err) {
        throw new UsageError(`cannot read nodes file ${flags.nodes}: ${(err as Error).message}`);
      }
      const profile = await readModelProfile(modelPath);
      const nodes = parseNodesFile(text, flags.nodes, isMlxProfile(profile) ? 'mlx' : 'llama.cpp');
      const plan = planPlacement(profile, nodes, {
        ...familyPlacementOptions(profile),
        ctx,
        cacheType: cacheType as CacheType,
        parallel,
        pinned: flags.pin ?? [],
        hopSeconds: hopMs / 1000,
        promptTokens,
        objective,
      });
      if (flags.json) {
        process.stdout.write(`${JSON.stringify(toJson(plan, profile.name ?? modelPath, profile))}\n`);
      } else {
        process.stdout.write(render(plan, `${profile.name ?? modelPath} (${profile.arch}, ${profile.layerCount} layers, ${profile.weightType}), ctx ${ctx}, KV ${cacheType}`, profile));
      }
      if (!plan.fits) process.exitCode = 1;
    });
}

/**
 * The coordinator's Plan RPC: the planner's result over the nodes that are up (budgets net of
 * models already loaded), or its "does not fit" result. Validated here, at the edge.
 */
async function livePlan(
  client: CoordinatorClient,
  modelPath: string,
  options: { ctx: number; cacheType: string; parallel: number; pin: string[]; parallelism: string },
  predict: { promptTokens: number; objective: Objective },
): Promise<LivePlan> {
  const address = client.address;
  try {
    const res = await client.unary('plan', { modelPath, options, ...predict }, 30_000);
    let raw: unknown;
    try {
      raw = JSON.parse(String(res.planJson ?? ''));
    } catch {
      throw new OrchardError(`the coordinator at ${address} answered Plan with malformed JSON`);
    }
    const parsed = planJsonSchema.safeParse(raw);
    if (!parsed.success) throw new OrchardError(`the coordinator at ${address} answered Plan with an unexpected plan: ${parsed.error.issues[0]?.message ?? 'invalid'}`);
    // The wire carries the planner's Plan as JSON (Infinity became null where it does not fit).
    return parsed.data as unknown as LivePlan;
  } finally {
    client.close();
  }
}

/** What the model itself weighs: held vs read per token (MoE) and which parts are estimates. */
function modelJson(profile: ModelProfile | undefined) {
  if (!profile) return {};
  const { heldBytes, readBytesPerToken } = weightTraffic(profile);
  return {
    architecture: profile.arch,
    weightBytes: heldBytes,
    readBytesPerToken,
    ...(profile.moe ? { experts: profile.moe.experts, expertsUsed: profile.moe.expertsUsed, sharedExperts: profile.moe.shared } : {}),
    estimated: profile.estimated,
  };
}

/** The lines under the table that say what the MoE traffic and the estimates are. */
function modelLines(profile: ModelProfile | undefined): string[] {
  if (!profile) return [];
  const lines: string[] = [];
  if (profile.moe) {
    const { heldBytes, readBytesPerToken } = weightTraffic(profile);
    const m = profile.moe;
    const shared = m.shared ? ` + ${m.shared} shared` : '';
    lines.push(
      `mixture of experts: holds ${formatBytes(heldBytes)} of weights; a token reads ${formatBytes(readBytesPerToken)} of them (${m.expertsUsed} of ${m.experts} routed experts${shared}, attention, router, dense layers)`,
    );
  }
  if (profile.estimated.length > 0) {
    lines.push(`estimated: ${profile.estimated.join('; ')} — Orchard has no exact memory rules for "${profile.arch}" (weights are exact, from the tensor table)`);
  }
  return lines;
}

/** MLX over several ranks: the layout the coordinator's plan chose and why (live plans only). */
type LivePlan = Plan & { readonly parallelism?: { readonly mode: string; readonly reason: string } };

function toJson(plan: LivePlan, model: string, profile?: ModelProfile): unknown {
  return {
    model,
    ...modelJson(profile),
    fits: plan.fits,
    stages: plan.stages.map((s) => ({
      node: s.node,
      role: s.role,
      firstLayer: s.firstLayer,
      lastLayer: s.lastLayer,
      bytes: s.bytes,
      budgetBytes: s.budgetBytes,
      headroomBytes: s.headroomBytes,
      bandwidthBytesPerSecond: s.bandwidthBytesPerSecond,
      readBytesPerToken: s.readBytesPerToken,
    })),
    predicted: {
      tokensPerSecond: plan.predicted.tokensPerSecond,
      secondsPerToken: plan.fits ? plan.predicted.secondsPerToken : null,
      hopSeconds: plan.predicted.hopSeconds,
      ...(plan.predicted.promptTokens > 0 ? { promptTokens: plan.predicted.promptTokens, ttftSeconds: plan.predicted.ttftSeconds } : {}),
      objective: plan.predicted.objective,
    },
    reasons: plan.reasons,
    ...(plan.parallelism ? { parallelism: plan.parallelism } : {}),
    unusedNodes: plan.unusedNodes,
    ...(plan.shortfall ? { shortfall: plan.shortfall, remedies: plan.remedies } : {}),
  };
}

function render(plan: LivePlan, title: string, profile?: ModelProfile): string {
  const lines = [title];
  if (plan.fits) {
    // The same table the demo and the live-cluster plan print; ms/token is this command's extra.
    const ttft = plan.predicted.promptTokens > 0 ? `; first token after ${(plan.predicted.ttftSeconds * 1000).toFixed(0)} ms for a ${plan.predicted.promptTokens}-token prompt` : '';
    lines.push(renderPlanTable(plan).replace(/ tok\/s\n$/, ` tok/s (${(plan.predicted.secondsPerToken * 1000).toFixed(1)} ms/token)${ttft}`));
  } else {
    lines.push('DOES NOT FIT');
    if (plan.shortfall && plan.shortfall.shortfallBytes > 0) lines.push(`shortfall: ${gib(plan.shortfall.shortfallBytes)} GiB`);
  }
  lines.push(...modelLines(profile));
  if (plan.parallelism) lines.push(`parallelism: ${plan.parallelism.mode} — ${plan.parallelism.reason}`);
  for (const r of plan.reasons) lines.push(`  · ${r}`);
  if (plan.remedies?.length) {
    lines.push('remedies:');
    for (const r of plan.remedies) lines.push(`  → ${r}`);
  }
  return `${lines.join('\n')}\n`;
}
