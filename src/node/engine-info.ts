import { ENGINE_HOST, type EngineKind, type EngineSpec } from './engine-spec.ts';
import { mlxRankPort } from './mlx/rank-spec.ts';

/** What the supervisor reports of an engine it runs (Describe, Watch, metrics, tunnels). */
export interface EngineInfo {
  readonly engineId: string;
  readonly kind: EngineKind;
  readonly host: string;
  readonly port: number;
  readonly pid: number;
  readonly model: string;
  readonly startedAtSeconds: number;
  readonly argv: readonly string[];
  /** An rpc-server's Unix-domain socket: where it listens (the port is its identity, not bound). */
  readonly socket?: string;
  /** Start-up log lines about placement and memory (supervisor.ts STARTUP_LOG); only on start()'s result. */
  readonly startupLog?: readonly string[];
}

export interface EngineExit {
  readonly engineId: string;
  readonly kind: EngineKind;
  readonly port: number;
  /** -1 when the engine was ended by a signal. */
  readonly exitCode: number;
  readonly signal: string;
  /** true when StopEngine or the agent's shutdown asked for it. */
  readonly expected: boolean;
  readonly lastStderrLines: readonly string[];
}

/** What an MLX rank is known as before it is ready (its pid comes with "ready"). */
export function mlxRankInfo(engineId: string, spec: EngineSpec, python: string): EngineInfo {
  const mlx = spec.mlx!;
  return {
    engineId,
    kind: 'mlx-rank',
    host: ENGINE_HOST,
    port: mlxRankPort(mlx),
    pid: 0,
    model: spec.model,
    startedAtSeconds: Date.now() / 1000,
    argv: [python, 'mlx_worker.py', '--model', mlx.modelDir, '--mode', mlx.mode, `rank ${mlx.rank}/${mlx.worldSize}`],
  };
}
