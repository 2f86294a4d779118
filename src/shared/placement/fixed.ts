import { UsageError } from '../errors.ts';
import type { ModelProfile } from '../model/profile.ts';
import { describe } from './planner.ts';
import { type Assignment, prepare, resolveOptions, validate } from './prepared.ts';
import type { Plan, PlacementNode, PlacementOptions } from './types.ts';

/**
 * A split someone else chose (a baseline's, a user's), costed exactly as the planner costs its
 * own: the same memory math, node rates, measured links and prompt, so a prediction for a
 * baseline's layout is comparable with Orchard's. The stages are in pipeline order, the last is
 * the head; together they must cover every layer once, contiguously. A stage over its node's
 * budget is kept (headroomBytes < 0 says so): the caller decides what an overflow means.
 */
export interface FixedStage {
  readonly node: string;
  readonly firstLayer: number;
  /** Inclusive; a head with no layers has lastLayer = firstLayer − 1. */
  readonly lastLayer: number;
}

export function planFixedSplit(profile: ModelProfile, nodes: readonly PlacementNode[], split: readonly FixedStage[], options?: Partial<PlacementOptions>): Plan {
  const o = resolveOptions(options);
  validate(profile, nodes, o);
  if (split.length === 0) throw new UsageError('a split needs at least one stage');
  const index = new Map(nodes.map((n, i) => [n.name, i]));
  let next = 0;
  const stages: Assignment['stages'][number][] = split.map((s, i) => {
    const node = index.get(s.node);
    if (node === undefined) throw new UsageError(`split names node "${s.node}", which is not among the nodes`);
    const isHead = i === split.length - 1;
    if (s.firstLayer !== next || s.lastLayer < s.firstLayer - (isHead ? 1 : 0)) {
      throw new UsageError(`split stage ${i} (${s.node}: ${s.firstLayer}–${s.lastLayer}) does not continue at layer ${next}`);
    }
    next = s.lastLayer + 1;
    return { node, first: s.firstLayer, end: s.lastLayer + 1 };
  });
  if (next !== profile.layerCount) throw new UsageError(`split covers layers 0–${next - 1} of ${profile.layerCount}`);
  if (new Set(stages.map((s) => s.node)).size !== stages.length) throw new UsageError('a node holds one stage at most');
  const plan = describe(prepare(profile, nodes, o), { stages, seconds: 0 }, false);
  const over = plan.stages.filter((s) => s.headroomBytes < 0).map((s) => s.node);
  return {
    ...plan,
    reasons: [`fixed split of ${stages.length} stage(s), costed by the planner's model${over.length ? `; over budget on ${over.join(', ')}` : ''}`],
  };
}
