import type * as grpc from '@grpc/grpc-js';
import { errorMessage } from '../../../shared/errors.ts';
import type { AgentClient, AgentGenerateRequest } from '../../membership/agent-client.ts';
import { CoordinatorError } from '../../errors.ts';
import { grpcMessage } from '../driver.ts';
import type { MlxInstanceLaunch, MlxRankLaunch } from './launch.ts';

/**
 * Starting and driving the ranks of one MLX instance through their node agents (I/O; the layout
 * itself is pure, in launch.ts).
 */
export interface MlxRankEngine {
  readonly nodeId: string;
  readonly nodeName: string;
  readonly engineId: string;
  readonly rank: number;
}

export interface MlxStartDeps {
  client(nodeId: string): AgentClient;
  /** Record a rank before its StartEngine call, so clean-up stops it even if the call times out. */
  record(e: MlxRankEngine): void;
  /** Throws when the load was aborted meanwhile (unload, a node went down). */
  assertLoading(): void;
  progress(message: string): void;
}

export interface MlxStartOptions {
  readonly engineIdPrefix: string;
  /**
   * A launch after the first gets engine ids of its own (`…-r<rank>-<attempt>`): an agent keeps a
   * rank's tunnels per engine id, and the stopped ranks' may not all be released yet.
   */
  readonly attempt?: number;
  /** The cluster id: the agents let only it stop the ranks. */
  readonly owner: string;
  readonly model: string;
  /** Each rank's start-up watchdog in its agent; the whole group must be ready within it. */
  readonly readyTimeoutMs: number;
}

/**
 * Start every rank: ranks 0..N-2 until they report "starting" (imports done, about to listen),
 * then rank N-1 (it dials rank 0 with a bounded retry while the others accept without limit),
 * then wait for every rank's "ready" (the repeated StartEngine is idempotent and waits). A rank
 * that never comes up trips its agent's watchdog: the load fails with that agent's message.
 * Returns the ranks in rank order (ranks[0] is the head: Generate goes there) and each rank's
 * start-up log lines (its "mlx-ready" report, for `rankProblems`).
 */
export async function startMlxRanks(
  deps: MlxStartDeps,
  launch: MlxInstanceLaunch,
  o: MlxStartOptions,
): Promise<{ ranks: MlxRankEngine[]; startupLogs: string[][] }> {
  const n = launch.ranks.length;
  const engines = launch.ranks.map((r) => ({ nodeId: r.nodeId, nodeName: r.nodeName, engineId: `${o.engineIdPrefix}-r${r.rank}${(o.attempt ?? 1) > 1 ? `-${o.attempt}` : ''}`, rank: r.rank }));
  for (const e of engines) deps.record(e);
  const callTimeout = o.readyTimeoutMs + 15_000;
  const start = (r: MlxRankLaunch, returnWhenStarting: boolean) =>
    deps
      .client(r.nodeId)
      .startMlxRank(
        { engineId: engines[r.rank]!.engineId, model: o.model, readyTimeoutSeconds: o.readyTimeoutMs / 1000, owner: o.owner, mlx: { ...r.mlx, returnWhenStarting } },
        callTimeout,
      )
      .catch((err: unknown) => {
        throw new CoordinatorError('UNAVAILABLE', `MLX rank ${r.rank} on ${r.nodeName} failed to start: ${grpcMessage(err)}`);
      });
  const early = launch.ranks.slice(0, Math.max(0, n - 1));
  if (n > 1) {
    deps.progress(`starting MLX ranks 0..${n - 2} (${launch.backend}: ${launch.reason})`);
    await Promise.all(early.map((r) => start(r, true)));
    deps.assertLoading();
  }
  deps.progress(n > 1 ? `starting MLX rank ${n - 1} and waiting for all ${n} ranks to be ready` : 'starting the MLX process');
  const started = await Promise.all(launch.ranks.map((r) => start(r, false)));
  deps.assertLoading();
  return { ranks: engines, startupLogs: started.map((s) => s.logLines) };
}

/** Each worker reports the layer range it really runs; it must be the plan's. */
export function rankProblems(launch: MlxInstanceLaunch, startupLogs: readonly (readonly string[])[]): string[] {
  return launch.ranks.flatMap((r, i) => {
    const problem = checkRankReport(r, startupLogs[i] ?? []);
    return problem ? [problem] : [];
  });
}

/**
 * Hand a request to every rank but 0 (they answer "submitted" at once): every rank must hold the
 * identical request before rank 0 can step (they compare a digest). Rank 0's stream is opened by
 * the caller afterwards with the same request id.
 */
export async function submitToFollowers(
  followers: readonly MlxRankEngine[],
  client: (nodeId: string) => AgentClient,
  req: Omit<AgentGenerateRequest, 'engineId'>,
  timeoutMs = 10_000,
): Promise<void> {
  await Promise.all(
    followers.map(
      (f) =>
        new Promise<void>((resolve, reject) => {
          let call: grpc.ClientReadableStream<Record<string, unknown>>;
          try {
            call = client(f.nodeId).generate({ ...req, engineId: f.engineId });
          } catch (err) {
            reject(new CoordinatorError('UNAVAILABLE', `MLX rank ${f.rank} on ${f.nodeName}: ${errorMessage(err)}`));
            return;
          }
          const timer = setTimeout(() => {
            call.cancel();
            reject(new CoordinatorError('UNAVAILABLE', `MLX rank ${f.rank} on ${f.nodeName} did not take the request within ${timeoutMs / 1000} s`));
          }, timeoutMs);
          let ok = false;
          call.on('data', (m: Record<string, unknown>) => {
            if (m.event === 'done') ok = true;
          });
          call.on('error', (err) => {
            clearTimeout(timer);
            reject(new CoordinatorError('UNAVAILABLE', `MLX rank ${f.rank} on ${f.nodeName}: ${grpcMessage(err)}`));
          });
          call.on('end', () => {
            clearTimeout(timer);
            if (ok) resolve();
            else reject(new CoordinatorError('UNAVAILABLE', `MLX rank ${f.rank} on ${f.nodeName} ended without taking the request`));
          });
        }),
    ),
  );
}

/**
 * Compare a rank's "mlx-ready" report with its launch: rank, world size and, in pipeline mode,
 * the layer range [first, end) its plan stage holds. Returns the problem, or undefined.
 */
export function checkRankReport(r: MlxRankLaunch, logLines: readonly string[]): string | undefined {
  const line = logLines.find((l) => l.startsWith('mlx-ready '));
  if (!line) return `rank ${r.rank} on ${r.nodeName} sent no ready report`;
  let rep: { rank?: unknown; size?: unknown; layers?: unknown; mode?: unknown };
  try {
    rep = JSON.parse(line.slice('mlx-ready '.length)) as typeof rep;
  } catch {
    return `rank ${r.rank} on ${r.nodeName} sent an unreadable ready report`;
  }
  if (rep.rank !== r.rank || rep.size !== r.mlx.worldSize) return `rank ${r.rank} on ${r.nodeName} reports rank ${String(rep.rank)} of ${String(rep.size)}`;
  if (r.mlx.mode === 'pipeline') {
    const first = r.mlx.split.slice(0, r.stage).reduce((a, b) => a + b, 0);
    const want = [first, first + r.mlx.split[r.stage]!];
    const got = Array.isArray(rep.layers) ? rep.layers : [];
    if (got[0] !== want[0] || got[1] !== want[1]) return `rank ${r.rank} on ${r.nodeName} runs layers [${got.join(', ')}), the plan says [${want.join(', ')})`;
  }
  return undefined;
}
