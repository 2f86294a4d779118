import { portWasTaken } from '../../../shared/engine-port-range.ts';
import { errorMessage } from '../../../shared/errors.ts';
import { CoordinatorError } from '../../errors.ts';
import {
  type AdoptedEngines,
  type Cluster,
  clientOf,
  type EngineDriver,
  type EngineGroup,
  type EngineRequest,
  type EngineStream,
  headStream,
  type InstanceSpec,
  type LoadContext,
  RosterGroup,
} from '../driver.ts';
import type { LoadOptions } from '../types.ts';
import { type MlxRankEngine, rankProblems, startMlxRanks, submitToFollowers } from './instance.ts';
import { type MlxInstanceLaunch, mlxInstanceLaunch } from './launch.ts';

/** How a JACCL stage's endpoint reads (status, instance store): its links are outside the tunnels. */
const UNTUNNELLED_RDMA = 'untunnelled RDMA, JACCL coordinator ';

/**
 * MLX distributed: one rank per plan stage (rank 0 = the head stage, it emits), laid out by
 * launch.ts and started through the agents in the order the ring needs (instance.ts). Ranks step
 * in lockstep and must see requests in the same order, so an instance serves one request at a
 * time and every other rank takes each request before rank 0. Any rank exit is reported as gone;
 * all ranks stop together.
 */
export interface MlxDriverOptions {
  /** Every rank must be ready within this (each agent's start-up watchdog; default 300 s). */
  readonly mlxReadyTimeoutMs?: number | undefined;
  /** Rank 0 must emit at least this often during a request (default 30 s). */
  readonly mlxStallTimeoutSeconds?: number | undefined;
  /** Random source for fresh ring ports (tests may seed it). */
  readonly random?: (() => number) | undefined;
}

export class MlxDriver implements EngineDriver {
  readonly family = 'mlx';
  readonly stageNoun = 'MLX rank(s)';

  constructor(
    private readonly cluster: Cluster,
    private readonly o: MlxDriverOptions,
  ) {}

  fitOptions(options: LoadOptions, model: string): LoadOptions {
    if (options.parallel === 1) return options;
    this.cluster.log.info({ model, parallel: options.parallel }, 'MLX serves one request at a time: parallel set to 1');
    return { ...options, parallel: 1 };
  }

  group(spec: InstanceSpec): EngineGroup {
    return new MlxGroup(this.cluster, this.o, spec);
  }
}

class MlxGroup extends RosterGroup implements EngineGroup {
  /** The ranks in rank order (rank 0 = head, it emits; the others get each request first). */
  #ranks: MlxRankEngine[] = [];
  #launch: MlxInstanceLaunch | undefined;
  #startupLogs: string[][] = [];
  readonly verification = undefined;

  constructor(
    private readonly cluster: Cluster,
    private readonly o: MlxDriverOptions,
    private readonly spec: InstanceSpec,
  ) {
    super(cluster, spec);
  }

  /**
   * Lay the ranks out over the plan's nodes and start them in the order the ring needs. A ring
   * port is checked free by its agent, but a rank binds it only once loaded: if another process
   * bound it in between (on purpose — engine ports lie outside the ephemeral range, so no outgoing
   * connection takes one), the ranks that started are stopped and the launch runs once more on
   * fresh ports; a second failure is the load's one error (and the runtime stops what is left).
   */
  async start(load: LoadContext): Promise<void> {
    // Decided with the plan (mlx/parallelism.ts): the measured link the ranks would all-reduce over.
    const choice = load.plan.parallelism ?? { mode: 'pipeline', reason: 'one rank: nothing to split' };
    load.progress('starting-workers', `MLX ${choice.mode} parallel over ${load.plan.stages.length} rank(s): ${choice.reason}`);
    let launch = this.#layout(load, choice);
    let started: Awaited<ReturnType<typeof startMlxRanks>>;
    try {
      started = await this.#startRanks(load, launch);
    } catch (err) {
      if (!portWasTaken(errorMessage(err))) throw err;
      this.cluster.log.warn({ model: this.spec.name, err: errorMessage(err) }, 'an MLX rank\'s port was taken before it bound it: starting the ranks again on fresh ports');
      await this.roster.stop();
      launch = this.#layout(load, choice);
      started = await this.#startRanks(load, launch, 2);
    }
    this.#ranks = started.ranks;
    this.#startupLogs = started.startupLogs;
    for (const r of launch.ranks) this.endpoints[r.stage] = launch.untunnelledRdma ? `${UNTUNNELLED_RDMA}${r.mlx.jacclCoordinator}` : `127.0.0.1:${r.mlx.ringRanks[r.rank]?.enginePort ?? 0}`;
  }

