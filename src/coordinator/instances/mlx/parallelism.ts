import type { ModelProfile } from '../../../shared/model/profile.ts';
import type { LinkMatrix } from '../../../shared/placement/links.ts';
import { allReduceLink, chooseParallelism, type MlxBackend, type ParallelismChoice, ringLinks } from '../../../shared/placement/parallelism.ts';
import type { Plan } from '../../../shared/placement/types.ts';
import type { NodeEntry } from '../../membership/registry.ts';
import type { LoadOptions } from '../types.ts';
import { mlxBackendOf } from './launch.ts';

/** The layout an MLX plan chose, with the backend whose link it was judged on. */
export type MlxParallelism = ParallelismChoice & { readonly backend: MlxBackend };

/**
 * Pipeline or tensor for an MLX plan, decided when it is planned (so `orchard plan`, the load and
 * `orchard status` say the same): the model's shape, the plan's per-token reads, and the link the
 * ranks would all-reduce over — measured by the agents for the TCP ring (`links`), assumed for
 * JACCL; `overBudget` names the nodes that cannot hold a tensor rank. `byName` maps the plan's (unique) node names to their entries; a tensor request the
 * model cannot split over the plan's nodes throws the UsageError that refuses the load before
 * anything starts.
 */
export function mlxParallelism(profile: ModelProfile, plan: Plan, byName: ReadonlyMap<string, NodeEntry>, options: LoadOptions, links: LinkMatrix | undefined, overBudget: readonly string[] = []): MlxParallelism {
  const names = plan.stages.map((s) => s.node);
  const node = (name: string) => byName.get(name)!;
  const backend = mlxBackendOf(
    names.map((n) => ({ nodeId: node(n).nodeId, interfaces: node(n).profile.interfaces })),
    options.allowUntunnelledRdma === true,
  );
  const ring = ringLinks(names, (a, b) => links?.between(node(a).nodeId, node(b).nodeId));
  const choice = chooseParallelism({
    requested: options.parallelism,
    ranks: plan.stages.length,
    profile,
    readBytesPerToken: plan.stages.reduce((a, s) => a + s.readBytesPerToken, 0) || profile.fileTensorBytes,
    bandwidthBytesPerSecond: Math.min(...plan.stages.map((s) => s.bandwidthBytesPerSecond).filter((b) => b > 0), 100e9),
    ...allReduceLink(backend, ring),
    overBudget,
  });
  return { ...choice, backend };
}