  /** The ranks over the plan's nodes, with fresh ports from each node's engine port range. */
  #layout(load: LoadContext, choice: { mode: 'pipeline' | 'tensor'; reason: string }): MlxInstanceLaunch {
    const ranks = load.plan.stages.map((s, i) => ({
      nodeId: s.nodeId,
      nodeName: s.nodeName,
      agentAddress: load.nodes[i]!.address,
      interfaces: load.nodes[i]!.profile.interfaces,
      tunnelPort: load.nodes[i]!.profile.tunnelPort,
      enginePorts: load.nodes[i]!.profile.enginePorts,
      layers: s.lastLayer - s.firstLayer + 1,
    }));
    const launch = mlxInstanceLaunch(ranks, {
      modelDir: this.spec.path,
      maxTokens: this.spec.options.ctx,
      stallTimeoutSeconds: this.o.mlxStallTimeoutSeconds ?? 30,
      random: this.o.random ?? Math.random,
      allowUntunnelledRdma: this.spec.options.allowUntunnelledRdma,
      mode: choice.mode,
    });
    this.#launch = launch;
    this.cluster.log.info(
      { model: this.spec.name, parallelism: choice.mode, parallelismReason: choice.reason, backend: launch.backend, reason: launch.reason, ranks: launch.ranks.map((r) => ({ rank: r.rank, node: r.nodeName, stage: r.stage, ringPort: r.mlx.ringRanks[r.rank]?.enginePort })) },
      'MLX launch',
    );
    return launch;
  }

  #startRanks(load: LoadContext, launch: MlxInstanceLaunch, attempt = 1) {
    return startMlxRanks(
      {
        client: (id) => clientOf(this.cluster, id),
        record: (e) => this.roster.record({ nodeId: e.nodeId, engineId: e.engineId, label: `MLX rank ${e.rank}` }, e.rank === 0),
        assertLoading: () => load.assertLoading(),
        progress: (m) => load.progress('starting-workers', m),
      },
      launch,
      { engineIdPrefix: this.spec.engineIdPrefix, attempt, owner: this.spec.owner, model: this.spec.name, readyTimeoutMs: this.o.mlxReadyTimeoutMs ?? 300_000 },
    );
  }

  /** From the endpoints, so a re-adopted instance (no launch in memory) still says so. */
  override get untunnelledRdma(): boolean {
    return this.endpoints.some((e) => e.startsWith(UNTUNNELLED_RDMA));
  }

  verify(): void {
    const problems = this.#launch ? rankProblems(this.#launch, this.#startupLogs) : ['the MLX ranks were not started'];
    if (problems.length > 0) throw new CoordinatorError('INTERNAL', `the MLX ranks do not match the plan: ${problems.join('; ')}`);
  }

  /**
   * Every other rank takes the identical request first (ranks step in lockstep). Not raced against
   * the caller's abort: once some ranks hold the request, rank 0 must get it too (its agent
   * cancels it at once), or the group falls out of step. A rank that cannot take it leaves the
   * group inconsistent: it is reported gone (a reload restarts it).
   */
  async generate(req: EngineRequest): Promise<EngineStream> {
    const head = this.#ranks[0];
    if (!head) throw new CoordinatorError('UNAVAILABLE', `model "${this.spec.name}" is not ready`);
    const client = clientOf(this.cluster, head.nodeId);
    if (this.#ranks.length > 1) {
      try {
        await submitToFollowers(this.#ranks.slice(1), (id) => clientOf(this.cluster, id), req);
      } catch (err) {
        this.spec.gone(errorMessage(err));
        throw new CoordinatorError('UNAVAILABLE', errorMessage(err));
      }
    }
    return headStream(client, head.engineId, req);
  }

  stop(): Promise<void> {
    return this.roster.stop();
  }

  /** The ranks come back in rank order from their ids (`…-r<rank>`). */
  override adopt(a: AdoptedEngines): void {
    super.adopt(a);
    this.#ranks = a.engines
      .map((e) => ({ nodeId: e.nodeId, nodeName: this.cluster.node(e.nodeId)?.profile.name ?? e.nodeId, engineId: e.engineId, rank: Number(/-r(\d+)$/.exec(e.engineId)?.[1] ?? -1) }))
      .sort((x, y) => x.rank - y.rank);
  }
}
